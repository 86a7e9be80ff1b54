"""The export formats, in one table that the exporter, its CLI help and the docs read.

Each row says what file a format produces (and what is written beside it: manifest, parity report,
build record), with which precision and attention, which command makes it from what, and which
runtime backend of the aggregator runs it (``edge_runtime.inference`` keeps the backend side of the
table: which backends exist and what they need installed).

Attention (``export.attention``): ``model.onnx`` and its INT8 carry the default fused attention op,
which ONNX Runtime runs faster than the split graph; when that op is one TensorRT 10 cannot parse
(ONNX Runtime's contrib MultiHeadAttention; the opset-23 Attention before TensorRT 10.14), the
``-plain`` rows are the split-attention graphs that TensorRT engines are built from.

Why one table: file names are an interface (the aggregator, the benchmarks and people look for
them), and a name spelled in two places drifts. The exporter, ``spar-export quantize`` and
``spar-export engine`` take their names from here: the rows for the files of a model folder, and
the naming rules below (``manifest_name``, ``int8_name``, ...) for an artifact the user named
freely; ``tests/export/test_formats.py`` checks that the rules reproduce the rows. The CLI's
``--help`` and ``docs/formats.md`` are rendered from the rows (``python -m export.formats --markdown``
prints the Markdown).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import PurePath

from export.attention import DEFAULT_ATTENTION, FUSED_OPS

_FUSED = f"fused ({FUSED_OPS[DEFAULT_ATTENTION][0]})" if FUSED_OPS[DEFAULT_ATTENTION] else "plain"
_PLAIN = "plain (MatMul/Softmax)"
MANIFEST = "manifest.json"  # the manifest of the default artifact (the first row); others: <stem>.manifest.json


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
    report: str | None = None  # parity report written beside it (None: it has none of its own)

    @property
    def manifest(self) -> str:
        return manifest_name(self.file)

    @property
    def build_record(self) -> str | None:
        """The build record beside an engine (``spar-export engine`` writes one); None for ONNX."""
        return build_record_name(self.file) if self.artifact_format == "tensorrt" else None

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the format puts in the model folder: artifact, manifest, then report or build record."""
        return tuple(f for f in (self.file, self.manifest, self.report, self.build_record) if f is not None)


# The files other rows are made from, named once.
_ONNX, _ONNX_PLAIN, _INT8_PLAIN = "model.onnx", "model.plain.onnx", "model.plain.int8.onnx"

FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat("onnx", _ONNX, "onnx", "fp32", "onnx", "fine-tuned or distilled checkpoint(s)",
                 ("onnxruntime",), ("torch", "onnx"), _FUSED, "parity-onnx.md"),
    ExportFormat("onnx-plain", _ONNX_PLAIN, "onnx", "fp32", "onnx", f"the same checkpoint(s), beside {_ONNX}",
                 ("tensorrt", "onnxruntime"), ("torch", "onnx"), _PLAIN, "parity-onnx.plain.md"),
    ExportFormat("onnx-int8", "model.int8.onnx", "onnx", "int8", "quantize", f"{_ONNX} + calibration windows",
                 ("onnxruntime",), ("onnx", "onnxruntime"), _FUSED, "parity-int8.md"),
    ExportFormat("onnx-int8-dynamic", "model.int8.dynamic.onnx", "onnx", "int8", "quantize",
                 f"{_ONNX} (weights only; activations quantized per batch at run time)", ("onnxruntime",),
                 ("onnx", "onnxruntime"), _FUSED),
    ExportFormat("onnx-int8-plain", _INT8_PLAIN, "onnx", "int8", "quantize",
                 f"{_ONNX_PLAIN} + calibration windows", ("tensorrt", "onnxruntime"), ("onnx", "onnxruntime"),
                 _PLAIN, "parity-int8.plain.md"),
    ExportFormat("onnx-int8-plain-dynamic", "model.plain.int8.dynamic.onnx", "onnx", "int8", "quantize",
                 f"{_ONNX_PLAIN} (weights only; written beside {_INT8_PLAIN} for comparison)",
                 ("onnxruntime",), ("onnx", "onnxruntime"), _PLAIN),
    ExportFormat("engine-fp16", "model.fp16.trt.engine", "tensorrt", "fp16", "engine", _ONNX_PLAIN,
                 ("tensorrt",), ("tensorrt", "cuda-python")),
    ExportFormat("engine-int8", "model.int8.trt.engine", "tensorrt", "int8", "engine",
                 f"{_INT8_PLAIN} (Q/DQ)", ("tensorrt",), ("tensorrt", "cuda-python")),
)


def export_format(name: str) -> ExportFormat:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise KeyError(f"unknown export format {name!r}; known: {', '.join(f.name for f in FORMATS)}")


def format_of_file(file: str) -> ExportFormat | None:
    """The row whose artifact is called ``file`` (a bare file name), or None for a name outside the table."""
    return next((fmt for fmt in FORMATS if fmt.file == file), None)


# --------------------------------------------------------------------------- naming rules
# For artifacts named by the user (``--out``, benchmarks' scratch files); on the table's own names
# they give the table's names (tests/export/test_formats.py).
def manifest_name(artifact: str) -> str:
    """``manifest.json`` for the default artifact (``model.onnx``), else ``<stem>.manifest.json``
    (several artifacts can share a folder)."""
    return MANIFEST if artifact == FORMATS[0].file else f"{PurePath(artifact).stem}.manifest.json"


def report_name(artifact: str) -> str:
    """The parity report beside ``artifact``: the table's (parity-int8.md for model.int8.onnx,
    parity-int8.plain.md for the TensorRT source model.plain.int8.onnx; both live in one model folder),
    else ``parity-<stem>.md``."""
    fmt = format_of_file(artifact)
    if fmt is not None and fmt.report is not None:
        return fmt.report
    return f"parity-{PurePath(artifact).stem}.md"


def int8_name(fp32: str) -> str:
    """The static INT8 graph of an FP32 graph: ``model.onnx`` -> ``model.int8.onnx``."""
    return f"{PurePath(fp32).stem}.int8.onnx"


def dynamic_name(int8: str) -> str:
    """The dynamic INT8 graph written beside a static one: ``model.int8.onnx`` -> ``model.int8.dynamic.onnx``."""
    return f"{PurePath(int8).stem}.dynamic.onnx"


def engine_name(source: str, precision: str) -> str:
    """``model.onnx`` -> ``model.fp16.trt.engine``; ``model.int8.onnx`` -> ``model.int8.trt.engine``;
    ``model.plain.onnx`` and ``model.plain.int8.onnx`` likewise.

    The ``.trt`` part keeps the engine's manifest (``<stem>.manifest.json``) from landing on the
    source ONNX's own manifest.
    """
    # model.plain[.int8].onnx (the TensorRT source beside a fused-attention model.onnx) gives the same
    # engine names as a plain model.onnx would: the formats table names one engine file per precision
    stem = PurePath(source).stem.replace(".plain", "")
    base = stem if stem.endswith(f".{precision}") else f"{stem}.{precision}"
    return f"{base}.trt.engine"


def build_record_name(engine: str) -> str:
    """The build record of an engine: ``<stem>.build.json`` beside it."""
    return f"{PurePath(engine).stem}.build.json"


# --------------------------------------------------------------------------- renderings
def formats_markdown() -> str:
    """The table as Markdown (no trailing newline): what docs/formats.md holds between its markers."""
    lines = ["| format | file | written beside it | precision | attention | made by | from | runs on | needs |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {f.name} | `{f.file}` | {', '.join(f'`{x}`' for x in f.files[1:])} | {f.precision} | "
              f"{f.attention} | `spar-export {f.command}` | {f.made_from} | {', '.join(f.backends)} | "
              f"{', '.join(f.requires)} |" for f in FORMATS]
    return "\n".join(lines)


def formats_help() -> str:
    """The table as plain text for ``spar-export --help``: one line per format."""
    name_width, file_width = max(len(f.name) for f in FORMATS), max(len(f.file) for f in FORMATS)
    return "\n".join(f"  {f.name:<{name_width}} {f.file:<{file_width}} {f.precision:<5} spar-export {f.command:<9} "
                     f"runs on {', '.join(f.backends)}; attention {f.attention}" for f in FORMATS)


def main(argv: list[str] | None = None) -> int:
    """``python -m export.formats --markdown``: print the table (regenerates docs/formats.md's part)."""
    parser = argparse.ArgumentParser(prog="python -m export.formats", description="Print the export formats table.")
    parser.add_argument("--markdown", action="store_true", help="as Markdown (docs/formats.md), not plain text")
    args = parser.parse_args(argv)
    print(formats_markdown() if args.markdown else formats_help())
    return 0


if __name__ == "__main__":
    sys.exit(main())
