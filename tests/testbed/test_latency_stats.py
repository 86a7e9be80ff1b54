"""The one percentile of the latency, overload and runtime benchmarks: numpy's, NaN when there is nothing."""

import math

import numpy as np
import pytest

from testbed.latency_stats import percentile


def test_percentile_is_numpys_linear_interpolation():
    values = [12.0, 3.0, 7.5, 40.0, 9.0]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([4.0], 99) == 4.0
    assert isinstance(percentile(np.array([1, 2, 3]), 50), float)


def test_an_empty_sample_has_no_percentile():
    assert math.isnan(percentile([], 50))
    assert math.isnan(percentile(np.array([]), 99))
