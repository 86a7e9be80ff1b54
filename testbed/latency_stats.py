"""The percentile every latency figure goes through: field-trial reports and the latency, overload,
runtime and quant benchmarks.

One definition, so that a p50 or p99 in a trial's ``report.md``, ``latency.md``, ``overload.md``,
``runtime.md`` and ``quant.md`` means the same thing (numpy's default linear interpolation) and an
empty sample reads the same way everywhere: NaN, which the reports print as "n/a" or a dash rather
than failing on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` as a float; NaN when there are none.

    A step or phase can end with no result at all (everything dropped); its percentiles are then
    unknown, not an error, so the report still renders.
    """
    return float(np.percentile(values, q)) if len(values) else float("nan")
