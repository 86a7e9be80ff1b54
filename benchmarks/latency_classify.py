"""Is a latency step saturated, why, and which stage limits it: the rules ``spar-bench latency`` stops on.

A step is saturated when windows are lost or left partial, latency grows through it (a backlog),
results come out slower than offered, the backend is busy nearly all of the step, or the load
generator itself falls behind; the bottleneck is the stage whose latency grew most. The thresholds
are module constants because the report quotes them (``latency_report``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from benchmarks.latency_results import StepResult

# Saturation thresholds (see classify_step).
ACHIEVED_FRACTION = 0.9  # results/s below this share of the offered rate: saturated
GENERATOR_FRACTION = 0.9  # the publisher reaching less than this share of the schedule: it is the limit
GROWTH_MIN_MS = 20.0  # e2e growth through a step below this is noise on a shared machine
# ... and below one window period: in a saturated FIFO each extra waiting window adds about one
# period, so less growth than that is not even one window of backlog (a transient stall recovers).
# Not relative to the step's early latency: a step that is backlogged from its first third on
# would hide its growth behind a threshold that grew with it.
GROWTH_PERIODS = 1.0
GROWTH_MIN_WINDOWS = 9  # fewer results: thirds too small to compare
STAGE_GROWTH_MIN_MS = 10.0  # a stage must have grown by this much to be named the bottleneck
# Backend running this share of the step: at capacity. Batching can still clear the backlog on
# average, but only by letting latency climb (measured: N=32 at 20 w/s, 94 % busy, p50 5x the idle p50).
BUSY_SATURATED = 0.9


@dataclass(frozen=True)
class Diagnosis:
    """The verdict on one step: copied into its StepResult by the sweep."""

    saturated: bool
    reasons: tuple[str, ...]
    bottleneck: str | None  # "inference" | "ingest" | "load generator" | None when not saturated
    evidence: str


def classify_step(step: StepResult, baseline: StepResult | None = None) -> Diagnosis:
    """Is ``step`` saturated, why, and which stage limits it.

    ``baseline``: an unsaturated step of the same N (its first), against which stage growth is
    measured; None (the N's first step is already saturated) compares with the step's own first third.
    """
    reasons = []
    if step.generator_rate < GENERATOR_FRACTION * step.offered_rate:
        reasons.append(f"publisher reached {step.generator_rate:.1f} w/s")
    if step.dropped:
        reasons.append(f"{step.dropped} dropped")
    if step.lost:
        reasons.append(f"{step.lost} lost")
    if step.partial:
        reasons.append(f"{step.partial} partial")
    if not step.achieved_rate >= ACHIEVED_FRACTION * step.offered_rate:  # NaN (under two results) counts
        reasons.append(f"results {step.achieved_rate:.1f} w/s")
    if _backlog(step):
        reasons.append(f"e2e grew {step.growth_ms:.0f} ms")
    if step.inference_busy >= BUSY_SATURATED:
        reasons.append(f"backend busy {100 * step.inference_busy:.0f} %")
    if not reasons:
        return Diagnosis(False, (), None, "")
    # Where the added latency sits by the end of the step: the last third's stage medians against
    # the N's first (unsaturated) step; a backlog shows there before it moves the step's medians.
    before = baseline.stage_ms if baseline is not None else step.head_stage_ms or dict.fromkeys(step.stage_ms, 0.0)
    now = step.tail_stage_ms or step.stage_ms
    growth = {name: _nan0(now[name]) - _nan0(before[name]) for name in step.stage_ms}
    stage, grown = max(growth.items(), key=lambda item: item[1])
    stages = ", ".join(f"{name} {round(value):+d} ms" for name, value in growth.items())
    busy = f"backend busy {100 * step.inference_busy:.0f} %, aggregator process {step.aggregator_cpu:.2f} cores"
    if grown >= STAGE_GROWTH_MIN_MS:
        against = "the first step" if baseline is not None else "its first third"
        evidence = f"stage medians of the step's last third vs {against}: {stages}; {busy}"
        return Diagnosis(True, tuple(reasons), stage, evidence)
    # No stage grew: name the limit from the kind of loss.
    if step.generator_rate < GENERATOR_FRACTION * step.offered_rate and not step.dropped:
        stage = "load generator"
    elif step.dropped or step.inference_busy >= BUSY_SATURATED:
        stage = "inference"
    elif step.partial or step.late_messages or step.ingest_lag_messages > step.messages / max(step.windows, 1):
        stage = "ingest"
    else:
        stage = "inference" if step.inference_busy >= 0.5 else "ingest"
    evidence = (f"no stage grew by {STAGE_GROWTH_MIN_MS:g} ms ({stages}); {busy}; {step.late_messages} late "
                f"messages; {step.ingest_lag_messages} messages unprocessed when publishing ended")
    return Diagnosis(True, tuple(reasons), stage, evidence)


def _backlog(step: StepResult) -> bool:
    """Did e2e latency grow through the step by more than noise and at least one window period?"""
    if len(step.e2e_ms) < GROWTH_MIN_WINDOWS or not math.isfinite(step.growth_ms):
        return False
    return step.growth_ms > max(GROWTH_MIN_MS, GROWTH_PERIODS * 1e3 / step.offered_rate)


def _nan0(value: float) -> float:
    """NaN (a stage with no results) as 0 ms, so growth between two steps can still be compared."""
    return value if math.isfinite(value) else 0.0

