"""How numbers and table rows look in every report: field trials, live views and benchmarks.

Trials and benchmarks print the same kinds of figures (shares in percent, task metrics, markdown
table rows); one definition keeps a number looking the same wherever it is read, and a report
parsed by a test reads the same in both. The test bed sits below both packages, so neither has to
import the other for it (``testbed`` never imports ``trials`` or ``benchmarks``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

MISSING = "n/a"  # a figure that could not be computed (no data, NaN, infinity)


def percent(fraction: float | None, *, digits: int = 1, signed: bool = False) -> str:
    """``fraction`` (0.123) as a percentage, "12.3 %"; ``signed`` adds "+" to a gain ("+12.3 %",
    for changes against a reference); "n/a" when it is missing or not finite."""
    if fraction is None or not math.isfinite(fraction):
        return MISSING
    return f"{100 * fraction:{'+' if signed else ''}.{digits}f} %"


def percent_of(part: float, whole: float, *, digits: int = 0, empty: str = "-") -> str:
    """``part`` as a percentage of ``whole`` ("75 %"); ``empty`` when there is no whole to share
    (nothing closed yet reads "-", not "n/a": no figure is missing, there is none yet)."""
    return f"{100 * part / whole:.{digits}f} %" if whole else empty


def short_number(x: float | None) -> str:
    """A task metric or a latency: three decimals below 10 (accuracy 0.987, 3.142 m), one above
    (12.5 ms), since a metric near 1 needs the decimals and a large value does not; "n/a" when missing."""
    if x is None or not math.isfinite(x):
        return MISSING
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def table_row(cells: Iterable[object]) -> str:
    """One markdown table row: ``| a | b |``."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def table_rule(columns: int) -> str:
    """The markdown rule under a header of ``columns`` cells: ``| --- | --- |``."""
    return table_row(["---"] * columns)
