"""``spar-bench model`` for a multi-vehicle detection model: every artifact's mAP@r on a recording it
never trained on, beside the detection floors (``train.detect_floors``) on the same windows and the
same lost messages. A shipped model below a floor is a bug to find; the targets say so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.experiment_ledger import versions
from benchmarks.model_check_core import ModelCheckConfig, ModelCheckReport, scored_rows, undistilled_note
from testbed.machine import describe_machine
from trials.detections import detection_predictions

# The floors' kNN keeps every training window's band features; a few thousand windows are plenty.
FLOOR_TRAIN_WINDOWS = 6000
FLOOR_ROWS = {"energy_peaks": "Floor: energy peaks", "knn": "Floor: kNN"}
HEADLINE = "mAP@8"


def run_detect_check(cfg: ModelCheckConfig, manifest: dict[str, Any], progress: Callable[[str], None]
                     ) -> ModelCheckReport:
    from train.detect_floors import RADII, detect_floor_metrics
    from train.metrics import summarize

    def score(outputs, test):
        dims = test.target_dims
        pred = detection_predictions(outputs["detection_logits"], outputs["detection_positions"][..., :dims])
        truth = {"target_class": test.target_class, "target_position": test.target_position[..., :dims]}
        return summarize("detect", pred, truth, RADII)

    def floors(train, seen):  # the floors' tuned settings are not a column
        return {name: {k: v for k, v in metrics.items() if k.startswith("mAP@")}
                for name, metrics in detect_floor_metrics(train, seen).items()}

    rows, test, train = scored_rows(cfg, manifest, progress, FLOOR_TRAIN_WINDOWS, score, floors, FLOOR_ROWS)
    complete = rows.get(0.0, next(iter(rows.values())))
    notes: tuple[str, ...] = (
        "Floors (`train/detect_floors.py`) read the same per-node band energies: energy peaks among neighbouring "
        "nodes (placed at the local energy centroid, classed by a softmax on the node's bands) and the vehicles of "
        f"the nearest training windows (kNN); fitted on the first {len(train)} training windows. mAP@r: a "
        "detection counts only with the right vehicle class within r metres.",)
    notes += undistilled_note(manifest)
    columns = tuple((f"mAP@{r:g}", f"mAP@{r:g}", 1.0) for r in RADII)
    return ModelCheckReport(cfg, manifest, rows, describe_machine(versions("onnxruntime")), len(test), len(train),
                            detect_targets(complete), columns=columns, notes=notes)


def detect_targets(rows: dict[str, dict[str, float]]) -> list[tuple[str, str, bool]]:
    """The shipped INT8 model against every floor (mAP@8, complete recording)."""
    shipped = next((rows[name] for name in ("INT8 student", "INT8 model (the teacher)") if name in rows), None)
    if shipped is None:
        return []
    mine = shipped[HEADLINE]
    out = [(f"{HEADLINE} above the {label.removeprefix('Floor: ')} floor", f"{mine:.3f} vs {rows[label][HEADLINE]:.3f}",
            bool(mine > rows[label][HEADLINE])) for label in FLOOR_ROWS.values()]
    for fp32 in ("FP32 teacher", "FP32 model (the teacher)"):
        if fp32 in rows:
            change = mine - rows[fp32][HEADLINE]
            out.append((f"INT8 within 0.02 {HEADLINE} of the {fp32}", f"{change:+.3f}", bool(change >= -0.02)))
    return out
