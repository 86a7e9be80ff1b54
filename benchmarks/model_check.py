"""``spar-bench model``: is the shipped model right? Its ONNX artifacts against the simple floors on a
recording it never trained on, with complete windows and with lost messages.

Every artifact of a model folder (the INT8 student, the FP32 student, the teacher in ``teacher/``)
runs in ONNX Runtime, exactly as the aggregator runs it, on the test recording (another seed of
the same scenario). The floors (``train.floors``) are fitted on the labelled windows of the
model's own training recording (the part its heads learned from) and scored on the same test
windows, with the same messages lost. The targets of the model-quality issue are checked and
printed as met or missed, never hidden.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.errors import BenchError
from benchmarks.machine import describe_machine

ARTIFACTS = (("INT8 student", "model.int8.onnx"), ("FP32 student", "model.onnx"),
             ("FP32 teacher", "teacher/model.onnx"))
# Targets of the shipped parking-lot model (issue "Shipped models that are right").
TARGET_ACCURACY = 0.99
TARGET_MEAN_M = 5.0
TARGET_KNN_MARGIN = 0.40  # mean error at least 40 % below the kNN floor's
TARGET_MEDIAN_INSIDE_M = 3.0


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
                      "| model | " + " | ".join(label for _, label, _ in self.columns) + " |",
                      "| --- |" + " --- |" * len(self.columns)]
            for name, m in rows.items():
                lines.append("| " + " | ".join([name] + [_fmt(m, k, scale) for k, _, scale in self.columns]) + " |")
            lines.append("")
        lines += ["## Targets (the shipped INT8 model, complete windows)", "", "| target | measured | met |",
                  "| --- | --- | --- |"]
        lines += [f"| {what} | {measured} | {'yes' if met else '**no**'} |" for what, measured, met in self.targets]
        lines += ["", f"Reproduce: `spar-bench model --model {self.cfg.model_dir} --test {self.cfg.test_data} "
                  f"--train {self.cfg.train_data}`.", ""]
        return "\n".join(lines)


def training_summary(training: dict[str, Any]) -> str:
    """The manifest's training block in words."""
    if not training:
        return "budget not recorded in the manifest"
    return (f"trained with the `{training.get('budget', '?')}` budget, teacher fine-tuning "
            f"`{training.get('teacher_fine_tuning', '?')}`, commit {training.get('commit', '?')}")


def _fmt(metrics: dict[str, float], key: str, scale: float = 1.0) -> str:
    if key not in metrics:
        return ""
    if key in ("accuracy", "macro_f1") or key.startswith("mAP@"):
        return f"{metrics[key]:.3f}"
    return f"{metrics[key] / scale:.2f}"


def check_targets(rows: dict[str, dict[str, float]]) -> list[tuple[str, str, bool]]:
    """The issue's targets for the INT8 student against the floors, on complete windows."""
    student, softmax, knn = rows.get("INT8 student", {}), rows.get("Floor: softmax", {}), rows.get("Floor: kNN", {})
    out = []
    if "accuracy" in student:
        acc = student["accuracy"]
        out.append((f"accuracy >= {TARGET_ACCURACY}", f"{acc:.4f}", acc >= TARGET_ACCURACY))
        if "accuracy" in softmax:
            out.append(("accuracy not below the softmax floor", f"{acc:.4f} vs {softmax['accuracy']:.4f}",
                        acc >= softmax["accuracy"]))
    if "mean_distance" in student:
        mean = student["mean_distance"]
        out.append((f"mean error <= {TARGET_MEAN_M:g} m", f"{mean:.2f} m", mean <= TARGET_MEAN_M))
        if "mean_distance" in knn:
            margin = 1 - mean / knn["mean_distance"]
            out.append((f"mean error >= {TARGET_KNN_MARGIN:.0%} below the kNN floor",
                        f"{margin:.0%} below ({knn['mean_distance']:.2f} m)", margin >= TARGET_KNN_MARGIN))
        inside = student.get("median_inside_lot", float("nan"))
        out.append((f"median error inside the lot <= {TARGET_MEDIAN_INSIDE_M:g} m", f"{inside:.2f} m",
                    bool(inside <= TARGET_MEDIAN_INSIDE_M)))
    return out


def run_model_check(cfg: ModelCheckConfig, progress: Callable[[str], None] = print) -> ModelCheckReport:
    from train.data import label_subset, load_windows, temporal_split
    from train.floors import CentroidFloor, KnnFloor, SoftmaxFloor, centroid_floor, window_features
    from train.metrics import summarize

    manifest_path = cfg.model_dir / "manifest.json"
    if not manifest_path.exists():
        raise BenchError(f"{manifest_path} does not exist; give a model folder written by `make models`")
    manifest = json.loads(manifest_path.read_text())
    if any(o.get("name") == "hypocentre" for o in manifest.get("outputs", [])):
        from benchmarks.model_check_quakes import run_quake_check

        return run_quake_check(cfg, manifest, progress)
    if any(o.get("name") == "detection_logits" for o in manifest.get("outputs", [])):
        from benchmarks.model_check_detect import run_detect_check

        return run_detect_check(cfg, manifest, progress)
    progress(f"loading {cfg.test_data} and {cfg.train_data}")
    test = load_windows(cfg.test_data, progress=False)
    train = load_windows(cfg.train_data, limit=cfg.max_train_windows, progress=False)
    train_idx, _ = temporal_split(len(train), cfg.val_fraction)
    train = train.subset(label_subset(train_idx, train.label[train_idx], 1.0, 0))
    x_train, m_train = window_features(train)
    has = np.isfinite(train.target_position[:, 0]).all(axis=-1)
    targets = train.target_position[has, 0, :2].astype(np.float64)
    progress("fitting the floors")
    softmax = SoftmaxFloor(len(train.class_names)).fit(x_train, m_train, train.label)
    knn = KnnFloor().fit(x_train[has], m_train[has], targets)
    centroid: CentroidFloor = centroid_floor(train).fit(x_train[has], m_train[has], train.positions[has], targets)
    box = lot_box(test.site)
    truth = test.target_position[:, 0, :2]
    label_truth = {"label": test.label}
    rows: dict[float, dict[str, dict[str, float]]] = {}
    for rate in cfg.loss_rates:
        present = drop_messages(test.present, rate, cfg.seed) if rate > 0 else test.present
        seen = _with_present(test, present)
        rows[rate] = {}
        for name, rel in ARTIFACTS:
            path = cfg.model_dir / rel
            if not path.exists():
                continue
            progress(f"{name} ({rel}), {rate:.0%} lost")
            out = run_artifact(path, seen, cfg.threads)
            metrics: dict[str, float] = {}
            if "logits" in out:
                metrics.update(summarize("classify", {"label": out["logits"].argmax(-1)}, label_truth))
            if "position" in out:
                metrics.update(localization_summary(out["position"][:, :2], truth, box))
            rows[rate][name] = metrics
        x_test, m_test = window_features(seen)
        rows[rate]["Floor: softmax"] = summarize("classify", {"label": softmax.predict(x_test, m_test)}, label_truth)
        rows[rate]["Floor: kNN"] = localization_summary(knn.predict(x_test, m_test), truth, box)
        rows[rate]["Floor: energy centroid"] = localization_summary(
            centroid.predict(x_test, m_test, test.positions), truth, box)
    complete = rows.get(0.0, next(iter(rows.values())))
    return ModelCheckReport(cfg, manifest, rows, describe_machine(_versions()), len(test), len(train),
                            check_targets(complete))


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
        seen = _with_present(test, drop_messages(test.present, rate, cfg.seed)) if rate > 0 else test
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


def _with_present(windows, present: dict[str, np.ndarray]):
    from dataclasses import replace

    return replace(windows, present=present)


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}
