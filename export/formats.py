"""The export formats, in one table that the exporter, its CLI help and the README read.

Each row says what file a format produces, with which precision and attention, which command makes
it from what, and which runtime backend of the aggregator runs it (``edge_runtime.inference`` keeps
the backend side of the table: which backends exist and what they need installed).

Attention (``export.attention``): ``model.onnx`` and its INT8 carry the default fused attention op,
which ONNX Runtime runs faster than the split graph; when that op is one TensorRT 10 cannot parse
(ONNX Runtime's contrib MultiHeadAttention; the opset-23 Attention before TensorRT 10.14), the
``-plain`` rows are the split-attention graphs that TensorRT engines are built from.
"""

from __future__ import annotations

from dataclasses import dataclass

from export.attention import DEFAULT_ATTENTION, FUSED_OPS

_FUSED = f"fused ({FUSED_OPS[DEFAULT_ATTENTION][0]})" if FUSED_OPS[DEFAULT_ATTENTION] else "plain"
_PLAIN = "plain (MatMul/Softmax)"


@dataclass(frozen=True)
class ExportFormat:
    name: str
    file: str  # artifact name inside the output folder
    artifact_format: str  # manifest artifact.format: onnx | tensorrt
    precision: str  # fp32 | int8 | fp16
    command: str  # the spar-export subcommand that writes it
    made_from: str
    backends: tuple[str, ...]  # aggregator backends that run it
    requires: tuple[str, ...]  # Python packages the export needs
    attention: str = _PLAIN  # how attention is written in the graph (engines: as in their source)


FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat("onnx", "model.onnx", "onnx", "fp32", "onnx", "fine-tuned or distilled checkpoint(s)",
                 ("onnxruntime",), ("torch", "onnx"), _FUSED),
    ExportFormat("onnx-plain", "model.plain.onnx", "onnx", "fp32", "onnx", "the same checkpoint(s), beside model.onnx",
                 ("tensorrt", "onnxruntime"), ("torch", "onnx"), _PLAIN),
    ExportFormat("onnx-int8", "model.int8.onnx", "onnx", "int8", "quantize", "model.onnx + calibration windows",
                 ("onnxruntime",), ("onnx", "onnxruntime"), _FUSED),
    ExportFormat("onnx-int8-dynamic", "model.int8.dynamic.onnx", "onnx", "int8", "quantize",
                 "model.onnx (weights only; activations quantized per batch at run time)", ("onnxruntime",),
                 ("onnx", "onnxruntime"), _FUSED),
    ExportFormat("onnx-int8-plain", "model.plain.int8.onnx", "onnx", "int8", "quantize",
                 "model.plain.onnx + calibration windows", ("tensorrt", "onnxruntime"), ("onnx", "onnxruntime"),
                 _PLAIN),
    ExportFormat("engine-fp16", "model.fp16.trt.engine", "tensorrt", "fp16", "engine", "model.plain.onnx",
                 ("tensorrt",), ("tensorrt", "cuda-python")),
    ExportFormat("engine-int8", "model.int8.trt.engine", "tensorrt", "int8", "engine",
                 "model.plain.int8.onnx (Q/DQ)", ("tensorrt",), ("tensorrt", "cuda-python")),
)


def export_format(name: str) -> ExportFormat:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise KeyError(f"unknown export format {name!r}; known: {', '.join(f.name for f in FORMATS)}")


def formats_markdown() -> str:
    lines = ["| format | file | precision | attention | made by | from | runs on | needs |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {f.name} | `{f.file}` | {f.precision} | {f.attention} | `spar-export {f.command}` | {f.made_from} | "
              f"{', '.join(f.backends)} | {', '.join(f.requires)} |" for f in FORMATS]
    return "\n".join(lines)
