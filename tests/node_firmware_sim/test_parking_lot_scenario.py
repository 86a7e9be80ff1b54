"""Physics and bookkeeping of the parking-lot vehicle scenario."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from node_firmware_sim.errors import NodeError
from node_firmware_sim.scenarios import propagation as prop
from node_firmware_sim.scenarios.parking_lot import (
    AcousticParams,
    NoiseParams,
    ParkingLotScenario,
    SeismicParams,
    Vehicle,
)
from spar_wire.site_layout import SiteLayout, load_site_layout, parse_site_layout

SITE = Path(__file__).resolve().parents[2] / "configs/sites/parking_lot.toml"
C_AIR = AcousticParams().sound_speed_mps
V_RAYLEIGH = SeismicParams().rayleigh_speed_mps
Q = SeismicParams().q
# Background far below any vehicle, but never zero.
QUIET = NoiseParams(wind_db_spl=(-40.0, -40.0), gust_db=0.0, node_spread_db=0.0, mic_self_noise_pa=1e-7,
                    ground_noise_mps=(1e-13, 1e-13), geophone_self_noise_mps=1e-14)
MOTORCYCLE, CAR, VAN, TRUCK = 1, 2, 3, 4


@pytest.fixture(scope="module")
def lot() -> SiteLayout:
    return load_site_layout(SITE)


def layout(*nodes: tuple[str, tuple[float, ...]], geophone_channels: int = 1,
           modalities: tuple[str, ...] = ("microphone", "geophone"),
           node_modalities: dict[str, list[str]] | None = None) -> SiteLayout:
    """A small site with exact geometry and the parking-lot feature presets."""
    presets = {"microphone": {"preset": "parking_lot_microphone"},
               "geophone": {"preset": "parking_lot_geophone", "channels": geophone_channels}}
    return parse_site_layout({
        "site": {"id": "test_lot", "frame": "enu"},
        "modalities": {m: presets[m] for m in modalities},
        "nodes": [{"id": nid, "position": list(pos),
                   "modalities": (node_modalities or {}).get(nid, list(modalities))} for nid, pos in nodes],
    })


def parked(class_id: int, xy=(0.0, 0.0), engine_hz: float = 10.0, seed: int = 0) -> Vehicle:
    """A stationary vehicle idling at a constant firing frequency."""
    return Vehicle(class_id, xy, 0.0, 0.0, 0.0, engine_hz, timbre_seed=seed)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)))


def delay_samples(near: np.ndarray, far: np.ndarray, max_lag: int) -> float:
    """Lag (samples, sub-sample by parabola) by which ``far`` trails ``near``: cross-correlation peak."""
    n = 2 * near.size
    cc = np.fft.irfft(np.fft.rfft(far, n) * np.conj(np.fft.rfft(near, n)), n)
    lags = np.arange(-max_lag, max_lag + 1)
    values = cc[lags]
    k = int(np.argmax(values))
    if 0 < k < len(values) - 1:
        a, b, c = values[k - 1:k + 2]
        return lags[k] + 0.5 * (a - c) / (a - 2 * b + c)
    return float(lags[k])


def spectrum(x: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies and Hann-windowed amplitude spectrum of a 1-D signal."""
    return np.fft.rfftfreq(x.size, 1 / rate), np.abs(np.fft.rfft(x * np.hanning(x.size)))


def centroid_hz(x: np.ndarray, rate: float, fmax: float) -> float:
    f, a = spectrum(x, rate)
    keep = f < fmax
    return float(np.sum(f[keep] * a[keep] ** 2) / np.sum(a[keep] ** 2))


# ----------------------------------------------------------------------------- contract
def test_windows_have_shapes_units_and_metadata(lot):
    scenario = ParkingLotScenario(lot, seed=7)
    assert scenario.class_names == ("none", "motorcycle", "car", "van", "truck")
    assert scenario.window_s == 2.0 and scenario.name == "parking_lot"
    w = scenario.window(5)
    assert w.index == 5 and w.start_s == 10.0
    assert set(w.signals) == {(n, m) for n in lot.node_ids for m in ("microphone", "geophone")}
    for (_, modality), x in w.signals.items():
        assert x.dtype == np.float64 and x.shape == ((1, 32000) if modality == "microphone" else (1, 400))
        assert np.all(np.isfinite(x)) and rms(x) > 0
        lo, hi = (1e-4, 10.0) if modality == "microphone" else (1e-10, 1e-2)  # Pa / m/s
        assert lo < rms(x) < hi, (modality, rms(x))
    described = json.loads(json.dumps(scenario.describe()))
    assert described["name"] == "parking_lot" and described["seed"] == 7
    assert described["acoustic"]["sound_speed_mps"] == C_AIR


def test_same_seed_and_index_repeat_exactly_and_other_seeds_differ(lot):
    a, b = ParkingLotScenario(lot, seed=3), ParkingLotScenario(lot, seed=3)
    wa, wb = a.window(11), b.window(11)
    assert wa.truth == wb.truth
    assert all(np.array_equal(wa.signals[k], wb.signals[k]) for k in wa.signals)
    wc = ParkingLotScenario(lot, seed=4).window(11, ("n01",))
    assert not np.array_equal(wc.signals[("n01", "microphone")], wa.signals[("n01", "microphone")])


def test_window_does_not_depend_on_what_was_asked_before(lot):
    fresh = ParkingLotScenario(lot, seed=9).window(21, ("n02", "n05"))
    used = ParkingLotScenario(lot, seed=9)
    for i in (0, 20, 22, 400, *range(30, 200, 8)):  # neighbours, other episodes, cache churn
        used.truth(i)
    used.window(19, ("n05",))
    again = used.window(21, ("n02", "n05"))
    assert again.truth == fresh.truth
    assert all(np.array_equal(again.signals[k], fresh.signals[k]) for k in fresh.signals)


def test_node_subset_equals_the_full_call(lot):
    scenario = ParkingLotScenario(lot, seed=1, empty_fraction=0.0)
    full = scenario.window(13)
    part = scenario.window(13, ("n07", "n03"))
    assert set(part.signals) == {(n, m) for n in ("n03", "n07") for m in ("microphone", "geophone")}
    assert part.truth == full.truth
    for key, x in part.signals.items():
        assert np.array_equal(x, full.signals[key]), key


def test_a_node_added_to_the_layout_leaves_every_other_nodes_signals_unchanged():
    """Placement events add receivers (a joined node, a moved node at its new place); the world
    the other nodes hear must not change with them, or a control trial is not a control. The new
    receiver sits inside the lot and early in the node list, so nothing can lean on node order."""
    nodes = [("n01", (0.0, 0.0)), ("n02", (13.0, 1.5)), ("n03", (27.0, 0.5)), ("n04", (40.0, 2.0)),
             ("n05", (39.0, 29.0)), ("n06", (1.0, 15.0))]
    grown = ParkingLotScenario(layout(nodes[0], ("n01-moved", (20.0, 8.0)), *nodes[1:]), seed=5).window(2)
    base = ParkingLotScenario(layout(*nodes), seed=5).window(2)
    assert grown.truth.targets == base.truth.targets  # the extras' nearest-node distances may change
    for key, x in base.signals.items():
        assert np.array_equal(grown.signals[key], x), key


# ----------------------------------------------------------------------------- propagation physics
@pytest.mark.parametrize("rate, speed, exponent, width_s", [(16000.0, C_AIR, 1.0, 2e-4),
                                                            (200.0, V_RAYLEIGH, 0.5, 1e-2)])
def test_pulse_arrives_after_r_over_c_and_spreads_geometrically(rate, speed, exponent, width_s):
    """A pulse emitted at t = 0.05 s from a fixed point reaches each receiver at 0.05 + r / c."""
    source_rate = 8 * rate
    t_src = np.arange(-0.2, 1.0, 1 / source_rate)
    source = np.exp(-0.5 * ((t_src - 0.05) / width_s) ** 2)
    receivers = np.array([[6.0, 0.0, 0.0], [20.0, 15.0, 0.0], [3.0, -4.0, 12.0]])  # r = 6, 25, 13 m
    r_true = np.linalg.norm(receivers, axis=1)
    step, n = 8, int(0.4 * rate)
    knots = np.arange(prop.knot_count(n, step)) * step / rate
    t_emit, r = prop.emission_times(knots, receivers, lambda t: np.zeros((*np.shape(t), 3)), speed)
    y = prop.receive(source, t_src[0], source_rate, t_emit, r, step, n, exponent, 1.0)
    peaks = np.argmax(y, axis=1)
    np.testing.assert_allclose(peaks, (0.05 + r_true / speed) * rate, atol=1.0)
    np.testing.assert_allclose(y.max(axis=1) / y[0].max(), (r_true[0] / r_true) ** exponent, rtol=0.02)


@pytest.mark.parametrize("towards", [True, False])
def test_moving_source_is_doppler_shifted(towards):
    """A 1 kHz source driving at 8 m/s is heard at f c / (c -+ v)."""
    rate, v, f0 = 16000.0, 8.0, 1000.0
    t_src = np.arange(-3.0, 2.0, 1 / (4 * rate))
    source = np.sin(2 * np.pi * f0 * t_src)
    receiver = np.array([[500.0 if towards else -500.0, 0.0, 0.0]])
    step, n = 80, 32000

    def trajectory(t):
        return np.stack([v * t, np.zeros_like(t), np.zeros_like(t)], axis=-1)

    knots = np.arange(prop.knot_count(n, step)) * step / rate
    t_emit, r = prop.emission_times(knots, receiver, trajectory, C_AIR)
    y = prop.receive(source, t_src[0], 4 * rate, t_emit, r, step, n, 1.0, 1.0)[0]
    f, a = spectrum(y, rate)
    k = int(np.argmax(a))
    peak = f[k] + 0.5 * (a[k - 1] - a[k + 1]) / (a[k - 1] - 2 * a[k] + a[k + 1]) * (f[1] - f[0])
    expected = f0 * C_AIR / (C_AIR - v if towards else C_AIR + v)
    assert abs(peak - expected) < 0.5, (peak, expected)


@pytest.mark.parametrize("modality, speed, rate", [("microphone", C_AIR, 16000),
                                                   ("geophone", V_RAYLEIGH, 200)])
def test_arrival_time_difference_between_nodes_matches_geometry(modality, speed, rate):
    """An idling truck 3 m from one node and 9 m from the other: the far one hears it 6 m / c later."""
    site = layout(("near", (3.0, 0.0)), ("far", (0.0, 9.0)))
    scenario = ParkingLotScenario(site, seed=2, noise=QUIET, vehicles=(parked(TRUCK, engine_hz=10.0),))
    w = scenario.window(3)
    near, far = w.signals[("near", modality)][0], w.signals[("far", modality)][0]
    expected = (9.0 - 3.0) / speed * rate
    # The engine repeats every 100 ms: search lags within half a period.
    lag = delay_samples(near, far, max_lag=int(0.045 * rate))
    assert abs(lag - expected) <= 1.0, (lag, expected)


def test_sound_falls_as_one_over_r_and_ground_motion_with_spreading_and_damping():
    site = layout(("near", (5.0, 0.0)), ("far", (-20.0, 0.0)))
    scenario = ParkingLotScenario(site, seed=0, noise=QUIET, vehicles=(parked(CAR, engine_hz=35.0),))
    w = scenario.window(0)
    mic_ratio = rms(w.signals[("near", "microphone")]) / rms(w.signals[("far", "microphone")])
    assert mic_ratio == pytest.approx(20.0 / 5.0, rel=0.05)  # spherical spreading, little absorption < 2 kHz
    near, far = w.signals[("near", "geophone")][0], w.signals[("far", "geophone")][0]
    assert rms(near) > rms(far)
    f, a_near = spectrum(near, 200.0)
    _, a_far = spectrum(far, 200.0)
    for line_hz in (35.0, 70.0):  # the engine's first two orders reach the ground
        k = int(np.argmin(np.abs(f - line_hz)))
        theory = math.sqrt(20.0 / 5.0) * math.exp(math.pi * line_hz * (20.0 - 5.0) / (Q * V_RAYLEIGH))
        assert a_near[k] / a_far[k] == pytest.approx(theory, rel=0.05), line_hz


def test_air_absorbs_high_frequencies_more_over_distance():
    """Tyre noise of a passing car: far/near level ratio drops with frequency beyond 1/r."""
    site = layout(("near", (0.0, 3.0)), ("far", (0.0, -60.0)), modalities=("microphone",))
    car = Vehicle(CAR, (0.0, 0.0), 0.0, 8.0, 0.0, 35.0)
    w = ParkingLotScenario(site, seed=1, noise=QUIET, episode_windows=1, vehicles=(car,)).window(0)
    f, a_near = spectrum(w.signals[("near", "microphone")][0], 16000.0)
    _, a_far = spectrum(w.signals[("far", "microphone")][0], 16000.0)

    def band_ratio(lo, hi):
        keep = (f >= lo) & (f < hi)
        return math.sqrt(np.sum(a_far[keep] ** 2) / np.sum(a_near[keep] ** 2))

    assert band_ratio(5000, 7000) < 0.8 * band_ratio(1000, 1500)


# ----------------------------------------------------------------------------- classes
def test_heavier_vehicles_sound_and_shake_lower_and_harder():
    site = layout(("node", (0.0, 4.0)))
    results = {}
    for class_id, engine_hz in ((MOTORCYCLE, 55.0), (TRUCK, 14.0)):
        centroids = []
        for seed in range(3):
            vehicle = Vehicle(class_id, (0.0, 0.0), 0.0, 5.0, 0.0, engine_hz, timbre_seed=seed)
            w = ParkingLotScenario(site, seed, noise=QUIET, episode_windows=1, vehicles=(vehicle,)).window(0)
            mic, geo = w.signals[("node", "microphone")][0], w.signals[("node", "geophone")][0]
            centroids.append((centroid_hz(mic, 16000.0, 4000.0), centroid_hz(geo, 200.0, 100.0), rms(geo)))
        results[class_id] = np.array(centroids)
    moto, truck = results[MOTORCYCLE], results[TRUCK]
    assert np.all(truck[:, 0] < moto[:, 0])  # sound
    assert np.all(truck[:, 1] < moto[:, 1])  # ground motion
    assert np.all(truck[:, 2] > 5 * moto[:, 2])  # heavier: much stronger ground motion


def harmonic_f0(x: np.ndarray, rate: float, lo: float, hi: float, orders: int = 5) -> float:
    """Harmonic-sum pitch estimate: the f in [lo, hi] maximising sum_h log |X(h f)|."""
    f, a = spectrum(x, rate)
    candidates = np.arange(lo, hi, 0.25)
    score = sum(np.log(np.interp(h * candidates, f, a) + 1e-12) for h in range(1, orders + 1))
    return float(candidates[np.argmax(score)])


def test_engine_firing_frequency_is_in_the_class_range_and_heard(lot):
    scenario = ParkingLotScenario(lot, seed=11)
    ranges = {i + 1: c.engine_hz for i, c in enumerate(scenario.classes)}
    checked: dict[int, int] = {}
    for index in range(3000):
        truth = scenario.truth(index)
        if truth.label == 0:
            continue
        f_true = truth.extras["nearest_engine_hz"]
        lo, hi = ranges[truth.label]
        assert lo <= f_true <= hi, (truth.label, f_true)
        if checked.get(truth.label, 0) >= 2 or truth.extras["n_vehicles"] != 1:
            continue
        if truth.extras["min_node_distance_m"] > 6.0:
            continue
        (x, y), = [t.position for t in truth.targets]
        node = min(lot.nodes, key=lambda n: math.dist(n.position, (x, y)))
        mic = scenario.window(index, (node.id,)).signals[(node.id, "microphone")][0]
        estimate = harmonic_f0(mic, 16000.0, 5.0, 100.0)
        assert estimate == pytest.approx(f_true, rel=0.08), (truth.label, estimate, f_true)
        checked[truth.label] = checked.get(truth.label, 0) + 1
        if len(checked) == 4 and min(checked.values()) >= 2:
            break
    assert sorted(checked) == [1, 2, 3, 4], checked


# ----------------------------------------------------------------------------- ground truth
def test_empty_windows_are_background_only(lot):
    empty = ParkingLotScenario(lot, seed=5, empty_fraction=1.0)
    for index in (0, 9, 30):
        truth = empty.truth(index)
        assert truth.label == 0 and truth.targets == () and truth.extras["n_vehicles"] == 0
    busy = ParkingLotScenario(lot, seed=5, vehicles=(Vehicle(CAR, (14.0, 3.0), 0.0, 2.0, 0.0, 30.0),))
    w_empty, w_busy = empty.window(4, ("n02",)), busy.window(4, ("n02",))
    assert w_busy.truth.label == CAR
    for modality in ("microphone", "geophone"):
        quiet, loud = w_empty.signals[("n02", modality)], w_busy.signals[("n02", modality)]
        assert rms(quiet) > 0
        assert rms(loud) > 2 * rms(quiet), modality


def test_targets_move_continuously_within_an_episode(lot):
    scenario = ParkingLotScenario(lot, seed=3, empty_fraction=0.0)
    moving = 0
    for episode in range(12):
        vehicles = scenario.episode_vehicles(episode)
        first = episode * scenario.episode_windows
        tracks = [scenario.truth(first + k).targets for k in range(scenario.episode_windows)]
        for before, after in zip(tracks, tracks[1:], strict=False):
            classes = [v.class_id for v in vehicles]
            assert [t.class_id for t in before] == classes == [t.class_id for t in after]
            for v, a, b in zip(vehicles, before, after, strict=True):
                step = math.dist(a.position, b.position)
                # Arc length speed * T; on a gentle curve the chord is within 0.2 % of it.
                assert step == pytest.approx(v.speed_mps * scenario.window_s, rel=2e-3, abs=1e-9)
                moving += v.speed_mps > 0
    assert moving > 20


def test_label_statistics_over_many_windows(lot):
    scenario = ParkingLotScenario(lot, seed=5, empty_fraction=0.2)
    episodes = 1000
    truths = [scenario.truth(e * scenario.episode_windows) for e in range(episodes)]
    labels = np.array([t.label for t in truths])
    counts = np.array([t.extras["n_vehicles"] for t in truths])
    assert set(labels) == {0, 1, 2, 3, 4}
    sigma = math.sqrt(0.2 * 0.8 / episodes)
    assert abs(np.mean(labels == 0) - 0.2) < 3.5 * sigma
    assert np.array_equal(labels == 0, counts == 0)
    assert set(counts) == {0, 1, 2, 3} and np.mean(counts[counts > 0]) == pytest.approx(2.0, abs=0.15)
    for label in (1, 2, 3, 4):  # classes are drawn uniformly
        assert 0.14 < np.mean(labels == label) < 0.26
    assert scenario.window(8, ("n01",)).truth == scenario.truth(8)


# ----------------------------------------------------------------------------- layouts and errors
def test_3d_positions_and_nodes_without_a_modality():
    site = layout(("above", (0.0, 0.0, 12.0)), ("aside", (12.0, 0.0, 0.0)), ("ear", (0.0, 5.0, 0.0)),
                  node_modalities={"ear": ["microphone"]})
    scenario = ParkingLotScenario(site, seed=0, noise=QUIET, vehicles=(parked(VAN, engine_hz=20.0),))
    w = scenario.window(1)
    assert ("ear", "microphone") in w.signals and ("ear", "geophone") not in w.signals
    above, aside = w.signals[("above", "microphone")][0], w.signals[("aside", "microphone")][0]
    assert abs(delay_samples(above, aside, 200)) <= 1.0  # both 12 m away
    assert rms(above) == pytest.approx(rms(aside), rel=0.02)


def test_three_component_geophone_moves_along_the_propagation_direction():
    site = layout(("east", (8.0, 0.0)), ("north", (0.0, 8.0)), geophone_channels=3, modalities=("geophone",))
    scenario = ParkingLotScenario(site, seed=0, noise=QUIET, vehicles=(parked(TRUCK, engine_hz=12.0),))
    w = scenario.window(0)
    east, north = w.signals[("east", "geophone")], w.signals[("north", "geophone")]
    assert east.shape == (3, 400)
    e, n, z = (rms(c) for c in east)
    assert e > 20 * n and e == pytest.approx(SeismicParams().hv_ratio * z, rel=0.05)
    e, n, z = (rms(c) for c in north)
    assert n > 20 * e


def test_bad_parameters_are_refused(lot):
    imu_only = parse_site_layout({"site": {"id": "wrist", "frame": "body"},
                                  "modalities": {"imu": {"preset": "har_imu"}},
                                  "nodes": [{"id": "a", "position": [0.0, 0.0], "modalities": ["imu"]}]})
    with pytest.raises(NodeError, match="microphone"):
        ParkingLotScenario(imu_only)
    for kwargs in ({"max_vehicles": -1}, {"episode_windows": 0}, {"empty_fraction": 1.5}, {"seed": -3},
                   {"vehicles": (parked(7),)}, {"noise": NoiseParams(mic_self_noise_pa=0.0)}):
        with pytest.raises(NodeError):
            ParkingLotScenario(lot, **kwargs)
    scenario = ParkingLotScenario(lot)
    with pytest.raises(NodeError, match="index"):
        scenario.window(-1)
    with pytest.raises(NodeError, match="unknown node"):
        scenario.window(0, ("n99",))
