"""BodyHarScenario: determinism, gait frequencies, posture and gravity, field, body-position effects."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from node_firmware_sim.errors import NodeError
from node_firmware_sim.scenarios.body_har import ACTIVITIES, SEGMENTS, BodyHarScenario, segment_profile
from spar_wire.site_layout import SiteLayout, load_site_layout, parse_site_layout

SITES = Path(__file__).resolve().parents[2] / "configs" / "sites"
G = 9.81
FS = 50.0
STATIC = ("sit", "stand", "lie")
DYNAMIC = ("walk", "run", "stairs_up", "stairs_down", "jump")


@pytest.fixture(scope="module")
def layout() -> SiteLayout:
    return load_site_layout(SITES / "body_har.toml")


@pytest.fixture(scope="module")
def scenario(layout) -> BodyHarScenario:
    return BodyHarScenario(layout, seed=7)


@pytest.fixture(scope="module")
def episodes(scenario) -> dict[str, list[int]]:
    """Activity name -> the first episodes of that activity (truth only: no nodes rendered)."""
    found: dict[str, list[int]] = {name: [] for name in scenario.class_names}
    for episode in range(300):
        label = scenario.window(episode * scenario.params.episode_windows, ()).truth.label
        found[scenario.class_names[label]].append(episode)
    return found


def episode_signal(scenario: BodyHarScenario, episode: int, node: str, modality: str = "acc") -> np.ndarray:
    """[3, episode_windows * S] samples of one episode, windows joined in order."""
    n = scenario.params.episode_windows
    return np.concatenate([scenario.window(episode * n + k, (node,)).signals[(node, modality)]
                           for k in range(n)], axis=1)


def dominant_hz(x: np.ndarray) -> float:
    """Peak of the spectrum of |acc| (orientation-free) between 0.5 and 8 Hz."""
    norm = np.linalg.norm(x, axis=0)
    spectrum = np.abs(np.fft.rfft((norm - norm.mean()) * np.hanning(norm.size)))
    freqs = np.fft.rfftfreq(norm.size, 1 / FS)
    band = (freqs > 0.5) & (freqs < 8.0)
    return float(freqs[band][spectrum[band].argmax()])


def test_windows_are_deterministic_and_node_subsets_match(layout, scenario):
    again = BodyHarScenario(layout, seed=7)
    w1, w2 = scenario.window(33), again.window(33)
    assert w1.truth == w2.truth and w1.signals.keys() == w2.signals.keys()
    assert len(w1.signals) == 18
    for key, x in w1.signals.items():
        np.testing.assert_array_equal(x, w2.signals[key])
        assert x.shape == (3, 200) and x.dtype == np.float64 and np.all(np.isfinite(x)) and np.any(x != 0)
    part = scenario.window(33, ("shin", "head"))
    assert {node for node, _ in part.signals} == {"shin", "head"} and part.truth == w1.truth
    for key, x in part.signals.items():
        np.testing.assert_array_equal(x, w1.signals[key])
    other = BodyHarScenario(layout, seed=8).window(33)
    assert not np.array_equal(other.signals[("waist", "acc")], w1.signals[("waist", "acc")])
    assert not np.array_equal(scenario.window(34).signals[("waist", "acc")], w1.signals[("waist", "acc")])
    assert json.loads(json.dumps(scenario.describe()))["name"] == "body_har"


def test_windows_of_an_episode_share_activity_and_subject_and_join_smoothly(layout):
    quiet = BodyHarScenario(layout, seed=7, noise_scale=0.0)
    n = quiet.params.episode_windows
    for episode in range(4):
        windows = [quiet.window(episode * n + k) for k in range(n)]
        assert len({w.truth.label for w in windows}) == 1
        assert len({w.truth.extras["subject_id"] for w in windows}) == 1
        assert 0 <= windows[0].truth.extras["subject_id"] < 15
        gyro = np.concatenate([w.signals[("shin", "gyro")] for w in windows], axis=1)
        steps = np.abs(np.diff(gyro, axis=1)).max(axis=0)
        seams = steps[np.arange(1, n) * 200 - 1]
        assert np.all(seams <= 1.5 * steps.max() + 1e-9)  # no jump where two windows meet


def test_dominant_step_frequency_is_in_range_and_running_is_faster(scenario, episodes):
    by_activity = {}
    for name in ("walk", "run"):
        profile = ACTIVITIES[scenario.class_names.index(name)]
        lo, hi = profile.cadence_range_hz
        peaks = [dominant_hz(episode_signal(scenario, e, "waist")) for e in episodes[name][:4]]
        resolution = FS / (200 * scenario.params.episode_windows)
        assert all(lo - resolution <= f <= hi + resolution for f in peaks), (name, peaks)
        by_activity[name] = peaks
    assert min(by_activity["run"]) > max(by_activity["walk"])


def test_static_activities_barely_move(scenario, episodes):
    def waist_acc_var(name):
        return [episode_signal(scenario, e, "waist").var(axis=1).sum() for e in episodes[name][:3]]

    def shin_gyro_rms(name):
        return [np.sqrt((episode_signal(scenario, e, "shin", "gyro") ** 2).mean())
                for e in episodes[name][:3]]

    static = max(v for name in STATIC for v in waist_acc_var(name))
    dynamic = min(v for name in DYNAMIC for v in waist_acc_var(name))
    assert static < 0.02 * dynamic, (static, dynamic)
    # legs swing when walking or running, not when sitting, standing or lying
    assert min(shin_gyro_rms("walk") + shin_gyro_rms("run")) > 1.0
    assert max(v for name in STATIC for v in shin_gyro_rms(name)) < 0.05


def test_gravity_has_its_magnitude_and_posture_sets_its_direction(scenario, episodes):
    mean_acc = {}
    for name in STATIC:
        for e in episodes[name][:3]:
            for node in ("chest", "waist", "thigh", "shin", "head", "forearm"):
                g = episode_signal(scenario, e, node).mean(axis=1)
                assert abs(np.linalg.norm(g) - G) < 0.05, (name, node, g)
                mean_acc.setdefault((name, node), []).append(g / np.linalg.norm(g))
    for node in ("chest", "waist"):
        for lying in mean_acc[("lie", node)]:
            for standing in mean_acc[("stand", node)]:
                assert np.degrees(np.arccos(np.clip(lying @ standing, -1, 1))) > 60
            assert abs(lying[2]) < 0.35  # lying: gravity off the long (z) axis of the sensor
        for standing in mean_acc[("stand", node)]:
            assert standing[2] > 0.95
    # sitting tilts the thigh to horizontal, the chest stays upright
    for sitting in mean_acc[("sit", "thigh")]:
        assert abs(sitting[2]) < 0.35
    for sitting in mean_acc[("sit", "chest")]:
        assert sitting[2] > 0.9


def test_magnetometer_reads_the_configured_field(layout, episodes):
    for field in (50.0, 30.0):
        scenario = BodyHarScenario(layout, seed=7, field_ut=field)
        for name in ("walk", "run", "lie", "sit"):
            w = scenario.window(episodes[name][0] * scenario.params.episode_windows)
            for node in ("chest", "shin", "forearm"):
                norm = np.linalg.norm(w.signals[(node, "mag")], axis=0)
                assert abs(norm.mean() - field) < 0.02 * field and norm.std() < 0.03 * field


def test_heading_change_rotates_the_horizontal_field_but_not_its_dip(layout):
    """Field inclination: the angle between gravity and the field is fixed by the dip, whatever the
    heading or posture (static windows, so acc is gravity)."""
    scenario = BodyHarScenario(layout, seed=7, noise_scale=0.0)
    seen = 0
    for episode in range(60):
        w = scenario.window(episode * scenario.params.episode_windows)
        if scenario.class_names[w.truth.label] not in STATIC:
            continue
        for node in ("chest", "thigh"):
            acc = w.signals[(node, "acc")].mean(axis=1)
            mag = w.signals[(node, "mag")].mean(axis=1)
            angle = np.degrees(np.arccos(acc @ mag / np.linalg.norm(acc) / np.linalg.norm(mag)))
            assert abs(angle - (90 + 60)) < 2.0  # up vs a field dipping 60 degrees below the horizon
        seen += 1
    assert seen >= 5


def test_shin_moves_more_than_head_when_walking(scenario, episodes):
    for e in episodes["walk"][:4]:
        spread = {node: np.linalg.norm(episode_signal(scenario, e, node), axis=0).std()
                  for node in ("shin", "thigh", "waist", "head")}
        assert spread["shin"] > 2.0 * spread["head"], spread
        assert spread["shin"] > spread["thigh"] > spread["waist"] > spread["head"], spread


def test_every_activity_occurs_about_equally_often(scenario):
    n = scenario.params.episode_windows
    labels = [scenario.window(e * n, ()).truth.label for e in range(800)]
    subjects = {scenario.window(e * n, ()).truth.extras["subject_id"] for e in range(100)}
    counts = Counter(labels)
    assert set(counts) == set(range(len(scenario.class_names)))
    expected = 800 / len(scenario.class_names)
    assert all(abs(c - expected) < 4 * np.sqrt(expected) for c in counts.values()), counts
    assert subjects == set(range(15))


def test_a_subject_wears_the_sensors_the_same_way_in_every_episode(layout):
    scenario = BodyHarScenario(layout, seed=7, noise_scale=0.0)
    n = scenario.params.episode_windows
    thigh: dict[float, list[np.ndarray]] = {}
    for episode in range(200):
        w = scenario.window(episode * n, ())
        if scenario.class_names[w.truth.label] == "stand":
            g = scenario.window(episode * n, ("thigh",)).signals[("thigh", "acc")].mean(axis=1)
            thigh.setdefault(w.truth.extras["subject_id"], []).append(g / np.linalg.norm(g))
    repeated = [v for v in thigh.values() if len(v) > 1]
    assert repeated
    for directions in repeated:  # same subject: same mounting, up to a little postural sway
        assert np.degrees(np.arccos(min(directions[0] @ d for d in directions))) < 1.0
    firsts = [v[0] for v in thigh.values()]
    spread = max(np.degrees(np.arccos(np.clip(a @ b, -1, 1))) for a in firsts for b in firsts)
    assert spread > 3.0  # different subjects mount the sensor differently


def test_unknown_nodes_and_modalities(layout):
    spec = {"preset": "har_imu", "sample_rate_hz": 50, "channels": 3}
    custom = parse_site_layout({
        "site": {"id": "custom", "frame": "body"},
        "modalities": {"acc": spec, "gyro": spec},
        "nodes": [{"id": "left_ankle", "position": [0.1, 0.0, -0.9], "modalities": ["acc", "gyro"]},
                  {"id": "gadget", "position": [0.0, 0.0, 0.65], "modalities": ["acc"]}],
    })
    assert segment_profile(custom.node("left_ankle"), "body") is SEGMENTS["shin"]
    assert segment_profile(custom.node("gadget"), "body") is SEGMENTS["head"]
    w = BodyHarScenario(custom, seed=1).window(3)
    assert set(w.signals) == {("left_ankle", "acc"), ("left_ankle", "gyro"), ("gadget", "acc")}
    bad = parse_site_layout({"site": {"id": "b", "frame": "body"}, "modalities": {"baro": spec},
                             "nodes": [{"id": "waist", "position": [0, 0, 0], "modalities": ["baro"]}]})
    with pytest.raises(NodeError, match="baro"):
        BodyHarScenario(bad)
    with pytest.raises(NodeError, match="no node"):
        BodyHarScenario(layout).window(0, ("tail",))
