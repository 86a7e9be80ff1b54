"""Placement-description embeddings (SPAR+LLM): offline, deterministic, cached."""

from __future__ import annotations

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
