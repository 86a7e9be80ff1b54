"""The export formats, in one table that the exporter, its CLI help and the README read.

Each row says what file a format produces, with which precision, which command makes it from
what, and which runtime backend of the aggregator runs it (``edge_runtime.inference`` keeps the
backend side of the table: which backends exist and what they need installed).
"""

from __future__ import annotations

from dataclasses import dataclass


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


FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat("onnx", "model.onnx", "onnx", "fp32", "onnx", "fine-tuned or distilled checkpoint(s)",
                 ("onnxruntime", "tensorrt"), ("torch", "onnx")),
    ExportFormat("onnx-int8", "model.int8.onnx", "onnx", "int8", "quantize", "model.onnx + calibration windows",
                 ("onnxruntime", "tensorrt"), ("onnx", "onnxruntime")),
    ExportFormat("engine-fp16", "model.fp16.trt.engine", "tensorrt", "fp16", "engine", "model.onnx",
                 ("tensorrt",), ("tensorrt", "cuda-python")),
    ExportFormat("engine-int8", "model.int8.trt.engine", "tensorrt", "int8", "engine", "model.int8.onnx (Q/DQ)",
                 ("tensorrt",), ("tensorrt", "cuda-python")),
)


def export_format(name: str) -> ExportFormat:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise KeyError(f"unknown export format {name!r}; known: {', '.join(f.name for f in FORMATS)}")


def formats_markdown() -> str:
    lines = ["| format | file | precision | made by | from | runs on | needs |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {f.name} | `{f.file}` | {f.precision} | `spar-export {f.command}` | {f.made_from} | "
              f"{', '.join(f.backends)} | {', '.join(f.requires)} |" for f in FORMATS]
    return "\n".join(lines)
