"""What every ``spar-bench model`` check shares, whatever the task: the configuration, running an
ONNX artifact over a recording, dropping messages, scoring every artifact and floor at each loss
rate, and the report.

The task-specific checks sit on top of it: ``model_check`` (parking-lot classification and
localization, and the dispatch by the model's outputs), ``model_check_detect`` (multi-vehicle
detection) and ``model_check_quakes`` (earthquake location). None of them imports another, so the
dispatch can name them all without an import circle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.errors import BenchError
from testbed.report_format import table_row, table_rule

ARTIFACTS = (("INT8 student", "model.int8.onnx"), ("FP32 student", "model.onnx"),
             ("FP32 teacher", "teacher/model.onnx"))


@dataclass(frozen=True)
class ModelCheckConfig:
    model_dir: Path  # folder with model.onnx, model.int8.onnx, teacher/model.onnx and manifests
    test_data: Path  # a recording the model never trained on
    train_data: Path  # the model's training recording (floors learn from its labelled windows)
    loss_rates: tuple[float, ...] = (0.0, 0.2)  # share of (node, modality) messages lost
    val_fraction: float = 0.25  # the training recording's held-out tail (not used by the floors)
    seed: int = 0
    threads: int = 2
    max_train_windows: int | None = None


def lot_box(site: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box of the site's node positions (the instrumented lot)."""
    pos = np.asarray(site["positions"], np.float64)
    return pos.min(axis=0), pos.max(axis=0)


def drop_messages(present: dict[str, np.ndarray], rate: float, seed: int) -> dict[str, np.ndarray]:
    """Each (window, node, modality) message lost with probability ``rate`` (fixed seed)."""
    rng = np.random.default_rng(seed)
    return {m: p & (rng.random(p.shape) >= rate) for m, p in sorted(present.items())}


def localization_summary(pred: np.ndarray, truth: np.ndarray, box: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """mean / median / p90 error, and the median for targets inside the lot (metres)."""
    keep = np.isfinite(truth).all(axis=1)
    err = np.linalg.norm(pred[keep] - truth[keep], axis=1)
    inside = ((truth[keep] >= box[0][: truth.shape[1]]) & (truth[keep] <= box[1][: truth.shape[1]])).all(axis=1)
    return {"mean_distance": float(err.mean()), "median_distance": float(np.median(err)),
            "p90_distance": float(np.percentile(err, 90)), "mse": float(np.mean(err ** 2)),
            "median_inside_lot": float(np.median(err[inside])) if inside.any() else float("nan"),
            "inside_lot_targets": int(inside.sum())}


def run_artifact(path: Path, windows, threads: int, batch: int = 64) -> dict[str, np.ndarray]:
    """Output name -> outputs of the ONNX model at ``path`` over every window of ``windows``, fed
    as the exporter's parity check feeds it (``export.parity.window_inputs``)."""
    from export.errors import ExportError
    from export.parity import onnx_runner, window_inputs

    run = onnx_runner(path, threads)
    names = [i.name for i in run.session.get_inputs()]
    outputs = [o.name for o in run.session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    for start in range(0, len(windows), batch):
        try:
            feed = window_inputs(windows, np.arange(start, min(len(windows), start + batch)), names)
        except ExportError as exc:
            raise BenchError(f"{path}: {exc}") from None
        for name, value in zip(outputs, run(feed), strict=True):
            parts[name].append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


# (metric key, column heading, divisor): the parking lot's columns; a seismic model's are in km.
COLUMNS = (("accuracy", "accuracy", 1.0), ("macro_f1", "macro-F1", 1.0), ("mean_distance", "mean m", 1.0),
           ("median_distance", "median m", 1.0), ("p90_distance", "p90 m", 1.0),
           ("median_inside_lot", "median m inside lot", 1.0))


@dataclass
class ModelCheckReport:
    cfg: ModelCheckConfig
    manifest: dict[str, Any]
    rows: dict[float, dict[str, dict[str, float]]]  # loss rate -> row name -> metrics
    machine: str
    test_windows: int
    train_windows: int
    targets: list[tuple[str, str, bool]] = field(default_factory=list)  # (what, measured, met)
    columns: tuple[tuple[str, str, float], ...] = COLUMNS
    notes: tuple[str, ...] = ()  # lines under the intro (what the floors are)

    def to_markdown(self) -> str:
        model = self.manifest.get("model", {})
        lines = ["# spar-bench model", "", f"machine: {self.machine}", "",
                 f"model: {model.get('name', '?')} {model.get('version', '?')} ({self.cfg.model_dir}); "
                 f"{training_summary(self.manifest.get('training', {}))}", "",
                 f"Test recording: {self.test_windows} windows of `{self.cfg.test_data}` (another seed; never "
                 f"trained on). Floors fitted on the {self.train_windows} labelled training windows of "
                 f"`{self.cfg.train_data}`. Every model runs in ONNX Runtime ({self.cfg.threads} thread(s)), as "
                 "the aggregator runs it. Lost messages: each (node, modality) message dropped independently.", "",
                 *[line for note in self.notes for line in (note, "")]]
        for rate, rows in self.rows.items():
            lines += [f"## {rate:.0%} of messages lost", "",
                      table_row(["model", *(label for _, label, _ in self.columns)]),
                      table_rule(1 + len(self.columns))]
            for name, m in rows.items():
                lines.append(table_row([name, *(_cell(m, k, scale) for k, _, scale in self.columns)]))
            lines.append("")
        lines += ["## Targets (the shipped INT8 model, complete windows)", "", table_row(["target", "measured", "met"]),
                  table_rule(3)]
        lines += [table_row([what, measured, "yes" if met else "**no**"]) for what, measured, met in self.targets]
        lines += ["", f"Reproduce: `spar-bench model --model {self.cfg.model_dir} --test {self.cfg.test_data} "
                  f"--train {self.cfg.train_data}`.", ""]
        return "\n".join(lines)


def training_summary(training: dict[str, Any]) -> str:
    """The manifest's training block in words."""
    if not training:
        return "budget not recorded in the manifest"
    return (f"trained with the `{training.get('budget', '?')}` budget, teacher fine-tuning "
            f"`{training.get('teacher_fine_tuning', '?')}`, commit {training.get('commit', '?')}")


def _cell(metrics: dict[str, float], key: str, scale: float = 1.0) -> str:
    """One metric of a row: scores to three decimals, distances divided by ``scale`` (m -> km)."""
    if key not in metrics:
        return ""
    if key in ("accuracy", "macro_f1") or key.startswith("mAP@"):
        return f"{metrics[key]:.3f}"
    return f"{metrics[key] / scale:.2f}"


def artifact_rows(manifest: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(row name, file) of a model folder's artifacts; a model shipped without distillation is the
    teacher itself, and its rows say so."""
    if manifest.get("training", {}).get("student", True):
        return ARTIFACTS
    return (("INT8 model (the teacher)", "model.int8.onnx"), ("FP32 model (the teacher)", "model.onnx"))


def undistilled_note(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The report's line for a model shipped without a student (none otherwise)."""
    if manifest.get("training", {}).get("student", True):
        return ()
    return ("No student was distilled for this model: `model.onnx` is the chosen teacher itself (`TRAINING.md`), "
            "so there is no separate teacher row.",)


def scored_rows(cfg: ModelCheckConfig, manifest: dict[str, Any], progress: Callable[[str], None],
                floor_windows: int, score: Callable[[dict[str, np.ndarray], Any], dict[str, float]],
                floors: Callable[[Any, Any], dict[str, dict[str, float]]], floor_rows: dict[str, str]):
    """Loss rate -> row -> metrics for every artifact of the folder (``score(outputs, test windows)``)
    and every floor (``floors(train, seen)``, fitted on the first ``floor_windows`` training windows),
    on the same test windows and the same lost messages. Returns (rows, test, train)."""
    from train.data import load_windows, temporal_split

    progress(f"loading {cfg.test_data} and {cfg.train_data}")
    test = load_windows(cfg.test_data, progress=False)
    train = load_windows(cfg.train_data, limit=cfg.max_train_windows, progress=False)
    train_idx, _ = temporal_split(len(train), cfg.val_fraction)
    train = train.subset(train_idx[:floor_windows])
    rows: dict[float, dict[str, dict[str, float]]] = {}
    for rate in cfg.loss_rates:
        seen = with_present(test, drop_messages(test.present, rate, cfg.seed)) if rate > 0 else test
        rows[rate] = {}
        for name, rel in artifact_rows(manifest):
            path = cfg.model_dir / rel
            if path.exists():
                progress(f"{name} ({rel}), {rate:.0%} lost")
                rows[rate][name] = score(run_artifact(path, seen, cfg.threads), test)
        progress(f"floors, {rate:.0%} lost")
        for floor, metrics in floors(train, seen).items():
            rows[rate][floor_rows[floor]] = metrics
    return rows, test, train


def with_present(windows: Any, present: dict[str, np.ndarray]) -> Any:
    """``windows`` (a ``train.data.WindowSet``) with ``present`` in place of its present masks: the
    same recording, with the messages ``drop_messages`` lost."""
    return replace(windows, present=present)
