"""How attention is written into the exported ONNX graph (issue 20, item 1).

The model's attention (``train.models.transformer.Attention``: SDPA with a finite additive key
mask, output zeroed for a row without any valid key) is exported one of four ways:

* ``plain``: the legacy TorchScript exporter's split MatMul / Add / Softmax / MatMul with the
  reshapes and transposes around it. ONNX Runtime does not fuse it at load time (its attention
  fusions look for BERT-shaped subgraphs): :func:`ort_fused_at_load` counts zero fused attention
  nodes in the graph ONNX Runtime actually runs. Every TensorRT 10 parses it.
* ``mha``: ONNX Runtime's ``com.microsoft`` ``MultiHeadAttention`` contrib op, emitted directly by
  the exporter (a ``torch.autograd.Function`` with an ONNX ``symbolic``): inputs Q, K, V [B, L, d]
  without their projection biases, the three biases as the op's ``bias`` input and the key mask as
  its ``key_padding_mask`` [B, Lk] int32. No head reshapes or transposes stay in the graph. A
  contrib op: TensorRT does not parse it, so a plain graph is kept for TensorRT.
* ``attention23``: the standard ONNX ``Attention`` op (opset 23), emitted the same way, with the
  additive key mask expanded to [B, 1, Lq, Lk] (ONNX Runtime 1.32's CPU kernel does not broadcast the
  query axis of the mask). TensorRT parses it from 10.14 on ("Added support for the Attention
  operator", 10.14 GA parser notes); older TensorRT 10 (JetPack 6 ships 10.3) does not.
* ``ort-fusion``: the dynamo exporter (opset 18) followed by onnxscript's ORT fusion rewriter
  (``onnxscript.rewriter.ort_fusions.optimize_for_ort``), which turns the dynamo graph's SDPA pattern
  into ``MultiHeadAttention`` (and fuses SkipLayerNorm / BiasGelu). Needs onnxscript at export time.
  The rewriter finds no attention in the ``plain`` graph (it matches the dynamo exporter's pattern).

Which one is the default, and why, is measured by ``spar-bench quant`` (benchmarks/results/quant.md).
This module is torch-free (the CLI and the benchmarks read its tables); the export-time swap of the
model's attention lives in ``export.fused_attention``.
"""

from __future__ import annotations

from pathlib import Path

from export.errors import ExportError

ATTENTION_MODES = ("plain", "mha", "attention23", "ort-fusion")
# The attention of the default export: the fastest with parity in ONNX Runtime here, and the fused op
# every ONNX Runtime the edge extra allows (>= 1.17) runs, on CPU and CUDA alike (measured by
# `spar-bench quant`, benchmarks/results/quant.md).
DEFAULT_ATTENTION = "mha"
# The fused op each mode puts in the graph (op type, domain), or None for the split graph.
FUSED_OPS = {"plain": None, "mha": ("MultiHeadAttention", "com.microsoft"), "attention23": ("Attention", ""),
             "ort-fusion": ("MultiHeadAttention", "com.microsoft")}
ATTENTION23_OPSET = 23
# Attention op types that count as fused, in any domain (ONNX Runtime's own fusions included).
FUSED_OP_TYPES = ("MultiHeadAttention", "Attention", "QAttention", "GroupQueryAttention", "PackedMultiHeadAttention")


def check_mode(mode: str) -> str:
    if mode not in ATTENTION_MODES:
        raise ExportError(f"unknown attention mode {mode!r}; known: {', '.join(ATTENTION_MODES)}")
    return mode


def tensorrt_parses(mode: str) -> str:
    """Which TensorRT 10 versions parse a graph exported with ``mode`` (a short phrase)."""
    return {"plain": "every TensorRT 10", "attention23": "TensorRT >= 10.14 only",
            "mha": "none (ONNX Runtime contrib op)", "ort-fusion": "none (ONNX Runtime contrib op)"}[check_mode(mode)]


def needs_plain_graph(mode: str) -> bool:
    """True when TensorRT 10 as shipped on a Jetson (10.3) cannot parse the ``mode`` graph."""
    return check_mode(mode) != "plain"


# --------------------------------------------------------------------------- graph checks
def _graph_nodes(path_or_model):
    """The top-level nodes of an ONNX file (weights not loaded) or of a ModelProto."""
    import onnx

    model = onnx.load(str(path_or_model), load_external_data=False) if isinstance(path_or_model, (str, Path)) \
        else path_or_model
    return model.graph.node


def fused_attention_nodes(path_or_model) -> int:
    """Number of fused attention nodes (any of ``FUSED_OP_TYPES``) in an ONNX file or ModelProto."""
    return sum(n.op_type in FUSED_OP_TYPES for n in _graph_nodes(path_or_model))


def contrib_ops(path_or_model) -> list[str]:
    """Op types from domains other than the standard ONNX one (what TensorRT cannot parse)."""
    return sorted({f"{n.domain}::{n.op_type}" for n in _graph_nodes(path_or_model) if n.domain not in ("", "ai.onnx")})


def ort_fused_at_load(path: str | Path, level: str = "all") -> dict[str, int]:
    """What ONNX Runtime (CPU) runs after its own graph optimisations at ``level`` (basic, extended,
    all): op type -> count for the attention-related ops, read from the optimised model it writes
    (``SessionOptions.optimized_model_filepath``). ``fused`` sums the fused attention ops."""
    import tempfile

    import onnx
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if level not in levels:
        raise ExportError(f"optimisation level must be one of {', '.join(levels)}, got {level!r}")
    with tempfile.TemporaryDirectory(prefix="spar-ortopt-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[level]
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3  # the "hardware-specific optimised model" warning is expected here
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in (*FUSED_OP_TYPES, "Softmax"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    counts["fused"] = sum(v for k, v in counts.items() if k in FUSED_OP_TYPES)
    return counts


# --------------------------------------------------------------------------- ort-fusion
def apply_ort_fusions(source: str | Path, out: str | Path) -> dict[str, int]:
    """``source`` (a dynamo export, possibly with external data) rewritten by onnxscript's ORT fusion
    rewriter into ``out`` as one self-contained file (the manifest hashes one file); returns the
    fusions applied."""
    try:
        import onnx
        import onnx_ir as ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort
    except ImportError as exc:
        raise ExportError(f"attention mode 'ort-fusion' needs onnxscript at export time ({exc}); "
                          "`pip install onnxscript`, or export with --attention mha") from None
    model, counts = optimize_for_ort(ir.load(str(source)))
    proto = ir.to_proto(model)
    onnx.load_external_data_for_model(proto, str(Path(source).parent))
    onnx.save(proto, str(out))
    return {k: int(v) for k, v in counts.items() if v}
