"""Checks for numbers that arrive from files and the network (TOML, JSON)."""

from __future__ import annotations

import math
from typing import Any


def is_finite_number(value: Any) -> bool:
    """True for a finite int or float; False for bool, NaN, infinity, ints beyond float range and
    anything else."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int of hundreds of digits (JSON allows it) does not fit a float
        return False


def is_finite_vector(value: Any, lengths: tuple[int, ...]) -> bool:
    """True for a list or tuple of finite numbers whose length is one of ``lengths``."""
    return (isinstance(value, (list, tuple)) and len(value) in lengths
            and all(is_finite_number(v) for v in value))
