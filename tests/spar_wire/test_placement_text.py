"""Placement-description embeddings (SPAR+LLM): offline, deterministic, cached."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from spar_wire.errors import WireError
from spar_wire.placement_text import TEXT_DIMS, PlacementTextEncoder, text_model_id

SHIN = "left shin, halfway between knee and ankle"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPAR_TEXT_CACHE", str(tmp_path / "home"))


def test_embeddings_are_deterministic_unit_vectors():
    a = PlacementTextEncoder().embed([SHIN, "chest, on a strap over the sternum"])
    b = PlacementTextEncoder().embed([SHIN, "chest, on a strap over the sternum"])
    assert a.shape == (2, TEXT_DIMS) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)


def test_each_text_is_embedded_once_and_whitespace_does_not_matter():
    encoder = PlacementTextEncoder()
    first = encoder.embed([SHIN, SHIN, "  left shin,   halfway between knee and ankle "])
    assert encoder.computed == 1
    again = encoder.embed([SHIN])
    assert encoder.computed == 1
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[0], first[2])


def test_disk_cache_survives_a_restart(tmp_path):
    PlacementTextEncoder(tmp_path / "cache").embed([SHIN])
    restarted = PlacementTextEncoder(tmp_path / "cache")
    vector = restarted.embed([SHIN])
    assert restarted.computed == 0
    np.testing.assert_array_equal(vector, PlacementTextEncoder().embed([SHIN]))


def test_a_torn_cache_file_is_recomputed(tmp_path):
    PlacementTextEncoder(tmp_path / "cache").embed([SHIN])
    for path in (tmp_path / "cache" / "embeddings").glob("*.npy"):
        path.write_bytes(b"garbage")
    encoder = PlacementTextEncoder(tmp_path / "cache")
    encoder.embed([SHIN])
    assert encoder.computed == 1


def test_similar_placements_are_closer_than_unrelated_ones():
    e = PlacementTextEncoder().embed(["left shin, below the knee", "right shin, above the ankle",
                                      "ceiling of the kitchen, next to the window"])
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])


def test_empty_description_means_unknown_placement():
    vector = PlacementTextEncoder().embed(["", SHIN])
    assert not vector[0].any() and vector[1].any()


def test_non_text_is_refused():
    with pytest.raises(WireError, match="must be text"):
        PlacementTextEncoder().embed([42])


def test_model_id_names_the_encoder_and_its_version():
    assert text_model_id().startswith("wordllama-l2_supercat-256/0.")


# --------------------------------------------------------------------------- bounded caches (issue 19)
def _churn(encoder: PlacementTextEncoder, count: int, hot: str, every: int = 50) -> None:
    """``count`` distinct descriptions one birth at a time, with ``hot`` seen every ``every``."""
    for i in range(count):
        encoder.embed([f"pole {i}, facing bay {i % 97}, {i * 7919 % 10007} cm above the kerb"])
        if i % every == 0:
            encoder.embed([hot])


def test_a_stream_of_distinct_descriptions_stays_within_both_bounds(tmp_path):
    """5,000 distinct descriptions (a node, or an attacker, churning births) with the default bounds:
    at most 1024 vectors in memory and 4096 files on disk, and a description in use survives."""
    encoder = PlacementTextEncoder(tmp_path / "cache")
    encoder.embed([SHIN])
    _churn(encoder, 5000, SHIN)
    files = list((tmp_path / "cache" / "embeddings").iterdir())
    assert len(encoder.cached_texts()) <= encoder.max_entries == 1024
    assert len(files) <= encoder.max_files == 4096 and encoder.evicted_files > 0
    assert all(f.suffix == ".npy" for f in files)  # no temp files left behind
    computed = encoder.computed
    encoder.embed([SHIN])
    assert encoder.computed == computed  # the hot description never left the memory cache
    restarted = PlacementTextEncoder(tmp_path / "cache")
    np.testing.assert_array_equal(restarted.embed([SHIN]), PlacementTextEncoder().embed([SHIN]))
    assert restarted.computed == 0  # ... nor the disk: its memory hits rank it newest at eviction


def test_small_bounds_evict_the_least_recently_used(tmp_path):
    encoder = PlacementTextEncoder(tmp_path / "cache", max_entries=8, max_files=20)
    encoder.embed([SHIN])
    _churn(encoder, 300, SHIN, every=5)
    assert len(encoder.cached_texts()) == 8 and SHIN in encoder.cached_texts()
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.npy"))) <= 20
    # An old description is gone from memory and disk: it is embedded again, to the same vector.
    computed = encoder.computed
    old = "pole 1, facing bay 1, 7919 cm above the kerb"
    encoder.embed([old])
    assert encoder.computed == computed + 1
    # One call with more distinct texts than the memory keeps still answers every row.
    many = [f"bay {i}" for i in range(30)]
    rows = encoder.embed(many)
    np.testing.assert_array_equal(rows, PlacementTextEncoder().embed(many))


def test_a_disk_hit_refreshes_the_file_and_a_cold_file_is_evicted_first(tmp_path):
    PlacementTextEncoder(tmp_path / "cache").embed([SHIN, "cold"])
    folder = tmp_path / "cache" / "embeddings"
    for path in folder.iterdir():
        os.utime(path, (1_000_000, 1_000_000))  # both very old
    # max_files 5 evicts down to 5 (a tenth below it is 0 files): exactly one file goes.
    restarted = PlacementTextEncoder(tmp_path / "cache", max_entries=1, max_files=5)
    restarted.embed([SHIN])  # a disk hit: its file is touched now
    assert restarted.computed == 0
    assert (folder / restarted._disk_name(SHIN)).stat().st_mtime > 1_000_000
    restarted.embed([f"new {i}" for i in range(4)])  # 6 files: one over the bound
    names = {p.name for p in folder.iterdir()}
    assert restarted._disk_name(SHIN) in names and restarted._disk_name("cold") not in names
    assert len(names) == 5 and restarted.evicted_files == 1


def test_a_failing_eviction_never_raises(tmp_path, monkeypatch):
    encoder = PlacementTextEncoder(tmp_path / "cache", max_files=5)

    def refuse(self, missing_ok=False):
        raise PermissionError("read-only cache")

    def unreadable(path):
        raise OSError("I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "unlink", refuse)
        vectors = encoder.embed([f"bay {i}" for i in range(12)])
    assert vectors.shape == (12, TEXT_DIMS) and encoder.evicted_files == 0
    with monkeypatch.context() as patch:
        patch.setattr(os, "scandir", unreadable)
        assert encoder.embed(["bay 99"]).shape == (1, TEXT_DIMS)
    # Once the disk behaves again, the next write brings the folder back within its bound.
    encoder.embed(["bay 100"])
    assert len(list((tmp_path / "cache" / "embeddings").iterdir())) <= 5


def test_bounds_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        PlacementTextEncoder(max_entries=0)


# --------------------------------------------------------------------------- writes (spar_wire.atomic_file)
def test_cached_vectors_and_the_tokenizer_config_are_readable_by_other_users(tmp_path):
    PlacementTextEncoder(tmp_path / "cache").embed([SHIN])
    files = list((tmp_path / "cache" / "embeddings").iterdir())
    tokenizers = list((tmp_path / "home" / "wordllama" / "tokenizers").iterdir())
    assert len(files) == 1 and len(tokenizers) == 1
    for path in files + tokenizers:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_a_failing_disk_write_is_swallowed_and_leaves_no_debris(tmp_path, monkeypatch):
    """A full disk mid-write: the vector is still returned (from memory), no half file or temporary
    file stays in the cache folder, and the next write after the disk recovers lands normally."""
    real_save = np.save

    def disk_full(file, arr, allow_pickle=True):
        file.write(b"\x93NUMPY half a vec")
        raise OSError(errno.ENOSPC, "No space left on device")

    encoder = PlacementTextEncoder(tmp_path / "cache")
    with monkeypatch.context() as patch:
        patch.setattr(np, "save", disk_full)
        vectors = encoder.embed([SHIN, "chest"])
    np.testing.assert_array_equal(vectors, PlacementTextEncoder().embed([SHIN, "chest"]))
    assert os.listdir(tmp_path / "cache" / "embeddings") == []
    assert np.save is real_save
    encoder.embed(["bay 1"])
    assert [p.suffix for p in (tmp_path / "cache" / "embeddings").iterdir()] == [".npy"]


def test_a_cache_folder_that_cannot_be_made_only_costs_the_disk_cache(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    encoder = PlacementTextEncoder(blocked)
    np.testing.assert_array_equal(encoder.embed([SHIN]), PlacementTextEncoder().embed([SHIN]))
    assert encoder.computed == 1 and blocked.read_text().startswith("a file")
