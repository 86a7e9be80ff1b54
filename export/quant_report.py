"""The INT8 parity report: what ``export.quantize.quantize`` wrote and how it compares with FP32.

One record (``QuantReport``) holds everything a reviewer needs to accept an INT8 graph: the settings,
which linear ops were quantized and which stayed float, torch FP32 vs ONNX Runtime FP32 (the export
itself) and vs INT8 (the quantization), the dynamic INT8 graph for comparison and the calibration
methods tried. It renders to ``parity-int8.md`` (``export.formats.report_name``) and gives the
manifest its metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.onnx_export import ParityReport
from export.quant_candidates import CalibrationChoice, Candidate
from export.quant_graph import GraphSummary


@dataclass
class QuantReport:
    """What ``quantize`` wrote and how the INT8 graph compares with FP32 (torch and ORT)."""

    fp32_path: Path
    int8_path: Path
    manifest_path: Path
    report_path: Path
    method: str
    settings: dict[str, Any]
    parity_fp32: ParityReport  # torch FP32 vs ORT FP32
    parity_int8: ParityReport  # torch FP32 vs ORT INT8 (static QDQ)
    agreement_int8: dict[str, float]
    graph: GraphSummary
    excluded_linear: tuple[str, ...]
    file_bytes: dict[str, int]
    calibration: CalibrationChoice | None = None
    dynamic: Candidate | None = None
    parity_dynamic: ParityReport | None = None
    calib_windows: int = 0
    eval_windows: int = 0

    @property
    def metric(self) -> dict[str, Any]:
        """The manifest's metric entry: INT8 metrics on the held-out windows."""
        return {**self.parity_int8.metrics_candidate, "windows": self.eval_windows, "precision": "int8"}

    def to_markdown(self) -> str:
        fp32_mb, int8_mb = self.file_bytes["fp32"] / 2 ** 20, self.file_bytes["int8"] / 2 ** 20
        lines = [
            "# INT8 parity", "",
            f"FP32 `{self.fp32_path.name}` ({fp32_mb:.2f} MiB) -> INT8 `{self.int8_path.name}` ({int8_mb:.2f} MiB); "
            f"calibrated on {self.calib_windows} real windows with **{self.method}**, measured on "
            f"{self.eval_windows} held-out windows.", "",
            "settings: " + "; ".join(f"{k}={v}" for k, v in self.settings.items()), "",
            f"quantized MatMul/Gemm: {len(self.graph.quantized)}; left float: {len(self.graph.float_linear)} "
            f"(regression readouts kept float: {', '.join(self.excluded_linear) or 'none'}); "
            "other ops reading a DequantizeLinear output: "
            + (", ".join(self.graph.quantized_other) if self.graph.quantized_other else
               "none (LayerNormalization, Softmax and the residual Adds run in float on float inputs)") + ".", "",
            "## torch FP32 vs ONNX Runtime FP32", "", self.parity_fp32.to_markdown("torch FP32", "ORT FP32"),
            "## torch FP32 vs ONNX Runtime INT8 (static QDQ)", "",
            self.parity_int8.to_markdown("torch FP32", "ORT INT8"),
            "| agreement with FP32 | INT8 |" + (" INT8 dynamic |" if self.dynamic else ""),
            "|---|---|" + ("---|" if self.dynamic else ""),
        ]
        for key, value in self.agreement_int8.items():
            row = f"| {key} | {value:.4g} |"
            if self.dynamic:
                row += f" {self.dynamic.agreement.get(key, float('nan')):.4g} |"
            lines.append(row)
        if self.dynamic and self.parity_dynamic:
            lines += ["", "## torch FP32 vs ONNX Runtime INT8 dynamic (MatMul weights only, for comparison)", "",
                      f"`{self.dynamic.path.name}` ({self.dynamic.file_bytes / 2 ** 20:.2f} MiB)", "",
                      self.parity_dynamic.to_markdown("torch FP32", "ORT INT8 dynamic")]
        if self.calibration:
            lines += ["## Calibration methods", "", self.calibration.to_markdown()]
        return "\n".join(lines) + "\n"
