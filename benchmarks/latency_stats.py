"""The percentile every latency figure of the latency, overload and runtime benchmarks goes through.

One definition, so that a p50 or p99 in ``latency.md``, ``overload.md`` and ``runtime.md`` means
the same thing (numpy's default linear interpolation) and an empty sample reads the same way
everywhere: NaN, which the reports print as a dash or "nan" rather than failing on.
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
