"""ONNX export of a DeployModel with dynamic batch and node count, and the torch-vs-ORT parity check.

The legacy TorchScript exporter is used (``dynamo=False``): it needs no onnxscript, keeps
LayerNorm as one ``LayerNormalization`` op at opset >= 17, and the graph is verified at several
node counts after export, since dynamic axes have been silently specialised by some exporter
versions. Attention is written as one fused op (``attention``, see ``export.attention``): by default
ONNX Runtime's MultiHeadAttention, chosen by measurement (benchmarks/results/quant.md); ``plain``
keeps the split MatMul/Softmax graph that every TensorRT 10 parses. The ``ort-fusion`` mode uses the
dynamo exporter instead, then onnxscript's ORT fusion rewriter.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.attention import (
    ATTENTION23_OPSET,
    DEFAULT_ATTENTION,
    FUSED_OPS,
    apply_ort_fusions,
    check_mode,
    fused_attention_nodes,
)
from export.deploy_model import DeployModel
from export.errors import ExportError
from export.fused_attention import attention_for_export

DEFAULT_OPSET = 17
DYNAMO_OPSET = 18  # the dynamo exporter's own default; onnxscript's ORT fusions were measured on it
PARITY_TOLERANCE = 1e-4


def example_inputs(model: DeployModel, batch: int, nodes: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Plausible random inputs (dB-like tokens, some nodes absent) for tracing and shape checks."""
    g = torch.Generator().manual_seed(seed)
    flat = []
    for s in model.encoder.cfg.modalities:
        flat.append(torch.randn(batch, nodes, s.n_tokens, s.token_dim, generator=g) * 10 - 60)
        present = torch.rand(batch, nodes, generator=g) > 0.2
        present[:, 0] = True
        flat.append(present)
    flat.append(torch.rand(batch, nodes, model.encoder.cfg.position_dims, generator=g) * 40)
    flat.append(model.example_structure(batch, nodes, g))
    return tuple(flat)


def without_nodes(inputs: tuple[torch.Tensor, ...], model: DeployModel, row: int = 0) -> tuple[torch.Tensor, ...]:
    """``inputs`` with every node of window ``row`` absent in every modality (attention rows with no
    valid key: the masked-softmax edge case a fused kernel must get right)."""
    flat = [t.clone() for t in inputs]
    for i in range(len(model.modalities)):
        flat[2 * i + 1][row] = False
    return tuple(flat)


def export_onnx(model: DeployModel, path: str | Path, *, opset: int = DEFAULT_OPSET,
                check_nodes: tuple[int, ...] = (1, 5, 16), attention: str = DEFAULT_ATTENTION) -> Path:
    """Write ``model`` as ONNX with dynamic ``batch`` and ``nodes`` axes and attention written as
    ``attention`` (``export.attention.ATTENTION_MODES``); verify it runs in ONNX Runtime at each of
    ``check_nodes`` (capped at the structural table size) within 1e-4 of torch, also on a window
    without any present node, and that a fused mode really put its fused op in the graph.
    ``attention23`` raises the opset to 23 (the Attention op's first opset)."""
    mode = check_mode(attention)
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: >= 17 keeps LayerNormalization as one op")
    if mode == "attention23":
        opset = max(opset, ATTENTION23_OPSET)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    if mode == "ort-fusion":
        with tempfile.TemporaryDirectory(prefix="spar-dynamo-") as tmp:
            raw = Path(tmp) / "dynamo.onnx"
            _export_dynamo(model, raw, max(opset, DYNAMO_OPSET))
            apply_ort_fusions(raw, path)
    else:
        dynamic = {name: {0: "batch", 1: "nodes"} for name in model.input_names}
        # An output's named dims (a node-anchored detector's "nodes") are dynamic too.
        dynamic.update({s.name: {0: "batch", **{i + 1: d for i, d in enumerate(s.dims) if isinstance(d, str)}}
                        for s in model.outputs})
        with attention_for_export(model, mode), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer chatter about shape checks that are constant by design
            torch.onnx.export(model, example_inputs(model, 2, 8), str(path), input_names=list(model.input_names),
                              output_names=list(model.output_names), dynamic_axes=dynamic, opset_version=opset,
                              dynamo=False)
    if FUSED_OPS[mode] is not None and fused_attention_nodes(path) == 0:
        raise ExportError(f"{path}: attention mode {mode!r} left no fused attention op in the graph "
                          f"(expected {FUSED_OPS[mode][0]}); the exporter or the model's attention changed")
    max_nodes = model.encoder.cfg.max_nodes
    session = onnx_session(path)
    for nodes in sorted({min(n, max_nodes) for n in check_nodes}):
        inputs = example_inputs(model, 3, nodes, seed=nodes)
        for case, feed in (("", inputs), (" with a window of absent nodes", without_nodes(inputs, model))):
            error = max_abs_error(model, path, feed, session)
            if not error <= PARITY_TOLERANCE:  # NaN fails too
                raise ExportError(f"{path}: ONNX Runtime ({mode} attention) differs from torch by {error:.3g} at "
                                  f"{nodes} nodes{case}")
    return path


def _export_dynamo(model: DeployModel, path: Path, opset: int) -> None:
    """The dynamo exporter with dynamic batch and node axes (needs onnxscript)."""
    try:
        import onnxscript  # noqa: F401  # the dynamo exporter's dependency: a clear error before it fails deep
    except ImportError as exc:
        raise ExportError(f"the dynamo exporter needs onnxscript ({exc}); `pip install onnxscript`") from None
    batch = torch.export.Dim("batch", min=1, max=1024)
    nodes = torch.export.Dim("nodes", min=1, max=max(2, model.encoder.cfg.max_nodes))
    shapes = tuple({0: batch, 1: nodes} for _ in model.input_names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, example_inputs(model, 2, 8), str(path), input_names=list(model.input_names),
                              output_names=list(model.output_names), dynamic_shapes={"inputs": shapes},
                              opset_version=opset, dynamo=True, verbose=False)
        except Exception as exc:  # torch.export / onnxscript raise many kinds; all mean "no graph"
            raise ExportError(f"dynamo export failed: {type(exc).__name__}: {str(exc)[:400]}") from exc


def onnx_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, names: tuple[str, ...], inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})


def max_abs_error(model: DeployModel, path: str | Path, inputs: tuple[torch.Tensor, ...], session=None) -> float:
    """Largest |torch - ONNX Runtime| over every output for one input tuple."""
    session = session or onnx_session(path)
    with torch.no_grad():
        expected = model(*inputs)
    got = run_onnx(session, model.input_names, inputs)
    errors = [float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected, strict=True)]
    return float("nan") if any(np.isnan(errors)) else max(errors)  # max() alone may skip a NaN


@dataclass
class ParityReport:
    """Torch vs ONNX Runtime on real windows: worst output error and the task metrics of each."""

    windows: int
    max_abs_error: dict[str, float]  # output name -> max |difference|
    metrics_reference: dict[str, float]
    metrics_candidate: dict[str, float]

    def to_markdown(self, reference: str = "torch FP32", candidate: str = "ONNX Runtime") -> str:
        lines = [f"parity on {self.windows} windows: {reference} vs {candidate}", "",
                 "| output | max abs error |", "|---|---|"]
        lines += [f"| {k} | {v:.3g} |" for k, v in self.max_abs_error.items()]
        lines += ["", f"| metric | {reference} | {candidate} |", "|---|---|---|"]
        lines += [f"| {k} | {v:.4g} | {self.metrics_candidate.get(k, float('nan')):.4g} |"
                  for k, v in self.metrics_reference.items()]
        return "\n".join(lines) + "\n"
