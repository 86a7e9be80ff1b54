"""BodyHarScenario: determinism, gait frequencies, posture and gravity, field, body-position effects,
and what makes it as hard as real data: subjects in order, sensor displacement, orientation changes,
transitions inside windows, confusable activities."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from node_firmware_sim.errors import NodeError
from node_firmware_sim.scenarios.body_har import (
    _BLENDED,
    ACTIVITIES,
    CONFUSABLE,
    SEGMENTS,
    BodyHarScenario,
    confusable_profiles,
    segment_profile,
)
from spar_wire.site_layout import SiteLayout, load_site_layout, parse_site_layout

SITES = Path(__file__).resolve().parents[2] / "configs" / "sites"
G = 9.81
FS = 50.0
STATIC = ("sit", "stand", "lie")
DYNAMIC = ("walk", "run", "stairs_up", "stairs_down", "jump")
FIXED_SENSORS = {"displacement_deg": 0.0, "displacement_tilt_deg": 0.0, "displacement_m": 0.0, "reorient_prob": 0.0}


@pytest.fixture(scope="module")
def layout() -> SiteLayout:
    return load_site_layout(SITES / "body_har.toml")


@pytest.fixture(scope="module")
def scenario(layout) -> BodyHarScenario:
    return BodyHarScenario(layout, seed=7)


@pytest.fixture(scope="module")
def episodes(scenario) -> dict[str, list[int]]:
    """Activity name -> the first episodes of that activity (truth only: no nodes rendered)."""
    return episodes_by_activity(scenario, 300)


def episodes_by_activity(scenario: BodyHarScenario, count: int) -> dict[str, list[int]]:
    """The episode's activity is the label of its last window (a first window may hold a transition
    whose majority is the previous activity)."""
    n = scenario.params.episode_windows
    found: dict[str, list[int]] = {name: [] for name in scenario.class_names}
    for episode in range(count):
        label = scenario.window(episode * n + n - 1, ()).truth.label
        found[scenario.class_names[label]].append(episode)
    return found


def episode_signal(scenario: BodyHarScenario, episode: int, node: str, modality: str = "acc") -> np.ndarray:
    """[3, k * S] samples of one episode's windows without a transition, joined in order."""
    n = scenario.params.episode_windows
    windows = [scenario.window(episode * n + k, (node,)) for k in range(n)]
    return np.concatenate([w.signals[(node, modality)] for w in windows if not w.truth.extras["transition_share"]],
                          axis=1)


def transition_windows(scenario: BodyHarScenario, episodes: int) -> list[int]:
    n = scenario.params.episode_windows
    return [e * n for e in range(episodes) if scenario.window(e * n, ()).truth.extras["transition_share"] > 0]


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
        assert len({w.truth.label for w in windows[1:]}) == 1  # the first may be mostly the previous activity
        if not windows[0].truth.extras["transition_share"]:
            assert windows[0].truth.label == windows[1].truth.label
        assert len({(w.truth.extras["subject_id"], w.truth.extras["session"]) for w in windows}) == 1
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
            w = scenario.window(episodes[name][0] * scenario.params.episode_windows + 1)
            for node in ("chest", "shin", "forearm"):
                norm = np.linalg.norm(w.signals[(node, "mag")], axis=0)
                assert abs(norm.mean() - field) < 0.02 * field and norm.std() < 0.03 * field


def test_heading_change_rotates_the_horizontal_field_but_not_its_dip(layout):
    """Field inclination: the angle between gravity and the field is fixed by the dip, whatever the
    heading or posture (static windows, so acc is gravity)."""
    scenario = BodyHarScenario(layout, seed=7, noise_scale=0.0)
    seen = 0
    for episode in range(60):
        w = scenario.window(episode * scenario.params.episode_windows + 1)  # no transition after the first
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
        assert spread["shin"] > 1.5 * spread["head"], spread
        assert spread["shin"] > spread["thigh"] > spread["waist"] > spread["head"], spread


def test_every_activity_occurs_equally_often_and_subjects_come_in_order(scenario):
    n, per_subject = scenario.params.episode_windows, scenario.subject_episodes
    assert scenario.describe()["subject_windows"] == per_subject * n == 4 * 8 * 6
    labels = [scenario.window(e * n + n - 1, ()).truth.label for e in range(2 * per_subject)]
    assert Counter(labels) == dict.fromkeys(range(len(scenario.class_names)), 2 * scenario.params.sessions_per_subject)
    for session in range(2 * scenario.params.sessions_per_subject):  # a session: every activity once
        assert sorted(labels[session * 8:(session + 1) * 8]) == list(range(8))
    # window order is subject order: a temporal split holds out later subjects
    subjects = [scenario.window(e * n, ()).truth.extras["subject_id"] for e in range(0, 16 * per_subject, 4)]
    assert subjects == [float(k // 8) for k in range(15 * 8)] + [0.0] * 8  # ids repeat after 15 subjects
    sessions = [scenario.window(e * n, ()).truth.extras["session"] for e in range(0, 16 * per_subject, 8)]
    assert sessions[:4] == [0, 1, 2, 3] and sessions[-4:] == [4, 5, 6, 7]  # a repeated subject: new sessions


def test_a_subject_wears_the_sensors_the_same_way_in_a_session(layout):
    """Without displacement a subject's sensors sit the same way in every episode; with it they
    move between sessions, not within one."""
    def thigh_directions(scenario: BodyHarScenario) -> dict[tuple[float, float], list[np.ndarray]]:
        n = scenario.params.episode_windows
        thigh: dict[tuple[float, float], list[np.ndarray]] = {}
        for episode in episodes_by_activity(scenario, 6 * scenario.subject_episodes)["sit"]:
            w = scenario.window(episode * n + 1, ("thigh",))
            g = w.signals[("thigh", "acc")].mean(axis=1)
            key = (w.truth.extras["subject_id"], w.truth.extras["session"])
            thigh.setdefault(key, []).append(g / np.linalg.norm(g))
        return thigh

    def angle(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.degrees(np.arccos(np.clip(a @ b, -1, 1))))

    fixed = thigh_directions(BodyHarScenario(layout, seed=7, noise_scale=0.0, **FIXED_SENSORS))
    by_subject: dict[float, list[np.ndarray]] = {}
    for (subject, _), directions in fixed.items():
        by_subject.setdefault(subject, []).extend(directions)
    for directions in by_subject.values():  # same subject: same mounting, up to a little postural sway
        assert max(angle(directions[0], d) for d in directions) < 1.0
    firsts = [v[0] for v in by_subject.values()]
    assert max(angle(a, b) for a in firsts for b in firsts) > 3.0  # different subjects mount it differently

    moved = thigh_directions(BodyHarScenario(layout, seed=7, noise_scale=0.0, reorient_prob=0.0))
    sessions = {key: v[0] for key, v in moved.items()}
    shifts = [angle(sessions[s, k], sessions[s, k + 1]) for s, k in sessions if (s, k + 1) in sessions]
    assert shifts and max(shifts) > 10.0  # the sitting thigh's sensor turned round the leg between sessions


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


# ---------------------------------------------------------------------- what makes it hard
def test_displacement_changes_the_signal_but_not_gravity_or_the_field(layout, episodes):
    """The same window with and without displacement: the same motion seen from another place on
    the segment (gravity and the field keep their size; the sliding lever changes the swing)."""
    moved = BodyHarScenario(layout, seed=7, noise_scale=0.0, reorient_prob=0.0)
    fixed = BodyHarScenario(layout, seed=7, noise_scale=0.0, **FIXED_SENSORS)
    n = moved.params.episode_windows
    sit = episodes["sit"][0] * n + 2
    a, b = moved.window(sit), fixed.window(sit)
    assert a.truth == b.truth  # every other draw is the same
    for node in ("thigh", "forearm"):
        ga, gb = a.signals[(node, "acc")].mean(axis=1), b.signals[(node, "acc")].mean(axis=1)
        assert abs(np.linalg.norm(ga) - np.linalg.norm(gb)) < 0.01
        assert np.degrees(np.arccos(ga @ gb / np.linalg.norm(ga) / np.linalg.norm(gb))) > 1.0
        np.testing.assert_allclose(np.linalg.norm(a.signals[(node, "mag")], axis=0), 50.0, rtol=1e-6)
    walk = episodes["walk"][0] * n + 2
    swing = [np.sqrt((s.window(walk, ("shin",)).signals[("shin", "acc")] ** 2).sum(axis=0)).std()
             for s in (moved, fixed)]
    assert abs(swing[0] - swing[1]) > 0.01 * swing[1]


def test_orientation_changes_turn_a_sensor_for_an_episode(layout, episodes):
    always = BodyHarScenario(layout, seed=7, noise_scale=0.0, **{**FIXED_SENSORS, "reorient_prob": 1.0})
    fixed = BodyHarScenario(layout, seed=7, noise_scale=0.0, **FIXED_SENSORS)
    n = fixed.params.episode_windows
    turned = []
    for episode in episodes["sit"][:4]:
        ga, gb = (s.window(episode * n + 2, ("thigh",)).signals[("thigh", "acc")].mean(axis=1)
                  for s in (always, fixed))
        assert abs(np.linalg.norm(ga) - np.linalg.norm(gb)) < 0.01
        turned.append(np.degrees(np.arccos(np.clip(ga @ gb / np.linalg.norm(ga) / np.linalg.norm(gb), -1, 1))))
    assert max(turned) > 20.0


def test_a_transition_window_holds_both_activities(layout):
    """Static -> dynamic (or back) inside one window: quiet legs on one side of the switch, swinging
    on the other; the label is the activity filling most of the window, the other in the extras."""
    scenario = BodyHarScenario(layout, seed=7, noise_scale=0.0)
    fs = FS
    checked = 0
    for index in transition_windows(scenario, 6 * 8):
        w = scenario.window(index)
        label, other = w.truth.label, int(w.truth.extras["other_label"])
        share = w.truth.extras["transition_share"]
        assert 0 < share <= 0.5 and other != label
        before = scenario.window(index - 1).truth.label  # the previous episode's last window
        after = scenario.window(index + 1).truth.label
        assert {label, other} == {before, after}
        names = scenario.class_names[before], scenario.class_names[after]
        # it continues the previous episode without a seam (the same body, the same sensors)
        prev = scenario.window(index - 1, ("waist",)).signals[("waist", "mag")]
        here = w.signals[("waist", "mag")]
        assert np.abs(here[:, 0] - prev[:, -1]).max() < 1.0
        np.testing.assert_allclose(np.linalg.norm(w.signals[("chest", "mag")], axis=0), 50.0, rtol=1e-6)
        if (names[0] in STATIC) == (names[1] in STATIC):
            continue
        gyro = np.abs(w.signals[("shin", "gyro")]).max(axis=0)
        share_new = 1.0 - share if label == after else share  # the label fills most of the window
        switch = 4.0 * (1.0 - share_new)  # the ramp is centred on it
        head, tail = gyro[: int((switch - 0.8) * fs)], gyro[int((switch + 0.8) * fs):]
        quiet, moving = (head, tail) if names[0] in STATIC else (tail, head)
        if min(len(quiet), len(moving)) < 10:
            continue
        assert quiet.max() < 0.05 and moving.max() > 1.0, (names, quiet.max(), moving.max())
        checked += 1
    assert checked >= 2
    none = BodyHarScenario(layout, seed=7, transition_prob=0.0)
    assert not transition_windows(none, 6 * 8)


def test_confusable_activities_move_towards_each_other():
    assert confusable_profiles(0.0) == ACTIVITIES
    names = [a.name for a in ACTIVITIES]
    for group in CONFUSABLE:
        same = [confusable_profiles(1.0)[names.index(n)] for n in group]
        half = [confusable_profiles(0.5)[names.index(n)] for n in group]
        for field in _BLENDED:
            assert len({getattr(p, field) for p in same}) == 1, field
            spread = np.ptp([getattr(ACTIVITIES[names.index(n)], field) for n in group])
            assert np.ptp([getattr(p, field) for p in half]) == pytest.approx(0.5 * spread), field
        assert all(p.posture == "stand" for p in same)
    untouched = [i for i, a in enumerate(ACTIVITIES) if not any(a.name in g for g in CONFUSABLE)]
    assert all(confusable_profiles(0.7)[i] == ACTIVITIES[i] for i in untouched)


def test_subjects_move_in_their_own_style(layout):
    """Arm swing of walking differs more between subjects with styles than without."""
    def forearm_rms(style_sigma: float) -> list[float]:
        scenario = BodyHarScenario(layout, seed=7, noise_scale=0.0, style_sigma=style_sigma, **FIXED_SENSORS)
        walks = episodes_by_activity(scenario, 10 * scenario.subject_episodes)["walk"]
        return [float(np.sqrt((episode_signal(scenario, e, "forearm", "gyro") ** 2).mean())) for e in walks[::4]]

    styled, plain = forearm_rms(1.0), forearm_rms(0.0)
    assert len(styled) >= 8
    assert np.std(styled) / np.mean(styled) > 1.5 * np.std(plain) / np.mean(plain)


def test_new_effects_are_deterministic_and_bad_values_refused(layout):
    a, b = BodyHarScenario(layout, seed=3), BodyHarScenario(layout, seed=3)
    index = transition_windows(a, 40)[0]
    wa, wb = a.window(index), b.window(index)
    assert wa.truth == wb.truth and wa.truth.extras["transition_share"] > 0
    for key, x in wa.signals.items():
        np.testing.assert_array_equal(x, wb.signals[key])
        assert np.all(np.isfinite(x))
    described = json.loads(json.dumps(a.describe()))
    assert described["confusion"] == 0.5 and described["sessions_per_subject"] == 4
    for bad in ({"confusion": 1.5}, {"transition_prob": -0.1}, {"displacement_deg": -1.0},
                {"transition_s": 4.0}, {"sessions_per_subject": 0}):
        with pytest.raises(NodeError):
            BodyHarScenario(layout, **bad)


def test_datasets_carry_the_subject_of_every_window(tmp_path):
    from node_firmware_sim.dataset import DatasetSpec, export_dataset
    from train.data import load_windows

    export_dataset(DatasetSpec(site=str(SITES / "body_har.toml"), scenario="body_har", windows=60, seed=1,
                               params={"sessions_per_subject": 1, "episode_windows": 2}), tmp_path / "d", workers=1)
    windows = load_windows(tmp_path / "d", progress=False)
    assert windows.extras["subject_id"].tolist() == [0.0] * 16 + [1.0] * 16 + [2.0] * 16 + [3.0] * 12
    assert np.isnan(windows.extras["other_label"]).sum() == np.sum(windows.extras["transition_share"] == 0)
