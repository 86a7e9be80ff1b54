"""Earthquake floors: STA/LTA picks, the travel-time grid search and the first-arrival station."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spar_wire.site_layout import load_site_layout
from train.quake_floors import (
    GridSearchLocator,
    QuakeFloors,
    first_arrival_station,
    pick_p_onsets,
    quake_floor_metrics,
)

REPO = Path(__file__).resolve().parents[2]
FRAME_S = 0.64


@pytest.fixture(scope="module")
def stations() -> np.ndarray:
    layout = load_site_layout(REPO / "configs" / "sites" / "ridgecrest_like.toml")
    return np.array([n.position for n in layout.nodes], dtype=np.float64)


def test_the_pick_is_the_first_frame_far_above_the_frames_before_it():
    env = np.ones((1, 3, 48))
    env[0, 0, 10:] = 100.0  # a sharp onset at frame 10
    env[0, 1, 20:] = 1.5  # too weak to trigger at a ratio of 3
    env[0, 2] = np.nan  # an absent trace
    picks = pick_p_onsets(env, threshold=3.0, frame_s=FRAME_S)
    assert picks[0, 0] == pytest.approx(10 * FRAME_S)
    assert np.isnan(picks[0, 1]) and np.isnan(picks[0, 2])


def test_exact_picks_with_an_unknown_origin_time_give_back_the_hypocentre(stations):
    locator = GridSearchLocator(stations, vp_m_s=6000.0)
    truth = np.array([[-12300.0, 8400.0, 9000.0]])
    picks = locator.travel_times(truth)[0] + 4.2  # the origin time is not known to the locator
    picks[[1, 5, 9]] = np.nan  # three stations missing
    found = locator.locate(picks)
    assert np.linalg.norm(found - truth[0]) < 400.0  # within the 250 m fine grid


def test_too_few_picks_fall_back_to_the_first_arrival_station(stations):
    locator = GridSearchLocator(stations, vp_m_s=6000.0)
    picks = np.full(len(stations), np.nan)
    picks[[2, 7, 11]] = [5.0, 3.0, 4.0]
    assert np.isnan(locator.locate(picks)).all()
    first = first_arrival_station(picks[None], stations, depth_m=7000.0)
    np.testing.assert_allclose(first[0], [*stations[7, :2], 7000.0])
    assert np.isnan(first_arrival_station(np.full((1, len(stations)), np.nan), stations, 7000.0)).all()


def test_floors_fit_a_threshold_and_always_answer(stations):
    rng = np.random.default_rng(0)
    floors = QuakeFloors(stations, 6000.0, FRAME_S)
    targets = np.array([[0.0, 0.0, 8000.0], [20000.0, -10000.0, 12000.0]])
    env = 1.0 + 0.1 * rng.random((2, len(stations), 48))
    for w, target in enumerate(targets):
        onset = np.round((floors.locator.travel_times(target[None])[0] + 3.0) / FRAME_S).astype(int)
        for n, k in enumerate(onset):
            env[w, n, k:] = 50.0
    floors.fit(env, targets)
    guess = floors.grid_search(env)
    assert np.isfinite(guess).all()
    # 0.64 s frames: a pick is off by up to half a frame, a few km at 6 km/s; the mean guess is ~11 km off
    assert np.linalg.norm(guess - targets, axis=1).max() < 5000.0
    assert np.isfinite(floors.grid_search(np.full((1, len(stations), 48), np.nan))).all()  # nothing picked


def test_on_simulated_earthquakes_the_grid_search_beats_the_guess(tmp_path):
    from node_firmware_sim.dataset import DatasetSpec, export_dataset
    from train.data import load_windows

    spec = DatasetSpec(site=str(REPO / "configs" / "sites" / "ridgecrest_like.toml"), scenario="earthquakes",
                       windows=60, seed=3, codec="webp:85", shard_size=60)
    export_dataset(spec, tmp_path / "q", workers=1, overwrite=True)
    windows = load_windows(tmp_path / "q", progress=False)
    metrics = quake_floor_metrics(windows.subset(np.arange(40)), windows.subset(np.arange(40, 60)))
    assert set(metrics) == {"grid_search", "first_arrival", "knn", "mean_position"}
    grid, guess = metrics["grid_search"], metrics["mean_position"]
    assert grid["epicentral_mean"] < 0.3 * guess["epicentral_mean"]
    assert grid["hypocentre_mean"] < metrics["first_arrival"]["hypocentre_mean"]
    assert grid["sta_lta_threshold"] > 1.0
