"""How much worse a metric is than a reference, as a fraction of it: one definition for every report
(field trials, bandwidth and lossy series, the quant benchmark's targets and student table)."""

from __future__ import annotations

import math


def relative_loss(value: float, reference: float, higher_is_better: bool) -> float:
    """How much worse ``value`` is than ``reference``, as a fraction of it (negative: better)."""
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return math.nan
    change = (value - reference) / abs(reference)
    return -change if higher_is_better else change
