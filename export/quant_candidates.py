"""Measuring and ranking quantized graphs against torch FP32 on held-out windows.

Which calibration method is best depends on the model and the data, and the obvious proxy (output
error) is not what a deployment cares about, so every candidate graph is run in ONNX Runtime on
held-out windows and ranked by the loss of each task's primary metric first (accuracy, mAP, mean
distance), then by how close its outputs stay to FP32 (``Candidate.key``). ``choose_calibration``
quantizes once per method and keeps the best.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.deploy_model import DeployModel
from export.errors import ExportError
from export.onnx_export import ParityReport
from export.parity import (
    PRIMARY_METRICS,
    Indices,
    agreement,
    check_windows,
    collect_outputs,
    onnx_runner,
    parity_from_outputs,
    torch_runner,
)
from export.quant_calibration import METHODS, calibration_method, check_indices
from export.quant_int8 import quantize_static_int8
from train.data import WindowSet

# Primary-metric losses up to this (1 accuracy / mAP point, or 1 % of a mean distance) rank as ties.
TASK_LOSS_TOLERANCE = 0.01


@dataclass
class Candidate:
    """One quantized graph measured against torch FP32 on held-out windows."""

    label: str
    path: Path
    file_bytes: int
    max_abs_error: dict[str, float]
    agreement: dict[str, float]
    metrics: dict[str, float]  # "task/metric"
    task_loss: float  # primary-metric loss vs FP32 (0 when not worse), summed over tasks
    rel_error: float  # mean over outputs of RMS(candidate - FP32) / RMS spread of FP32
    seconds: float = 0.0  # time to quantize

    @property
    def key(self) -> tuple[float, float]:
        """Ranking: least task-metric loss beyond ``TASK_LOSS_TOLERANCE`` first (smaller losses are
        noise on a held-out set of a few dozen windows), then the closest outputs."""
        return (round(max(self.task_loss - TASK_LOSS_TOLERANCE, 0.0), 9), self.rel_error)


def _task_loss(model: DeployModel, reference: Mapping[str, float], candidate: Mapping[str, float]) -> float:
    """Sum over tasks of how much worse the candidate's primary metric is than FP32's: absolute for
    scores in [0, 1] (accuracy, mAP), relative for distances (metres / FP32 metres)."""
    loss = 0.0
    for task in model.heads:
        name, higher_better = PRIMARY_METRICS[task]
        key = f"{task}/{name}"
        ref, got = reference.get(key, float("nan")), candidate.get(key, float("nan"))
        if not (np.isfinite(ref) and np.isfinite(got)):
            continue
        worse = (ref - got) if higher_better else (got - ref) / max(abs(ref), 1e-9)
        loss += max(0.0, worse)
    return loss


def measure_candidate(label: str, path: Path, model: DeployModel, reference: Mapping[str, np.ndarray],
                      windows: WindowSet, eval_indices: Indices, *, threads: int | None = None,
                      seconds: float = 0.0) -> tuple[Candidate, ParityReport]:
    """Run ``path`` in ORT on ``eval_indices`` and compare with ``reference`` (torch FP32 outputs, one
    array per graph output with the windows on axis 0, as ``collect_outputs`` returns them)."""
    outputs = collect_outputs(model, onnx_runner(path, threads, model.output_names), windows, eval_indices)
    parity = parity_from_outputs(model, reference, outputs, windows, eval_indices)
    agree = agreement(model, reference, outputs)
    rel = [v for k, v in agree.items() if k.endswith("/rel_rms")]
    candidate = Candidate(label, Path(path), Path(path).stat().st_size, parity.max_abs_error, agree,
                          parity.metrics_candidate, _task_loss(model, parity.metrics_reference,
                                                               parity.metrics_candidate),
                          float(np.mean(rel)) if rel else 0.0, seconds)
    return candidate, parity


@dataclass
class CalibrationChoice:
    """The calibration methods tried, each measured on held-out windows, and the one picked."""

    best: str
    candidates: list[Candidate]
    reference_metrics: dict[str, float]
    calib_windows: int
    eval_windows: int

    @property
    def best_candidate(self) -> Candidate:
        return next(c for c in self.candidates if c.label == self.best)

    def to_markdown(self) -> str:
        keys = list(self.reference_metrics)
        agree_keys = sorted({k for c in self.candidates for k in c.agreement if not k.endswith("/rel_rms")})
        head = ["method", "task loss", "mean rel. RMS error", *agree_keys, *keys, "quantize s"]
        lines = [f"calibration on {self.calib_windows} windows, measured on {self.eval_windows} held-out windows "
                 f"against torch FP32; ranked by primary task-metric loss (ties up to {TASK_LOSS_TOLERANCE:g}), "
                 f"then mean relative RMS output error; picked: **{self.best}**", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines.append("| torch FP32 | | | " + " | ".join("" for _ in agree_keys) + (" | " if agree_keys else "")
                     + " | ".join(f"{self.reference_metrics[k]:.4g}" for k in keys) + " | |")
        for c in sorted(self.candidates, key=lambda c: c.key):
            cells = [c.label, f"{c.task_loss:.4g}", f"{c.rel_error:.4g}",
                     *(f"{c.agreement.get(k, float('nan')):.4g}" for k in agree_keys),
                     *(f"{c.metrics.get(k, float('nan')):.4g}" for k in keys), f"{c.seconds:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def choose_calibration(fp32_path: str | Path, out_dir: str | Path, windows: WindowSet, calib_indices: Indices,
                       eval_indices: Indices, model: DeployModel, *, methods: Sequence[str] = METHODS,
                       threads: int | None = None, reference: Mapping[str, np.ndarray] | None = None,
                       **quant_options: Any) -> CalibrationChoice:
    """Quantize with each of ``methods`` into ``out_dir/<method>.onnx``, measure each against torch
    FP32 on ``eval_indices`` and pick the best (least primary-metric loss, then the smallest mean
    relative output error). ``quant_options`` go to ``quantize_static_int8``."""
    if not methods:
        raise ExportError("give at least one calibration method")
    for method in methods:
        calibration_method(method)
    check_windows(model, windows)
    eval_idx = check_indices(eval_indices, len(windows), "evaluation")
    calib_idx = check_indices(calib_indices, len(windows), "calibration")
    out_dir = Path(out_dir)
    if reference is None:
        reference = collect_outputs(model, torch_runner(model), windows, eval_idx)
    candidates, metrics_ref = [], {}
    for method in methods:
        start = time.perf_counter()
        path = quantize_static_int8(fp32_path, out_dir / f"{method}.onnx", windows, calib_idx, method=method,
                                    **quant_options)
        candidate, parity = measure_candidate(method, path, model, reference, windows, eval_idx, threads=threads,
                                              seconds=time.perf_counter() - start)
        candidates.append(candidate)
        metrics_ref = parity.metrics_reference
    best = min(candidates, key=lambda c: c.key)
    return CalibrationChoice(best.label, candidates, metrics_ref, int(calib_idx.size), int(eval_idx.size))
