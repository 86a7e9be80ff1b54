"""Graph surgery and inspection for INT8 quantization: which nodes stay float, and what was quantized.

Quantization addresses nodes by name, so this module finds them on the ONNX graph itself (no torch,
no calibration data): the regression readouts whose outputs are positions in metres
(``regression_tail_nodes``), the activation x activation MatMuls of attention
(``activation_matmuls``), and afterwards which MatMul/Gemm really read dequantized inputs
(``summarize_graph``). ``detach_shape_reads`` is the one rewrite of a quantized graph: it lets ONNX
Runtime fuse DequantizeLinear -> MatMul into an integer kernel. Why each exclusion exists is in the
docstring of ``export.quantize``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.errors import ExportError
from spar_wire.model_manifest import ModelManifest

DEFAULT_OP_TYPES = ("MatMul", "Gemm")
# Outputs in metres (besides any output a manifest marks "regression").
POSITION_OUTPUTS = ("position", "hypocentre", "detection_positions")
_LINEAR_OPS = ("MatMul", "Gemm")
_INTEGER_LINEAR_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm")


def load_onnx(path: str | Path) -> Any:
    """The ONNX model (``onnx.ModelProto``) at ``path``; ExportError for a missing file or one that is not ONNX."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ExportError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node or not model.graph.output:
        raise ExportError(f"{path}: not an ONNX model (no graph)")
    return model


def regression_tail_nodes(model: Any, outputs: Sequence[str]) -> list[str]:
    """Names of the nodes between each of ``outputs`` and the first MatMul/Gemm met walking the graph
    backwards from it (that MatMul/Gemm included), on every path: the readout of a regression output
    and the float post-processing after it (de-normalisation to metres). Paths that reach a graph
    input without a MatMul/Gemm (e.g. the position frame) are kept too; only MatMul/Gemm ever get
    quantized, so excluding them changes nothing."""
    producer = {out: node for node in model.graph.node for out in node.output}
    excluded: list[str] = []
    seen: set[int] = set()
    stack = [producer[name] for name in outputs if name in producer]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        excluded.append(node.name)
        if node.op_type in _LINEAR_OPS:
            continue  # the regression layer itself: stop here on this path
        stack += [producer[i] for i in node.input if i in producer]
    return excluded


def activation_matmuls(model: Any) -> list[str]:
    """MatMuls whose second input is not a weight (attention scores and their product with values)."""
    constant = {i.name for i in model.graph.initializer}
    constant |= {out for n in model.graph.node if n.op_type == "Constant" for out in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in constant]


def regression_outputs(model: Any, manifest: ModelManifest | None = None) -> list[str]:
    """Graph outputs that are positions: kind "regression" in the manifest, or a known position name."""
    names = {o.name for o in model.graph.output}
    found = {name for name in POSITION_OUTPUTS if name in names}
    if manifest is not None:
        found |= {o.name for o in manifest.outputs if o.kind == "regression" and o.name in names}
    return sorted(found)


def name_nodes(model: Any) -> None:
    """Give every unnamed node a unique name (exclusion lists address nodes by name); in place."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def detach_shape_reads(model: Any) -> int:
    """Let ``Shape`` nodes read the float tensor instead of its DequantizeLinear copy.

    The exporter reads shapes of tensors that also feed a MatMul; after QDQ insertion those
    ``Shape`` nodes hang off the DequantizeLinear, which then has several consumers, and ONNX
    Runtime only fuses DQ -> MatMul -> (Q) into an integer kernel when the DQ feeds the MatMul alone:
    the MatMul ran dequantized, in float. A shape is the same either way. Returns how many inputs moved.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    moved = 0
    for node in model.graph.node:
        if node.op_type != "Shape":
            continue
        dq = producer.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue  # a weight's DQ: no float tensor to point at
        node.input[0] = q.input[0]
        moved += 1
    return moved


@dataclass(frozen=True)
class GraphSummary:
    """What quantization did to a graph: linear ops fed by DequantizeLinear vs left float."""

    quantized: tuple[str, ...]  # MatMul/Gemm whose inputs come from DequantizeLinear
    float_linear: tuple[str, ...]  # MatMul/Gemm left in float
    quantized_other: tuple[str, ...]  # any other op type fed by DequantizeLinear (should be empty)
    op_counts: dict[str, int] = field(default_factory=dict)


def summarize_graph(path_or_model: str | Path | Any) -> GraphSummary:
    """Which MatMul/Gemm read DequantizeLinear outputs (or are integer ops), which stay float, and
    which other ops read dequantized values (none with the defaults), from a path or ModelProto."""
    model = load_onnx(path_or_model) if isinstance(path_or_model, (str, Path)) else path_or_model
    producer = {out: node for node in model.graph.node for out in node.output}
    quantized, float_linear, other = [], [], []
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        fed = any(i in producer and producer[i].op_type == "DequantizeLinear" for i in node.input)
        if node.op_type in _INTEGER_LINEAR_OPS or (node.op_type in _LINEAR_OPS and fed):
            quantized.append(node.name)
        elif node.op_type in _LINEAR_OPS:
            float_linear.append(node.name)
        elif fed and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            other.append(node.name)
    return GraphSummary(tuple(quantized), tuple(float_linear), tuple(other), dict(sorted(counts.items())))
