"""IndoorCsiScenario: determinism, walks (continuous, legal, through doors), path loss and walls,
frequency selectivity, node subsets, learnability of the position from tokens, dataset export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from node_firmware_sim.dataset import DatasetSpec, export_dataset, load_shard, read_manifest
from node_firmware_sim.errors import NodeError
from node_firmware_sim.scenarios import make_scenario
from node_firmware_sim.scenarios.indoor_csi import C_M_S, IndoorCsiScenario, office_floor_plan
from spar_wire.feature_config import PRESETS
from spar_wire.features import extract_tokens, patchify
from spar_wire.floor_plan import Doorway, FloorPlan, Region, Wall, floor_plan_from_source
from spar_wire.site_layout import SiteLayout, load_site_layout, parse_site_layout

SITE = Path(__file__).resolve().parents[2] / "configs" / "sites" / "indoor_csi.toml"


@pytest.fixture(scope="module")
def layout() -> SiteLayout:
    return load_site_layout(SITE)


@pytest.fixture(scope="module")
def scenario(layout) -> IndoorCsiScenario:
    return IndoorCsiScenario(layout, seed=5, episode_windows=6)


def small_layout(aps: dict[str, tuple[float, float]], modality: dict | None = None) -> SiteLayout:
    return parse_site_layout({
        "site": {"id": "hall", "frame": "floor"},
        "modalities": {"csi": modality or {"preset": "indoor_csi"}},
        "nodes": [{"id": k, "position": list(v), "modalities": ["csi"]} for k, v in aps.items()],
    })


def hall_plan() -> FloorPlan:
    """20 m x 6 m hall split at x = 10 by a 6 dB wall with a door near its south end."""
    outer = {"thickness_m": 0.3, "loss_db": 13.0}
    walls = (Wall((0, 0), (20, 0), **outer), Wall((20, 0), (20, 6), **outer), Wall((20, 6), (0, 6), **outer),
             Wall((0, 6), (0, 0), **outer), Wall((10, 0), (10, 6), thickness_m=0.15, loss_db=6.0))
    rooms = (Region("west", ((0, 0), (10, 0), (10, 6), (0, 6))), Region("east", ((10, 0), (20, 0), (20, 6), (10, 6))))
    return FloorPlan((0, 0, 20, 6), walls, (Doorway((10, 0.5), (10, 1.4)),), rooms)


def test_windows_are_deterministic_and_node_subsets_match(layout, scenario):
    again = make_scenario("indoor_csi", layout, 5, episode_windows=6)
    w1, w2 = scenario.window(13), again.window(13)
    assert w1.truth == w2.truth and set(w1.signals) == {(n, "csi") for n in layout.node_ids}
    for key, x in w1.signals.items():
        np.testing.assert_array_equal(x, w2.signals[key])
        assert x.shape == (32, 100) and x.dtype == np.float64 and np.all(np.isfinite(x)) and np.all(x > 0)
    part = scenario.window(13, ("ap7", "ap2"))
    assert set(part.signals) == {("ap7", "csi"), ("ap2", "csi")} and part.truth == w1.truth
    for key, x in part.signals.items():
        np.testing.assert_array_equal(x, w1.signals[key])
    assert not np.array_equal(scenario.window(14).signals[("ap1", "csi")], w1.signals[("ap1", "csi")])
    other = IndoorCsiScenario(layout, seed=6, episode_windows=6).window(13)
    assert not np.array_equal(other.signals[("ap1", "csi")], w1.signals[("ap1", "csi")])
    assert scenario.truth(13) == w1.truth
    with pytest.raises(NodeError, match="no node"):
        scenario.window(0, ("ap99",))


def test_walks_are_continuous_legal_and_visit_rooms_through_doors(scenario):
    p, plan = scenario.params, scenario.plan
    rooms_seen, moving = set(), 0
    for episode in range(12):
        walk = scenario.walk(episode)
        t = np.arange(0, p.episode_windows * scenario.window_s, 0.02)
        xy = walk.position(t)
        assert plan.is_legal(xy).all(), f"episode {episode} leaves the legal area"
        speed = np.linalg.norm(np.diff(xy, axis=0), axis=1) / 0.02
        assert speed.max() <= p.speed_m_s[1] + 1e-6
        moving += int((speed > 0.1).sum())
        rooms = plan.room_of(xy)
        rooms_seen.update(rooms.tolist())
        # changing rooms means walking through a doorway: no step jumps a wall
        assert (plan.walls_crossed(xy[:-1], xy[1:]) == 0).all()
    assert rooms_seen == set(range(len(scenario.class_names)))
    assert 0.2 < moving / (12 * len(t)) < 0.95  # walks and pauses


def test_truth_follows_the_walk_across_consecutive_windows(scenario):
    n = scenario.params.episode_windows
    truths = [scenario.truth(k) for k in range(n, 2 * n)]  # episode 1
    walk = scenario.walk(1)
    for k, truth in enumerate(truths):
        centre = walk.position(np.array([(k + 0.5) * scenario.window_s]))[0]
        (target,) = truth.targets
        np.testing.assert_allclose(target.position, centre)
        assert truth.label == target.class_id == int(scenario.plan.room_of(centre[None])[0])
        assert 0 <= truth.extras["speed_m_s"] <= scenario.params.speed_m_s[1] + 1e-9
        assert truth.extras["episode"] == 1.0 and 0 <= truth.extras["los_aps"] <= 8
    steps = np.diff([t.targets[0].position for t in truths], axis=0)
    assert (np.linalg.norm(steps, axis=1) <= scenario.params.speed_m_s[1] * scenario.window_s + 1e-9).all()
    assert scenario.class_names == ("office_a", "office_b", "meeting", "corridor", "kitchen", "office_c", "lab")


def test_amplitude_falls_with_distance_and_walls_as_free_space_predicts():
    plan = hall_plan()
    single_path = IndoorCsiScenario(small_layout({"ap": (2.0, 4.5)}), 0, floor_plan=plan, n_scatterers=0,
                                    reflection_loss_db=60.0)
    lam = C_M_S / single_path.params.carrier_hz
    dz = single_path.params.ap_height_m - single_path.params.device_height_m
    points = np.array([[4.0, 4.5], [6.0, 4.5], [9.0, 4.5], [12.0, 4.5], [18.0, 4.5]])
    got = 20 * np.log10(np.abs(single_path.channel_response("ap", points)).mean(axis=1))
    distance = np.hypot(points[:, 0] - 2.0, dz)
    walls = np.array([0, 0, 0, 6.0, 6.0])  # the last two are behind the x = 10 wall
    np.testing.assert_allclose(got, 20 * np.log10(lam / (4 * np.pi * distance)) - walls, atol=0.05)
    # with reflections and scatterers the wideband level still falls with distance and walls
    full = IndoorCsiScenario(small_layout({"ap": (2.0, 4.5)}), 0, floor_plan=plan)
    ys = np.linspace(3.5, 5.5, 9)
    level = [20 * np.log10(np.abs(full.channel_response("ap", np.column_stack([np.full(9, x), ys]))).mean())
             for x in (4.0, 8.0, 16.0)]
    assert level[0] > level[1] + 4 and level[1] > level[2] + 6


def test_frequency_selectivity_comes_from_multipath(layout, scenario):
    plan = hall_plan()
    flat = IndoorCsiScenario(small_layout({"ap": (2.0, 4.5)}), 0, floor_plan=plan, n_scatterers=0,
                             reflection_loss_db=60.0)
    rich = IndoorCsiScenario(small_layout({"ap": (2.0, 4.5)}), 0, floor_plan=plan)
    points = np.column_stack([np.linspace(3, 18, 40), np.full(40, 2.0)])

    def ripple_db(s: IndoorCsiScenario) -> np.ndarray:
        db = 20 * np.log10(np.abs(s.channel_response("ap", points)))
        return db.max(axis=1) - db.min(axis=1)

    assert ripple_db(flat).max() < 0.1
    assert np.median(ripple_db(rich)) > 2.0
    ripples = [np.median(np.ptp(20 * np.log10(x), axis=0)) for x in scenario.window(3).signals.values()]
    assert np.median(ripples) > 2.0  # per packet, across the 32 subcarriers of the office
    freqs = scenario.subcarrier_hz(32)
    assert freqs[0] == pytest.approx(5.19e9) and freqs[-1] == pytest.approx(5.23e9)


def test_noise_free_windows_and_body_shadowing(layout):
    # geometry evaluated at every packet: the window is exactly the channel along the walk
    quiet = IndoorCsiScenario(layout, 2, episode_windows=4, noise_scale=0.0, geometry_step_s=0.02)
    x = quiet.window(1).signals[("ap4", "csi")]
    walk = quiet.walk(0)
    t = quiet.window_s + np.arange(100) / 50.0
    heading, _ = walk.heading_speed(t)
    expected = np.abs(quiet.channel_response("ap4", walk.position(t), 32, heading)).T
    np.testing.assert_allclose(x, expected, rtol=1e-3, atol=1e-3 * expected.max())
    # facing away from the AP costs up to body_loss_db on the direct path
    ap = np.array([5.0, 6.0])
    point = np.array([[5.0, 3.0]])
    toward = np.abs(quiet.channel_response("ap4", point, 32, np.array([np.pi / 2]))).mean()
    away = np.abs(quiet.channel_response("ap4", point, 32, np.array([-np.pi / 2]))).mean()
    assert 3.0 < 20 * np.log10(toward / away) <= quiet.params.body_loss_db + 1.0
    assert quiet.plan.walls_crossed(ap[None], point).tolist() == [1]


def test_position_is_learnable_from_mean_tokens_per_ap(layout):
    """kNN from per-AP, per-subcarrier-group token means to (x, y) beats the mean position by far.

    Windows of one episode are near each other, so train and test are split by episode.
    """
    cfg = layout.modalities["csi"].features
    source = IndoorCsiScenario(layout, seed=11, episode_windows=10)
    features, positions, episodes = [], [], []
    for index in range(400):
        window = source.window(index)
        tokens = np.stack([extract_tokens(window.signals[(n, "csi")], cfg) for n in layout.node_ids])
        grid = tokens.reshape(len(layout.node_ids), *cfg.patch_grid, cfg.token_dim)
        features.append(grid.mean(axis=(2, 3)).ravel())  # [APs x subcarrier groups]
        positions.append(window.truth.targets[0].position)
        episodes.append(source.episode_of(index)[0])
    x, y, test = np.array(features), np.array(positions), np.array(episodes) % 4 == 3
    baseline = np.median(np.linalg.norm(y[test] - y[~test].mean(axis=0), axis=1))
    distance = ((x[test][:, None, :] - x[~test][None, :, :]) ** 2).sum(axis=-1)
    nearest = np.argsort(distance, axis=1)[:, :5]
    error = np.median(np.linalg.norm(y[~test][nearest].mean(axis=1) - y[test], axis=1))
    print(f"kNN median error {error:.2f} m, mean-position baseline {baseline:.2f} m")
    assert error < 0.6 * baseline


def test_export_writes_the_floor_plan_into_the_manifest(tmp_path, scenario):
    spec = DatasetSpec(site=str(SITE), scenario="indoor_csi", windows=6, seed=5, codec="webp:90", shard_size=6,
                       params={"episode_windows": 6})
    report = export_dataset(spec, tmp_path / "ds", workers=1)
    assert report.windows == 6
    manifest = read_manifest(tmp_path / "ds")
    plan = floor_plan_from_source(manifest["source"])
    assert plan == office_floor_plan() and floor_plan_from_source(manifest) == plan
    assert manifest["class_names"] == list(scenario.class_names)
    assert manifest["modalities"]["csi"]["image_shape"] == [32, 25]
    assert (manifest["modalities"]["csi"]["n_tokens"], manifest["modalities"]["csi"]["token_dim"]) == (20, 40)
    shard = load_shard(tmp_path / "ds", 0)
    images = shard.images("csi")
    assert images.shape == (6, 8, 32, 25) and np.all(np.isfinite(images))
    cfg = PRESETS["indoor_csi"]
    assert patchify(images[0, 0], cfg).shape == (20, 40)  # what the aggregator does with a message
    truth = [scenario.truth(i) for i in range(6)]
    np.testing.assert_array_equal(shard.arrays["label"], [t.label for t in truth])
    np.testing.assert_allclose(shard.arrays["target_position"][:, 0], [t.targets[0].position for t in truth],
                               atol=1e-4)
    grid = plan.legal_grid(0.2)
    assert grid.lookup(shard.arrays["target_position"][:, 0].astype(np.float64)).all()


def test_floor_plan_parameter_and_bad_setups(tmp_path, layout):
    plan = hall_plan()
    aps = {"w": (2.0, 3.0), "e": (18.0, 3.0)}
    as_dict = IndoorCsiScenario(small_layout(aps), 0, floor_plan=plan.to_dict())
    path = tmp_path / "hall.json"
    path.write_text(json.dumps(plan.to_dict()))
    from_file = make_scenario("indoor_csi", small_layout(aps), 0, floor_plan=str(path))
    assert as_dict.plan == from_file.plan == plan and as_dict.class_names == ("west", "east")
    assert json.loads(json.dumps(as_dict.describe()))["floor_plan"] == plan.to_dict()
    with pytest.raises(NodeError, match="floor plan: .*does not lie on any wall"):
        IndoorCsiScenario(small_layout(aps), 0, floor_plan={**plan.to_dict(), "doorways": [{"a": [1, 1], "b": [2, 1]}]})
    with pytest.raises(NodeError, match="cannot read floor plan"):
        IndoorCsiScenario(small_layout(aps), 0, floor_plan=str(tmp_path / "missing.json"))
    with pytest.raises(NodeError, match="outside the floor plan"):
        IndoorCsiScenario(small_layout({"far": (30.0, 3.0)}), 0, floor_plan=plan)
    with pytest.raises(NodeError, match="subcarrier_db"):
        IndoorCsiScenario(small_layout(aps, {"preset": "har_imu", "channels": 3}), 0, floor_plan=plan)
    with pytest.raises(NodeError, match="unknown parameter"):
        make_scenario("indoor_csi", layout, 0, walls=3)
    with pytest.raises(NodeError, match="speed_m_s"):
        IndoorCsiScenario(layout, 0, speed_m_s=[1.5, 0.5])
    blocked = {**office_floor_plan().to_dict()}
    blocked["obstacles"] = [{"name": "crate", "polygon": [[11, 5.6], [12, 5.6], [12, 6.4], [11, 6.4]]}]
    with pytest.raises(NodeError, match="corridor.*blocked"):
        IndoorCsiScenario(layout, 0, floor_plan=blocked)
    filled = {**plan.to_dict(), "obstacles": [{"name": "stack", "polygon": [[10, 0], [20, 0], [20, 6], [10, 6]]}]}
    with pytest.raises(NodeError, match="no legal standing point in room 'east'"):
        IndoorCsiScenario(small_layout(aps), 0, floor_plan=filled)
    narrow = {**plan.to_dict(), "doorways": [{"a": [10, 0.5], "b": [10, 0.65]}]}
    with pytest.raises(NodeError, match="doorway 0 cannot be walked through"):
        IndoorCsiScenario(small_layout(aps), 0, floor_plan=narrow)
    assert PRESETS["indoor_csi"].transform == "subcarrier_db"


def test_subcarrier_sum_matches_the_direct_formula():
    from node_firmware_sim.scenarios.indoor_csi import _subcarrier_sum

    rng = np.random.default_rng(1)
    amp = rng.standard_normal((2, 5, 7)) + 1j * rng.standard_normal((2, 5, 7))
    amp[1, :, 3] = 0.0  # a path that does not exist for AP 1
    length = rng.uniform(2.0, 40.0, (2, 5, 7))
    freqs = 5.19e9 + 40e6 * np.arange(32) / 31
    direct = (amp[..., None] * np.exp(-2j * np.pi * freqs * length[..., None] / C_M_S)).sum(axis=2)
    np.testing.assert_allclose(_subcarrier_sum(amp, length, freqs), direct, atol=1e-4 * np.abs(direct).max())
