"""The check of what the aggregator stored during ``spar-bench fuzz``: its result database.

Read after the aggregator's shutdown, so every window it closed is in: a valid window with no
stored result means the fuzz stopped valid nodes from being served, and a stored NaN means hostile
input reached the model.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

from benchmarks.fuzz_report import FuzzReport


def check_results(report: FuzzReport, database: Path, window_ns: int) -> None:
    """Fill the report's result fields from the aggregator's database (read after its shutdown, so
    every window it closed is in): which valid windows have a result (a stored start within half a
    window of the one sent), and which results hold a non-finite number."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
            rows = conn.execute("SELECT window_start_ns, payload FROM results").fetchall()
    except sqlite3.Error as exc:
        report.results_error = f"{database}: {exc}"
        return
    starts = sorted(int(start) for start, _ in rows)
    report.results_stored = len(rows)
    for window in report.valid_windows:
        window["stored"] = _near(starts, window["window_start_ns"], window_ns // 2)
    sent = sorted(w["window_start_ns"] for w in report.valid_windows)
    report.results_unmatched = sum(not _near(sent, start, window_ns // 2) for start in starts)
    for _, payload in rows:
        try:
            finite = _all_finite(json.loads(payload))  # Python's json reads NaN and Infinity
        except (ValueError, TypeError, RecursionError):
            finite = False  # not even JSON: as bad as NaN for whoever reads it
        report.results_non_finite += not finite


def _near(ordered: list[int], value: int, tolerance: int) -> bool:
    i = bisect.bisect_left(ordered, value - tolerance)
    return i < len(ordered) and ordered[i] <= value + tolerance


def _all_finite(value: Any) -> bool:
    """Whether every number in a JSON value is finite (strings "NaN"/"Infinity" count as not)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return value not in ("NaN", "Infinity", "-Infinity", "nan", "inf", "-inf")
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True
