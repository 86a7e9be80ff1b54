"""Manifests beside exported artifacts: round trip through spar_wire, hash checks, derived manifests."""

import shutil

import pytest

from export.manifests import derive_manifest, manifest_for, manifest_path_for, sha256_of
from spar_wire.errors import WireError
from spar_wire.model_manifest import load_manifest


@pytest.fixture
def artifact(fp32_export, tmp_path):
    """A private copy of the FP32 ONNX (the tests change its bytes)."""
    path = tmp_path / "model.onnx"
    shutil.copyfile(fp32_export.onnx, path)
    return path


def _manifest(model, windows, path):
    info = {"feature_hashes": windows.feature_hashes, "class_names": list(windows.class_names)}
    return manifest_for(model, info, path, name="tiny-parking", version="1.2.3", metric={"accuracy": 0.5},
                        node_range=(2, 16))


def test_round_trip_through_load_manifest(trained_model, tiny_window_set, artifact):
    manifest = _manifest(trained_model, tiny_window_set, artifact)
    manifest.write(manifest_path_for(artifact))
    loaded = load_manifest(manifest_path_for(artifact))
    assert loaded == manifest
    loaded.verify_artifact()
    assert loaded.sha256 == sha256_of(artifact) and loaded.artifact_path == artifact
    assert loaded.node_range == (2, 16) and loaded.class_names == tiny_window_set.class_names
    assert {m: r.feature_hash for m, r in loaded.modalities.items()} == tiny_window_set.feature_hashes
    assert [t.name for t in loaded.inputs] == list(trained_model.input_names)
    assert [(t.name, t.kind) for t in loaded.outputs] == [("logits", "class_logits"), ("position", "regression"),
                                                           ("detection_logits", "raw"), ("detection_positions", "raw")]


def test_one_changed_byte_fails_verification(trained_model, tiny_window_set, artifact):
    _manifest(trained_model, tiny_window_set, artifact).write(manifest_path_for(artifact))
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    with pytest.raises(WireError, match="sha256") as info:
        load_manifest(manifest_path_for(artifact)).verify_artifact()
    assert info.value.reason == "bad_manifest"


def test_missing_artifact_fails_verification(trained_model, tiny_window_set, artifact):
    _manifest(trained_model, tiny_window_set, artifact).write(manifest_path_for(artifact))
    artifact.unlink()
    with pytest.raises(WireError, match="artifact"):
        load_manifest(manifest_path_for(artifact)).verify_artifact()


def test_derived_manifest_keeps_the_contract(trained_model, tiny_window_set, artifact):
    base = _manifest(trained_model, tiny_window_set, artifact)
    base.write(manifest_path_for(artifact))
    int8 = artifact.with_name("model.int8.onnx")
    int8.write_bytes(artifact.read_bytes() + b"int8")  # any other bytes
    derived = derive_manifest(manifest_path_for(artifact), int8, artifact_format="onnx", precision="int8",
                              metric={"accuracy": 0.49})
    assert manifest_path_for(int8) == artifact.parent / "model.int8.manifest.json"
    derived.write(manifest_path_for(int8))
    loaded = load_manifest(manifest_path_for(int8))
    loaded.verify_artifact()
    assert (loaded.inputs, loaded.outputs, loaded.modalities, loaded.node_range, loaded.class_names, loaded.task) == \
        (base.inputs, base.outputs, base.modalities, base.node_range, base.class_names, base.task)
    assert loaded.precision == "int8" and base.precision == "fp32"
    assert loaded.sha256 == sha256_of(int8) != base.sha256
    assert loaded.artifact_file == "model.int8.onnx" and loaded.metric == {"accuracy": 0.49}
    kept = derive_manifest(base, int8, artifact_format="onnx", precision="int8")
    assert kept.metric == base.metric  # no new metric: the base's is carried over


def test_manifest_records_the_training_site_in_slot_order(trained_model, tiny_window_set, artifact):
    # The checkpoint's site record (from the dataset, node i = structural slot i) becomes training_site,
    # so an aggregator can bind another site's nodes to the slots the model learned.
    info = {"feature_hashes": tiny_window_set.feature_hashes, "class_names": list(tiny_window_set.class_names),
            "site": tiny_window_set.site}
    manifest_for(trained_model, info, artifact, name="tiny-parking", version="1.2.3").write(manifest_path_for(artifact))
    loaded = load_manifest(manifest_path_for(artifact))
    site = loaded.training_site
    assert site.site_id == "parking_lot" and site.node_ids == tuple(tiny_window_set.site["node_ids"])
    assert [list(n.position) for n in site.nodes] == tiny_window_set.site["positions"]
    int8 = artifact.with_name("model.int8.onnx")
    int8.write_bytes(artifact.read_bytes())
    assert derive_manifest(loaded, int8, artifact_format="onnx", precision="int8").training_site == site
    # A checkpoint without a site record (older ones): no training_site, the aggregator warns instead.
    assert _manifest(trained_model, tiny_window_set, artifact).training_site is None
