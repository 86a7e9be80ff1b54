"""``spar-bench model``: is the shipped model right? Its ONNX artifacts against the simple floors on a
recording it never trained on, with complete windows and with lost messages.

Every artifact of a model folder (the INT8 student, the FP32 student, the teacher in ``teacher/``)
runs in ONNX Runtime, exactly as the aggregator runs it, on the test recording (another seed of
the same scenario). The floors (``train.floors``) are fitted on the labelled windows of the
model's own training recording (the part its heads learned from) and scored on the same test
windows, with the same messages lost. The targets of the model-quality issue are checked and
printed as met or missed, never hidden.

The parts every task's check shares are in ``model_check_core``; a detection or an earthquake model
is handed to ``model_check_detect`` / ``model_check_quakes`` by its outputs. ``register`` adds the
``spar-bench model`` subcommand.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cli_support import progress
from benchmarks.errors import BenchError
from benchmarks.experiment_ledger import versions
from benchmarks.model_check_core import (
    ARTIFACTS,
    ModelCheckConfig,
    ModelCheckReport,
    drop_messages,
    localization_summary,
    lot_box,
    run_artifact,
    with_present,
)
from testbed.machine import describe_machine

# Targets of the shipped parking-lot model (issue "Shipped models that are right").
TARGET_ACCURACY = 0.99
TARGET_MEAN_M = 5.0
TARGET_KNN_MARGIN = 0.40  # mean error at least 40 % below the kNN floor's
TARGET_MEDIAN_INSIDE_M = 3.0


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
        seen = with_present(test, present)
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
    return ModelCheckReport(cfg, manifest, rows, describe_machine(versions("onnxruntime")), len(test), len(train),
                            check_targets(complete))


# --------------------------------------------------------------------------- command line
def register(subparsers: Any) -> None:
    """Add ``spar-bench model`` to ``subparsers`` (``parser.add_subparsers()``)."""
    mc = subparsers.add_parser(
        "model", help="the shipped model against the floors on a recording it never trained on",
        description="Run every artifact of a model folder (INT8 student, FP32 student, teacher/) in "
        "ONNX Runtime on a test recording, beside the floors (softmax / kNN / energy centroid on band "
        "energies, fitted on the model's training recording), with complete windows and with lost "
        "messages, and check the shipped model's targets. Writes a markdown report and JSON.")
    mc.add_argument("--model", type=Path, default=Path("models/parking_lot"),
                    help="model folder (default: %(default)s)")
    mc.add_argument("--test", type=Path, default=Path("build/models-standard/test"),
                    help="test recording, never trained on (default: %(default)s, written by `make models "
                    "BUDGET=standard`)")
    mc.add_argument("--train", type=Path, default=Path("build/models-standard/data"),
                    help="the model's training recording, for the floors (default: %(default)s)")
    mc.add_argument("--loss", type=float, action="append", help="message loss rates (repeatable; default 0 and 0.2)")
    mc.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default: %(default)s)")
    mc.add_argument("--out", type=Path, default=Path("benchmarks/results/model.md"),
                    help="markdown report; JSON beside it (default: %(default)s)")
    mc.set_defaults(func=_cmd_model)


def _cmd_model(args: argparse.Namespace) -> int:
    for path in (args.test, args.train):
        if not (path / "dataset.json").exists():
            raise BenchError(f"{path} is not a dataset folder; `make models BUDGET=standard` writes both recordings, "
                             "or give --test/--train from `spar-node dataset`")
    rates = tuple(args.loss) if args.loss else (0.0, 0.2)
    if any(not 0 <= r < 1 for r in rates):
        raise BenchError("--loss rates must be in [0, 1)")
    cfg = ModelCheckConfig(model_dir=args.model, test_data=args.test, train_data=args.train, loss_rates=rates,
                           threads=args.threads)
    report = run_model_check(cfg, progress=progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.to_markdown())
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": report.machine, "model": report.manifest.get("model"), "training": report.manifest.get("training"),
         "rows": {f"{r:g}": v for r, v in report.rows.items()},
         "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in report.targets]}, indent=2) + "\n")
    print(report.to_markdown())
    return 0
