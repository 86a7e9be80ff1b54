"""``spar-bench model`` for a seismic model: every artifact's hypocentre errors (km) on a recording
it never trained on, beside the earthquake floors (``train.quake_floors``) on the same windows and
the same lost messages. A shipped model below a floor is a bug to find; the targets say so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.experiment_ledger import versions
from benchmarks.model_check_core import ModelCheckConfig, ModelCheckReport, scored_rows, undistilled_note
from testbed.machine import describe_machine

# Floors fit on at most this many labelled training windows: the grid search only tunes a threshold
# and kNN gains little beyond a few thousand, while 9000 windows of 16 stations hold ~2 GB of images.
FLOOR_TRAIN_WINDOWS = 4000
FLOOR_ROWS = {"grid_search": "Floor: STA/LTA + grid search", "first_arrival": "Floor: first-arrival station",
              "knn": "Floor: kNN", "mean_position": "Guess: mean hypocentre"}
QUAKE_COLUMNS = tuple((f"{kind}_{stat}", f"{kind} {stat} km", 1000.0) for kind in ("hypocentre", "epicentral", "depth")
                      for stat in ("mean", "median", "p90"))


def run_quake_check(cfg: ModelCheckConfig, manifest: dict[str, Any], progress: Callable[[str], None]
                    ) -> ModelCheckReport:
    from train.metrics import summarize
    from train.quake_floors import quake_floor_metrics

    def score(outputs, test):
        return summarize("quake", {"position": outputs["hypocentre"]}, {"target_position": test.target_position})

    rows, test, train = scored_rows(cfg, manifest, progress, FLOOR_TRAIN_WINDOWS, score, quake_floor_metrics,
                                    FLOOR_ROWS)
    complete = rows.get(0.0, next(iter(rows.values())))
    notes: tuple[str, ...] = (
        "Floors (`train/quake_floors.py`) read the same tokens: STA/LTA P picks and a travel-time grid search at "
        "the regional P velocity, the first station to trigger, kNN on band energies, and the mean hypocentre; "
        f"fitted on the first {len(train)} training windows.",)
    notes += undistilled_note(manifest)
    return ModelCheckReport(cfg, manifest, rows, describe_machine(versions("onnxruntime")), len(test), len(train),
                            quake_targets(complete), columns=QUAKE_COLUMNS, notes=notes)


def quake_targets(rows: dict[str, dict[str, float]]) -> list[tuple[str, str, bool]]:
    """The shipped INT8 model against every floor (mean hypocentre error, complete recording)."""
    shipped = next((rows[name] for name in ("INT8 student", "INT8 model (the teacher)") if name in rows), None)
    if shipped is None:
        return []
    mine = shipped["hypocentre_mean"]
    out = []
    for floor in ("grid_search", "first_arrival", "knn"):
        value = rows[FLOOR_ROWS[floor]]["hypocentre_mean"]
        out.append((f"mean hypocentre error below the {FLOOR_ROWS[floor].removeprefix('Floor: ')} floor",
                    f"{mine / 1000:.2f} vs {value / 1000:.2f} km", bool(mine < value)))
    teacher = rows.get("FP32 teacher")
    if teacher is not None:
        change = mine / teacher["hypocentre_mean"] - 1
        out.append(("INT8 student within 10 % of the FP32 teacher", f"{change:+.1%}", bool(change <= 0.10)))
    fp32 = rows.get("FP32 model (the teacher)")
    if fp32 is not None:
        change = mine / fp32["hypocentre_mean"] - 1
        out.append(("INT8 within 10 % of FP32", f"{change:+.1%}", bool(change <= 0.10)))
    return out

