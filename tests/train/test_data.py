import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from spar_wire.dataset_format import MANIFEST, load_shard, read_manifest
from train.data import (
    DataError,
    _merge,
    drop_nodes,
    iterate_batches,
    label_subset,
    load_windows,
    steps_per_epoch,
    temporal_split,
    token_statistics,
)
from train.errors import TrainError


def edited_copy(src, dst, shard_index, edit):
    """A copy of dataset ``src`` at ``dst`` where ``edit(arrays)`` changed one shard (sha256 updated)."""
    shutil.copytree(src, dst)
    arrays = dict(load_shard(dst, shard_index).arrays)
    edit(arrays)
    manifest = read_manifest(dst)
    path = dst / manifest["shards"][shard_index]["file"]
    np.savez_compressed(path, **arrays)
    manifest["shards"][shard_index]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


def manual_stats(window_set, name, present):
    values = window_set.tokens[name][present].astype(np.float64)
    return values.mean(), values.std()


# --------------------------------------------------------------------------- loading
def test_batch_matches_the_manifest(tiny_parking_dataset, tiny_window_set):
    manifest = read_manifest(tiny_parking_dataset)
    ws = tiny_window_set
    assert len(ws) == manifest["windows"] == 48
    assert ws.class_names == tuple(manifest["class_names"]) and ws.n_nodes == len(manifest["site"]["node_ids"])
    assert ws.modalities == tuple(manifest["modalities"])
    assert ws.feature_hashes == {k: v["feature_hash"] for k, v in manifest["modalities"].items()}
    assert ws.token_shapes == {k: (v["n_tokens"], v["token_dim"]) for k, v in manifest["modalities"].items()}
    assert (ws.position_dims, ws.target_dims, ws.max_targets, ws.episode_windows) == (2, 2, 4, 4)
    assert ws.site["node_ids"] == manifest["site"]["node_ids"]
    json.dumps(ws.site)  # checkpoints store it

    batch = ws.batch([0, 17, 40])
    b, n = 3, ws.n_nodes
    for name, (m, d) in ws.token_shapes.items():
        assert batch.tokens[name].shape == (b, n, m, d) and batch.tokens[name].dtype == torch.float32
        assert batch.present[name].shape == (b, n) and batch.present[name].dtype == torch.bool
    assert batch.positions.shape == (b, n, 2) and batch.positions.dtype == torch.float32
    np.testing.assert_allclose(batch.positions[1].numpy(), manifest["site"]["positions"])
    assert batch.node_index.dtype == torch.int64 and batch.node_index.tolist() == [list(range(n))] * b
    assert batch.label.shape == (b,) and batch.label.dtype == torch.int64
    assert batch.target_class.shape == (b, 4) and batch.target_class.dtype == torch.int64
    assert batch.target_position.shape == (b, 4, 2) and batch.target_position.dtype == torch.float32
    # window 17 = shard 1, row 1: the tokens are the reader's, i.e. the aggregator's
    shard = load_shard(tiny_parking_dataset, 1)
    np.testing.assert_array_equal(batch.tokens["geophone"][1].numpy(), shard.tokens("geophone")[1])
    assert batch.label[1] == shard.arrays["label"][1]


def test_limit_and_subset(tiny_parking_dataset, tiny_window_set):
    first = load_windows(tiny_parking_dataset, limit=20, progress=False)
    assert len(first) == 20 and first.window_index.tolist() == list(range(20))
    np.testing.assert_array_equal(first.tokens["microphone"], tiny_window_set.tokens["microphone"][:20])
    sub = tiny_window_set.subset([5, 3])
    assert sub.window_index.tolist() == [5, 3] and sub.extras["episode"].tolist() == [1, 0]
    sub.tokens["geophone"][:] = 0  # a copy: the shared set is untouched
    assert tiny_window_set.tokens["geophone"][5].any()


def test_absent_nodes_have_zero_tokens_and_do_not_count_in_statistics(tiny_parking_dataset, tiny_window_set,
                                                                      tmp_path):
    def knock_out(arrays):  # node 3 of window 1 sent nothing, and the stored image is garbage
        arrays["present/microphone"][1, 3] = False
        arrays["image/microphone"][1, 3] = 255
        arrays["scale/microphone"][1, 3] = 1e6

    ws = load_windows(edited_copy(tiny_parking_dataset, tmp_path / "d", 0, knock_out), progress=False)
    assert not ws.present["microphone"][1, 3] and ws.present["microphone"].sum() == 48 * 8 - 1
    assert not ws.tokens["microphone"][1, 3].any()
    assert not ws.batch([1]).tokens["microphone"][0, 3].any()
    mean, std = token_statistics(ws)["microphone"]
    expected = manual_stats(tiny_window_set, "microphone", ws.present["microphone"])
    np.testing.assert_allclose((mean, std), expected, rtol=1e-6)
    assert -150 < mean < 20  # dB, not dragged by 1e6 nor towards 0 by zeros


def test_statistics_ignore_absent_tokens_whatever_they_hold(tiny_window_set):
    ws = tiny_window_set.subset(range(8))
    ws.present["geophone"][:, ::2] = False
    ws.tokens["geophone"][:, ::2] = 1e9  # never happens after loading; shows the mask is what counts
    mean, std = token_statistics(ws, chunk=3)["geophone"]
    np.testing.assert_allclose((mean, std), manual_stats(ws, "geophone", ws.present["geophone"]), rtol=1e-6)
    ws.tokens["geophone"][:] = -80.0
    assert token_statistics(ws)["geophone"] == (-80.0, 1e-3)  # std floored
    ws.present["geophone"][:] = False
    with pytest.raises(DataError, match="geophone: no present node"):
        token_statistics(ws)


def test_clear_errors_for_bad_datasets(tiny_parking_dataset, tmp_path):
    with pytest.raises(DataError, match="no such dataset folder") as info:
        load_windows(tmp_path / "nowhere", progress=False)
    assert isinstance(info.value, TrainError) and isinstance(info.value, ValueError)
    shutil.copytree(tiny_parking_dataset, tmp_path / "wrong")
    manifest = json.loads((tmp_path / "wrong" / MANIFEST).read_text())
    (tmp_path / "wrong" / MANIFEST).write_text(json.dumps({**manifest, "format": "spar-model"}))
    with pytest.raises(DataError, match="not a spar-dataset v1 manifest"):
        load_windows(tmp_path / "wrong", progress=False)
    path = shutil.copytree(tiny_parking_dataset, tmp_path / "damaged") / "shard-00002.npz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="shard-00002.npz: sha256 does not match"):
        load_windows(tmp_path / "damaged", progress=False)
    with pytest.raises(DataError, match="limit"):
        load_windows(tiny_parking_dataset, limit=0)


def test_extras_missing_from_some_shards_are_nan():
    parts = [{"label": np.zeros(2), "extra/speed": np.ones(2)}, {"label": np.zeros(3)}]
    merged = _merge(parts, None)
    assert merged["extra/speed"][:2].tolist() == [1, 1] and np.isnan(merged["extra/speed"][2:]).all()
    with pytest.raises(DataError, match="target_class is missing"):
        _merge([{"label": np.zeros(1), "target_class": np.zeros(1)}, {"label": np.zeros(1)}], None)


# --------------------------------------------------------------------------- splits
def test_temporal_split():
    train, val = temporal_split(48, 0.25)
    assert train.tolist() == list(range(36)) and val.tolist() == list(range(36, 48))
    train, val = temporal_split(50, 0.25, align=4)  # cut 38 -> 36: no episode of 4 straddles it
    assert len(train) == 36 and val[0] == 36 and val[-1] == 49
    assert [len(s) for s in temporal_split(3, 0.1)] == [2, 1]  # at least one window each side
    assert [len(s) for s in temporal_split(5, 0.0)] == [5, 0]
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            temporal_split(10, bad)
    with pytest.raises(ValueError, match="cannot split 1"):
        temporal_split(1, 0.5)


def test_label_subset_is_stratified_and_seeded():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    train_idx = np.arange(100, 116)
    assert label_subset(train_idx, labels, 1.0, 0).tolist() == train_idx.tolist()
    subset = label_subset(train_idx, labels, 0.2, seed=3)
    assert np.all(np.diff(subset) > 0) and set(subset) <= set(train_idx)
    counts = np.bincount(labels[subset - 100], minlength=3)
    assert counts.tolist() == [2, 1, 1]  # round(0.2 * 10), round(0.2 * 5), at least one
    assert np.bincount(labels[label_subset(train_idx, labels, 0.5, 0) - 100]).tolist() == [5, 3, 1]  # 2.5 -> 3
    assert label_subset(train_idx, labels, 0.2, seed=3).tolist() == subset.tolist()
    draws = {tuple(label_subset(train_idx, labels, 0.2, seed=s)) for s in range(10)}
    assert len(draws) > 1
    for ratio in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match=r"label ratio must be in \(0, 1\]"):
            label_subset(train_idx, labels, ratio, 0)
    with pytest.raises(ValueError, match="one length"):
        label_subset(train_idx, labels[:-1], 0.5, 0)


# --------------------------------------------------------------------------- batch order
@pytest.mark.parametrize("n, batch_size, shuffle, drop_last", [
    (23, 4, True, False), (23, 4, True, True), (24, 3, False, False), (17, 8, True, False), (3, 4, True, False),
])
def test_two_ranks_see_what_one_process_sees_with_a_doubled_batch(n, batch_size, shuffle, drop_last):
    indices = np.arange(1000, 1000 + n)
    kw = dict(shuffle=shuffle, seed=7, epoch=2, drop_last=drop_last)
    single = list(iterate_batches(indices, 2 * batch_size, **kw))
    ranks = [list(iterate_batches(indices, batch_size, rank=r, world_size=2, **kw)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == steps_per_epoch(n, batch_size, world_size=2,
                                                                              drop_last=drop_last)
    for step, whole in enumerate(single):
        np.testing.assert_array_equal(np.concatenate([ranks[0][step], ranks[1][step]]), whole)
        if len(whole) == 2 * batch_size:
            assert len(ranks[0][step]) == len(ranks[1][step]) == batch_size


def test_epoch_order_covers_every_index_once_and_depends_on_seed_and_epoch():
    indices = np.arange(50, 80)

    def epoch_order(seed, epoch, shuffle=True):
        return np.concatenate(list(iterate_batches(indices, 7, shuffle=shuffle, seed=seed, epoch=epoch,
                                                   drop_last=False)))

    assert sorted(epoch_order(0, 0).tolist()) == indices.tolist()
    assert epoch_order(0, 0).tolist() == epoch_order(0, 0).tolist()
    assert epoch_order(0, 0).tolist() != epoch_order(0, 1).tolist()
    assert epoch_order(0, 0).tolist() != epoch_order(1, 0).tolist()
    assert epoch_order(0, 0, shuffle=False).tolist() == indices.tolist()
    dropped = list(iterate_batches(indices, 7, shuffle=True, seed=0, epoch=0, drop_last=True))
    assert [len(b) for b in dropped] == [7] * 4
    with pytest.raises(ValueError, match="rank"):
        next(iterate_batches(indices, 4, shuffle=False, seed=0, epoch=0, drop_last=False, rank=2, world_size=2))


# --------------------------------------------------------------------------- robustness
def test_drop_nodes(tiny_window_set):
    batch = tiny_window_set.batch(range(16))
    before = batch.tokens["microphone"].clone()
    same = drop_nodes(batch, 0.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(same.present[m], batch.present[m]) for m in batch.modalities)
    gone = drop_nodes(batch, 1.0, torch.Generator().manual_seed(0))
    assert not any(gone.present[m].any() or gone.tokens[m].any() for m in batch.modalities)

    half = drop_nodes(batch, 0.5, torch.Generator().manual_seed(1))
    lost = ~half.present["microphone"]
    assert 0 < lost.sum() < lost.numel()
    assert torch.equal(lost, ~half.present["geophone"])  # a node loses all its modalities at once
    assert not half.tokens["microphone"][lost].any()
    assert torch.equal(half.tokens["microphone"][~lost], before[~lost])
    again = drop_nodes(batch, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(again.present["microphone"], half.present["microphone"])
    apart = drop_nodes(batch, 0.5, torch.Generator().manual_seed(1), per_modality=True)
    assert not torch.equal(apart.present["microphone"], apart.present["geophone"])
    assert torch.equal(batch.tokens["microphone"], before) and batch.present["microphone"].all()  # input kept
    with pytest.raises(ValueError, match="drop rate"):
        drop_nodes(batch, 1.5, torch.Generator())
