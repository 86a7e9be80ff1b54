"""INT8 settings for ``spar-bench quant --int8-settings``: static vs dynamic, per-channel vs
per-tensor, s8 vs u8 activations, reduce-range, on the shipped student.

Why measure rather than follow a rule: ONNX Runtime's x86 kernels multiply u8 activations by s8
weights with ``vpmaddubsw``, whose 16-bit intermediate sums can saturate on CPUs without VNNI
(ORT's docstring therefore suggests u8 activations with ``reduce_range``, 7-bit weights); s8 x s8
is widened first, a little slower but exact. Whether any of it pays at this model's widths, where
the float attention and the Q/DQ ops around each MatMul weigh as much as the MatMuls, is what the
rows say. Every graph is exported once and quantized here with one setting changed at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.errors import BenchError
from benchmarks.quant_rows import BenchEntry, TimedRows, count_params
from export.parity import PRIMARY_METRICS, onnx_runner

if TYPE_CHECKING:
    from export.deploy_model import DeployModel
    from train.data import WindowSet


@dataclass(frozen=True)
class Int8Setting:
    name: str
    kind: str  # static | dynamic
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the quantize function

    @property
    def label(self) -> str:
        return f"ORT INT8 student, {self.name}"


SHIPPED_SETTING = "static s8s8 per-channel"
INT8_SETTINGS = (
    Int8Setting(SHIPPED_SETTING, "static", {"activations": "s8", "per_channel": True}),
    Int8Setting("static s8s8 per-tensor", "static", {"activations": "s8", "per_channel": False}),
    Int8Setting("static u8s8 per-channel", "static", {"activations": "u8", "per_channel": True}),
    Int8Setting("static u8s8 per-channel reduce-range", "static",
                {"activations": "u8", "per_channel": True, "reduce_range": True}),
    Int8Setting("dynamic u8s8 per-tensor", "dynamic", {"weights": "s8", "per_channel": False}),
    Int8Setting("dynamic u8s8 per-channel", "dynamic", {"weights": "s8", "per_channel": True}),
    Int8Setting("dynamic u8u8 reduce-range", "dynamic", {"weights": "u8", "reduce_range": True}),
)


def int8_setting_entries(student: DeployModel, fp32_path: str | Path, windows: WindowSet, calib_indices,
                         workdir: str | Path, *, threads: int = 1,
                         settings: Sequence[Int8Setting] = INT8_SETTINGS) -> list[BenchEntry]:
    """One INT8 row per setting, all quantized from the same FP32 graph ``fp32_path``."""
    from export.errors import ExportError
    from export.quant_int8 import quantize_dynamic_int8, quantize_static_int8

    params = count_params(student)
    entries = []
    for i, setting in enumerate(settings):
        out = Path(workdir) / f"int8-setting-{i}.onnx"
        try:
            if setting.kind == "static":
                quantize_static_int8(fp32_path, out, windows, calib_indices, **setting.options)
            else:
                quantize_dynamic_int8(fp32_path, out, **setting.options)
        except ExportError as exc:
            raise BenchError(f"INT8 setting {setting.name}: {exc}") from None
        entries.append(BenchEntry(setting.label, onnx_runner(out, threads, student.output_names), params,
                                  out.stat().st_size, student))
    return entries


def int8_settings_markdown(report: TimedRows, fp32_label: str,
                           settings: Sequence[Int8Setting] = INT8_SETTINGS) -> list[str]:
    """The "INT8 settings" section: speed-up over the FP32 graph and metric of each setting."""
    labels = {e.label: e for e in report.entries}
    fp32 = labels[fp32_label]
    keys = [f"{task}/{metric}" for task, (metric, _) in PRIMARY_METRICS.items() if f"{task}/{metric}" in fp32.metrics]
    lines = ["## INT8 settings (issue 20)", "",
             f"The shipped student's FP32 graph quantized with one setting changed at a time (static: MinMax on the "
             f"same calibration windows; dynamic: activations quantized per batch at run time). Speed-up = p50 of "
             f"`{fp32_label}` / p50 of the row; rows above, timed interleaved with the rest.", ""]
    head = ["setting", "file MiB"] + [f"b{b} p50 ms" for b in report.batches]
    head += [f"vs FP32 b{b}" for b in report.batches] + keys
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting in settings:
        row = labels.get(setting.label)
        if row is None:
            continue
        cells = [setting.name + (" (shipped)" if setting.name == SHIPPED_SETTING else ""),
                 f"{row.file_bytes / 2 ** 20:.3f}"]
        cells += [f"{row.p(b, 50):.2f}" for b in report.batches]
        cells += [f"{fp32.p(b, 50) / row.p(b, 50):.2f}x" for b in report.batches]
        cells += [f"{row.metrics[k]:.4g}" if k in row.metrics else "–" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
