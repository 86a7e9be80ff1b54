"""EarthquakeScenario: determinism, travel times, polarisation, amplitude scaling, missing traces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from node_firmware_sim.errors import NodeError
from node_firmware_sim.scenarios.earthquakes import EarthquakeScenario, QuakeEvent
from spar_wire.site_layout import SiteLayout, load_site_layout, parse_site_layout

SITES = Path(__file__).resolve().parents[2] / "configs" / "sites"
MOD = "seismometer"
FS = 100.0


@pytest.fixture(scope="module")
def ridgecrest() -> SiteLayout:
    return load_site_layout(SITES / "ridgecrest_like.toml")


def quiet(layout: SiteLayout, seed: int = 3, **kw) -> EarthquakeScenario:
    """Noise-free, nothing missing, no site terms: the ground is at rest before the P wave."""
    kw.setdefault("site_amplification_sigma", 0.0)
    return EarthquakeScenario(layout, seed=seed, missing_trace_fraction=0.0, noise_scale=0.0, **kw)


def line_layout(distances_km: list[float]) -> SiteLayout:
    """Stations at sea level along the +x axis."""
    return parse_site_layout({
        "site": {"id": "line", "frame": "enu"},
        "modalities": {MOD: {"preset": "ridgecrest_seismic", "sample_rate_hz": 100, "channels": 3}},
        "nodes": [{"id": f"s{i}", "position": [1000.0 * d, 0.0, 0.0], "modalities": [MOD]}
                  for i, d in enumerate(distances_km)],
    })


def hypocentral_distance(layout: SiteLayout, node_id: str, window) -> float:
    x, y, depth = window.truth.targets[0].position
    sx, sy, elevation = layout.node(node_id).position
    return float(np.sqrt((sx - x) ** 2 + (sy - y) ** 2 + (elevation + depth) ** 2))


def onset(trace: np.ndarray, rel: float = 1e-6) -> int:
    """First sample whose amplitude exceeds ``rel`` x the trace peak ([C, S] or [S])."""
    amplitude = np.abs(trace).max(axis=0) if trace.ndim == 2 else np.abs(trace)
    return int(np.argmax(amplitude > rel * amplitude.max()))


def transverse(layout: SiteLayout, node_id: str, window) -> np.ndarray:
    """Ground velocity perpendicular to the epicentre -> station direction, [S]."""
    x, y, _ = window.truth.targets[0].position
    sx, sy, _ = layout.node(node_id).position
    radial = np.array([sx - x, sy - y]) / np.hypot(sx - x, sy - y)
    e, n = window.signals[(node_id, MOD)][:2]
    return -radial[1] * e + radial[0] * n


def test_windows_are_deterministic_and_node_subsets_match_the_full_call(ridgecrest):
    a, b = EarthquakeScenario(ridgecrest, seed=5), EarthquakeScenario(ridgecrest, seed=5)
    w1, w2 = a.window(17), b.window(17)
    assert w1.truth == w2.truth and w1.signals.keys() == w2.signals.keys()
    for key in w1.signals:
        np.testing.assert_array_equal(w1.signals[key], w2.signals[key])
    other_index, other_seed = a.window(18), EarthquakeScenario(ridgecrest, seed=6).window(17)
    assert other_index.truth != w1.truth and other_seed.truth != w1.truth
    common = sorted(w1.signals.keys() & other_seed.signals.keys())
    assert common and not any(np.array_equal(w1.signals[k], other_seed.signals[k]) for k in common)
    subset = tuple(node for node, _ in list(w1.signals)[::3])
    part = a.window(17, subset)
    assert set(part.signals) == {(node, MOD) for node in subset} and part.truth == w1.truth
    for key, x in part.signals.items():
        np.testing.assert_array_equal(x, w1.signals[key])


def test_signals_and_truth_have_the_documented_shape(ridgecrest):
    scenario = EarthquakeScenario(ridgecrest, seed=1)
    assert scenario.class_names == ("event",) and scenario.window_s == pytest.approx(30.72)
    lo, hi = scenario.positions[:, :2].min(axis=0), scenario.positions[:, :2].max(axis=0)
    for index in range(6):
        w = scenario.window(index)
        assert w.start_s == pytest.approx(index * 30.72) and w.truth.label == 0
        x, y, depth = w.truth.targets[0].position
        extras = w.truth.extras
        assert set(extras) == {"magnitude", "origin_time_s", "depth_m"} and depth == extras["depth_m"]
        assert 1000 <= depth <= 20000 and 0.5 <= extras["magnitude"] <= 4.5
        assert 0 < extras["origin_time_s"] < 10
        span = hi - lo
        assert np.all(np.array([x, y]) >= lo - 0.11 * span) and np.all(np.array([x, y]) <= hi + 0.11 * span)
        for x_trace in w.signals.values():
            assert x_trace.shape == (3, 3072) and x_trace.dtype == np.float64
            assert np.all(np.isfinite(x_trace)) and np.any(x_trace != 0)
    described = json.loads(json.dumps(scenario.describe()))
    assert described["name"] == "earthquakes" and described["seed"] == 1 and described["vp_m_s"] == 6000


def test_p_arrival_differences_equal_distance_differences_over_vp(ridgecrest):
    scenario = quiet(ridgecrest)
    for index in range(6):
        w = scenario.window(index)
        ids = [node for node, _ in w.signals]
        distance = np.array([hypocentral_distance(ridgecrest, n, w) for n in ids])
        picks = np.array([onset(w.signals[(n, MOD)]) for n in ids])
        inside = w.truth.extras["origin_time_s"] + distance / 6000.0 < 30.0
        assert inside.sum() >= 10
        picks, distance = picks[inside], distance[inside]
        expected = (distance[:, None] - distance[None, :]) / 6000.0 * FS
        assert np.abs((picks[:, None] - picks[None, :]) - expected).max() <= 1.0
        absolute = (w.truth.extras["origin_time_s"] + distance / 6000.0) * FS
        assert np.abs(picks - absolute).max() <= 1.0  # a pick is the first sample after the arrival


def test_s_arrives_after_p_by_distance_times_slowness_difference(ridgecrest):
    """SH is the only motion off the source-station plane, so the transverse component is at
    rest until S arrives."""
    scenario = quiet(ridgecrest)
    checked = 0
    for index in range(6):
        w = scenario.window(index)
        for node, _ in w.signals:
            r = hypocentral_distance(ridgecrest, node, w)
            if w.truth.extras["origin_time_s"] + r / 3500.0 > 29.0:
                continue
            s_minus_p = onset(transverse(ridgecrest, node, w)) - onset(w.signals[(node, MOD)])
            assert abs(s_minus_p - r * (1 / 3500.0 - 1 / 6000.0) * FS) <= 1.0
            checked += 1
    assert checked >= 40


def test_vertical_dominates_the_p_window_and_horizontals_the_s_window(ridgecrest):
    scenario = quiet(ridgecrest)
    for index in range(4):
        w = scenario.window(index)
        for node, _ in w.signals:
            x = w.signals[(node, MOD)]
            r = hypocentral_distance(ridgecrest, node, w)
            p, s = onset(x), int(np.ceil((w.truth.extras["origin_time_s"] + r / 3500.0) * FS))
            if s + 200 > x.shape[1]:
                continue
            p_energy = (x[:, p:min(s, p + 200)] ** 2).sum(axis=1)
            s_energy = (x[:, s:s + 200] ** 2).sum(axis=1)
            assert p_energy[2] > p_energy[0] + p_energy[1], (node, p_energy)
            assert s_energy[0] + s_energy[1] > s_energy[2], (node, s_energy)


def test_amplitude_falls_with_distance_and_high_frequencies_die_first():
    """Geometric spreading gives A ~ 1/R; anelastic attenuation exp(-pi f t*) also removes the high
    frequencies, so A R falls, and it falls most for small (high corner frequency) events."""
    distances = [5.0, 10.0, 20.0, 40.0, 80.0]
    layout = line_layout(distances)
    scenario = quiet(layout, seed=11)
    loss = {}
    for magnitude in (1.5, 4.5):
        w = scenario.window(0, event=QuakeEvent(0.0, 0.0, 1000.0, magnitude, 2.0))
        peak = np.array([np.abs(w.signals[(f"s{i}", MOD)]).max() for i in range(len(distances))])
        r = np.array([hypocentral_distance(layout, f"s{i}", w) for i in range(len(distances))])
        assert np.all(np.diff(peak) < 0), peak
        loss[magnitude] = (peak[-1] * r[-1]) / (peak[0] * r[0])
    assert loss[1.5] < 0.4 and loss[1.5] < 0.6 * loss[4.5], loss


def test_larger_magnitude_gives_larger_amplitude_at_every_station(ridgecrest):
    scenario = quiet(ridgecrest)
    base = scenario.event(2)
    peaks = []
    for magnitude in (1.0, 2.0, 3.0, 4.0):
        w = scenario.window(2, event=QuakeEvent(base.x_m, base.y_m, base.depth_m, magnitude, 2.0))
        peaks.append([np.abs(x).max() for x in w.signals.values()])
    ratio = np.diff(np.log10(np.array(peaks)), axis=0)  # per magnitude unit, per station
    assert np.all(ratio > 0.3), ratio  # at least sqrt(10) per unit: Brune M0^(1/3) at high frequency


def test_amplitude_regression_over_many_events_looks_like_a_magnitude_scale(ridgecrest):
    """log10 A = a M + b log10 R + c fitted over random events: a near the local-magnitude slope 1,
    b steeper than -1 (spreading plus attenuation)."""
    scenario = quiet(ridgecrest, seed=21)
    rows, amplitude = [], []
    for index in range(40):
        w = scenario.window(index)
        for node, _ in w.signals:
            r = hypocentral_distance(ridgecrest, node, w)
            rows.append([w.truth.extras["magnitude"], np.log10(r), 1.0])
            amplitude.append(np.log10(np.abs(w.signals[(node, MOD)]).max()))
    (a, b, _), *_ = np.linalg.lstsq(np.array(rows), np.array(amplitude), rcond=None)
    assert 0.8 < a < 1.6, a
    assert -2.5 < b < -1.2, b


def test_missing_trace_rate_matches_the_configured_fraction(ridgecrest):
    fraction, windows, stations = 0.3, 150, len(ridgecrest.nodes)
    scenario = EarthquakeScenario(ridgecrest, seed=2, missing_trace_fraction=fraction, noise_scale=0.0)
    windows_signals = [scenario.window(i).signals for i in range(windows)]
    present = np.array([[(n.id, MOD) in signals for n in ridgecrest.nodes] for signals in windows_signals])
    n = windows * stations
    rate = 1.0 - present.mean()
    assert abs(rate - fraction) < 4.0 * np.sqrt(fraction * (1 - fraction) / n), rate
    # independent per window and station: no station is always or never missing
    per_station = 1.0 - present.mean(axis=0)
    assert np.all(np.abs(per_station - fraction) < 5.0 * np.sqrt(fraction * (1 - fraction) / windows))
    assert len({tuple(row) for row in present}) > windows * 0.9
    full = EarthquakeScenario(ridgecrest, seed=2, missing_trace_fraction=0.0).window(0)
    assert len(full.signals) == stations


def test_noise_is_present_before_the_p_arrival_and_scales(ridgecrest):
    noisy = EarthquakeScenario(ridgecrest, seed=4, missing_trace_fraction=0.0)
    louder = EarthquakeScenario(ridgecrest, seed=4, missing_trace_fraction=0.0, noise_scale=2.0)
    clean = quiet(ridgecrest, seed=4, site_amplification_sigma=0.3)
    w, w2, w0 = noisy.window(0), louder.window(0), clean.window(0)
    pre = slice(0, int(w.truth.extras["origin_time_s"] * FS))  # before the origin: noise only
    for key, x in w.signals.items():
        assert np.all(w0.signals[key][:, pre] == 0) and np.all(x[:, pre].std(axis=1) > 1.0)
        np.testing.assert_allclose(w2.signals[key][:, pre], 2.0 * x[:, pre], rtol=1e-9, atol=1e-9)


def test_noise_is_dominated_by_the_microseism_peak(ridgecrest):
    scenario = EarthquakeScenario(ridgecrest, seed=4, missing_trace_fraction=0.0)
    silent = QuakeEvent(0.0, 0.0, 10000.0, -6.0, 2.0)  # far below the noise everywhere
    freqs = np.fft.rfftfreq(3072, 1 / FS)
    for index in range(3):
        for x in scenario.window(index, event=silent).signals.values():
            power = np.abs(np.fft.rfft(x, axis=1)) ** 2
            assert 0.1 < freqs[power[:, 1:].sum(axis=0).argmax() + 1] < 0.4
            assert power[:, (freqs > 2) & (freqs < 35)].sum() > 0  # broadband noise reaches the STFT band


def test_layout_without_a_three_channel_modality_is_rejected():
    layout = parse_site_layout({
        "site": {"id": "mono", "frame": "enu"},
        "modalities": {"geophone": {"preset": "ridgecrest_seismic", "channels": 1}},
        "nodes": [{"id": "g1", "position": [0.0, 0.0], "modalities": ["geophone"]}],
    })
    with pytest.raises(NodeError, match="3-channel"):
        EarthquakeScenario(layout)
    with pytest.raises(NodeError, match="unknown parameter"):
        EarthquakeScenario(line_layout([1.0]), q_typo=3)
    with pytest.raises(NodeError, match="vs_m_s"):
        EarthquakeScenario(line_layout([1.0]), vs_m_s=7000.0)
