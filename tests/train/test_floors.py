"""The simple floors: band features from real token grids, and floors that learn what they should."""

from __future__ import annotations

import numpy as np
import pytest

from spar_wire.features import patchify
from train.floors import BANDS, CentroidFloor, KnnFloor, SoftmaxFloor, band_features, floor_metrics


def test_band_features_read_the_frequency_rows(tiny_window_set):
    cfg = tiny_window_set.feature_configs["microphone"]
    rows, cols = cfg.image_shape
    image = np.zeros((rows, cols), np.float32)
    image[: rows // BANDS] = 10.0  # energy in the lowest band only
    tokens = {"microphone": patchify(image, cfg)[None, None]}
    present = {"microphone": np.ones((1, 1), bool)}
    x, mask = band_features(tokens, present, {"microphone": cfg})
    assert x.shape == (1, BANDS + 1) and mask.all()
    assert x[0, 0] == pytest.approx(10.0) and np.allclose(x[0, 1:BANDS], 0.0)
    assert x[0, BANDS] == pytest.approx(10.0 / BANDS)  # overall level


def test_parking_features_have_one_block_per_node_and_modality(tiny_window_set):
    x, mask = band_features(tiny_window_set.tokens, tiny_window_set.present, tiny_window_set.feature_configs)
    assert x.shape == (len(tiny_window_set), 8 * 2 * (BANDS + 1))
    assert np.isfinite(x).all() and mask.dtype == bool


def test_softmax_floor_separates_separable_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 5)) + 4.0 * np.eye(3, 5)[labels]
    floor = SoftmaxFloor(3).fit(x, np.ones_like(x, bool), labels)
    assert np.mean(floor.predict(x, np.ones_like(x, bool)) == labels) > 0.97
    assert floor.predict_proba(x[:4], np.ones((4, 5), bool)).sum(1) == pytest.approx(np.ones(4))


def test_knn_floor_interpolates_a_smooth_map():
    rng = np.random.default_rng(1)
    targets = rng.uniform(0, 10, (400, 2))
    x = np.concatenate([targets, targets ** 2 / 10], 1)
    floor = KnnFloor().fit(x, np.ones_like(x, bool), targets)
    err = np.linalg.norm(floor.predict(x[:50] + 0.01, np.ones((50, 4), bool)) - targets[:50], axis=1)
    assert err.mean() < 0.3


def test_centroid_floor_goes_to_the_loud_node():
    positions = np.array([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]])
    x = np.array([[60.0, 30.0, 30.0]])  # node 0 is 30 dB louder
    guess = CentroidFloor(level_column=0, columns_per_node=1).predict(x, np.ones_like(x, bool), positions)
    assert np.linalg.norm(guess[0]) < 0.1
    absent = np.array([[False, True, True]])  # the loud node's message was lost
    guess = CentroidFloor(0, 1).predict(x, absent, positions)
    assert guess[0] == pytest.approx([5.0, 5.0])


def test_floor_metrics_on_generated_windows(tiny_window_set):
    half = len(tiny_window_set) // 2
    metrics = floor_metrics(tiny_window_set.subset(np.arange(half)), tiny_window_set.subset(np.arange(half, 2 * half)))
    assert set(metrics) == {"softmax", "knn", "centroid", "mean_position"}
    assert 0.0 <= metrics["softmax"]["accuracy"] <= 1.0
    assert all(np.isfinite(metrics[f]["mse"]) for f in ("knn", "centroid", "mean_position"))
