import json

import numpy as np
import pytest

from node_firmware_sim.dataset import DatasetSpec, encode_windows, export_dataset, load_shard, read_manifest
from node_firmware_sim.errors import NodeError
from node_firmware_sim.firmware import FirmwareConfig, NodeFirmware
from node_firmware_sim.scenarios import make_scenario
from node_firmware_sim.scenarios.base import GroundTruth, SourceWindow, Target
from spar_wire.codecs import CodecSpec
from spar_wire.features import patchify
from spar_wire.message import decode_message

SITE = "configs/sites/parking_lot.toml"


def spec(**kw):
    defaults = dict(site=SITE, scenario="sine", windows=7, seed=4, shard_size=3)
    defaults.update(kw)
    return DatasetSpec(**defaults)


def all_arrays(path):
    manifest = read_manifest(path)
    shards = [load_shard(path, i).arrays for i in range(len(manifest["shards"]))]
    return {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}


def test_export_is_deterministic_whatever_the_worker_count(tmp_path):
    one = export_dataset(spec(), tmp_path / "a", workers=1)
    two = export_dataset(spec(), tmp_path / "b", workers=2)
    assert one.shards == two.shards == 3
    a, b = all_arrays(tmp_path / "a"), all_arrays(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert list(a["window_index"]) == list(range(7))
    other = all_arrays(export_dataset(spec(seed=5), tmp_path / "c", workers=1).out)
    assert not np.array_equal(other["image/geophone"], a["image/geophone"])


def test_manifest_describes_the_data(tmp_path):
    export_dataset(spec(), tmp_path, workers=1)
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    assert manifest["seed"] == 4 and manifest["scenario"] == "sine" and manifest["windows"] == 7
    assert manifest["modalities"]["microphone"]["feature_hash"] == "dace08dddfa4ecdf"
    assert manifest["modalities"]["microphone"]["n_tokens"] == 32
    assert manifest["site"]["node_ids"] == [f"n0{i}" for i in range(1, 9)]
    assert [s["windows"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["generation"]["windows_per_s"] > 0


def test_tokens_are_what_the_firmware_sends(tmp_path, parking_lot):
    export_dataset(spec(codec="jpeg:70"), tmp_path, workers=1)
    shard = load_shard(tmp_path, 1)
    tokens = shard.tokens("microphone")
    assert tokens.shape == (3, 8, 32, 128)
    window = make_scenario("sine", parking_lot, 4).window(4)
    firmware = NodeFirmware(parking_lot, "n06", FirmwareConfig(codec=CodecSpec("jpeg", 70)))
    frame = firmware.encode("microphone", window.signals[("n06", "microphone")], 0)
    expected = patchify(decode_message(frame.frame).image(), parking_lot.modalities["microphone"].features)
    np.testing.assert_allclose(tokens[1, 5], expected, atol=1e-4)  # window 4 = shard 1, row 1


def test_missing_traces_and_targets_are_recorded(parking_lot):
    window = make_scenario("sine", parking_lot, 0).window(0)
    signals = dict(window.signals)
    del signals[("n02", "geophone")]
    truth = GroundTruth(label=3, targets=(Target(2, (1.0, 2.0)), Target(4, (5.0, 6.0))),
                        extras={"speed": 4.5})
    arrays = encode_windows(parking_lot, [SourceWindow(9, 18.0, signals, truth)], CodecSpec("png"), 4)
    assert arrays["present/geophone"][0].tolist() == [True, False] + [True] * 6
    assert arrays["present/microphone"][0].all()
    assert not arrays["image/geophone"][0, 1].any()
    assert arrays["label"][0] == 3 and arrays["target_class"][0].tolist() == [2, 4, -1, -1]
    np.testing.assert_array_equal(arrays["target_position"][0, 1], [5.0, 6.0])
    assert np.isnan(arrays["target_position"][0, 2]).all()
    assert arrays["extra/speed"][0] == 4.5


def test_damaged_shard_and_existing_dataset(tmp_path):
    export_dataset(spec(windows=2, shard_size=2), tmp_path, workers=1)
    with pytest.raises(NodeError, match="already holds"):
        export_dataset(spec(windows=2, shard_size=2), tmp_path, workers=1)
    path = tmp_path / "shard-00000.npz"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(NodeError, match="sha256"):
        load_shard(tmp_path, 0)
    with pytest.raises(NodeError, match="no shard 5"):
        load_shard(tmp_path, 5)


@pytest.mark.parametrize("kw, fragment", [({"windows": 0}, "windows"), ({"codec": "gif"}, "codec")])
def test_bad_specs(kw, fragment):
    with pytest.raises(Exception, match=fragment):
        spec(**kw)
