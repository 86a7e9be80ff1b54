"""The dataset reader of the wire contract, on a small hand-made dataset (no exporter needed)."""

import hashlib
import json

import numpy as np
import pytest

from spar_wire.dataset_format import FORMAT, FORMAT_VERSION, MANIFEST, load_shard, read_manifest
from spar_wire.errors import WireError
from spar_wire.feature_config import feature_preset
from spar_wire.features import patchify

CFG = feature_preset("har_imu")  # 3 channels: checks the channel order of tokens()
W, N = 3, 2


def make_dataset(path, *, quantized=True):
    """One shard of W windows from N nodes; node 1 of window 0 is absent with a huge stored value."""
    rng = np.random.default_rng(0)
    shape = (W, N, *CFG.image_shape)
    image = rng.integers(0, 256, shape).astype(np.uint8) if quantized else rng.normal(size=shape).astype(np.float32)
    present = np.ones((W, N), bool)
    present[0, 1] = False
    image[0, 1] = 255 if quantized else 1e6
    arrays = {"window_index": np.arange(W), "positions": np.zeros((W, N, 2), np.float32),
              "image/imu": image, "scale/imu": np.full((W, N), 0.5, np.float32),
              "offset/imu": np.full((W, N), -100.0, np.float32), "present/imu": present,
              "label": np.zeros(W, np.int64)}
    path.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path / "shard-00000.npz", **arrays)
    data = (path / "shard-00000.npz").read_bytes()
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "class_names": ["none"], "site": {},
                "modalities": {"imu": {"feature_hash": CFG.hash, "feature_config": CFG.to_dict()}},
                "shards": [{"file": "shard-00000.npz", "windows": W, "sha256": hashlib.sha256(data).hexdigest()}]}
    (path / MANIFEST).write_text(json.dumps(manifest))
    return arrays


@pytest.mark.parametrize("quantized", [True, False])
def test_images_and_tokens(tmp_path, quantized):
    arrays = make_dataset(tmp_path, quantized=quantized)
    shard = load_shard(tmp_path, 0)
    assert len(shard) == W
    images = shard.images("imu")
    assert images.dtype == np.float32 and images.shape == (W, N, *CFG.image_shape)
    assert not images[0, 1].any()  # absent node: zeros, whatever is stored
    expected = arrays["image/imu"][1, 0].astype(np.float32)
    if quantized:
        expected = expected * 0.5 - 100.0
    np.testing.assert_allclose(images[1, 0], expected)
    tokens = shard.tokens("imu")
    assert tokens.shape == (W, N, CFG.n_tokens, CFG.token_dim) and tokens.dtype == np.float32
    for w in range(W):
        for n in range(N):
            np.testing.assert_array_equal(tokens[w, n], patchify(images[w, n], CFG))


def test_damaged_shard_is_refused(tmp_path):
    make_dataset(tmp_path)
    path = tmp_path / "shard-00000.npz"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WireError, match="sha256 does not match.*damaged") as info:
        load_shard(tmp_path, 0)
    assert info.value.reason == "bad_dataset"


def test_missing_shard_index_and_file(tmp_path):
    make_dataset(tmp_path)
    for index in (1, -1):
        with pytest.raises(WireError, match=rf"no shard {index} \(it has 1\)"):
            load_shard(tmp_path, index)
    (tmp_path / "shard-00000.npz").unlink()
    with pytest.raises(WireError, match="shard-00000.npz: cannot read"):
        load_shard(tmp_path, 0)


@pytest.mark.parametrize("change, fragment", [
    ({"format": "spar-model"}, "not a spar-dataset v1 manifest"),
    ({"version": 2}, "not a spar-dataset v1 manifest"),
    ({"shards": "DELETE"}, "missing field.*shards"),
])
def test_wrong_format_is_refused(tmp_path, change, fragment):
    make_dataset(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest.update(change)
    manifest = {k: v for k, v in manifest.items() if v != "DELETE"}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(WireError, match=fragment):
        read_manifest(tmp_path)


def test_missing_folder_or_manifest(tmp_path):
    with pytest.raises(WireError, match="no such dataset folder"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(WireError, match=f"{MANIFEST}: cannot read"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(WireError, match="not JSON"):
        read_manifest(tmp_path)
