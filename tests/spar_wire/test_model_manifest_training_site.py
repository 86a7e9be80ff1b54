"""The manifest's optional ``training_site``: round trip, validation, and manifests written before it."""

import json
import math

import pytest

from spar_wire.errors import WireError
from spar_wire.model_manifest import (
    ModalityRequirement,
    ModelManifest,
    TensorSpec,
    TrainedNode,
    TrainingSite,
    load_manifest,
)

SITE = TrainingSite("parking_lot", (TrainedNode("n01", (0.0, 0.0)), TrainedNode("n02", (13.0, 1.5)),
                                    TrainedNode("n03", (27.0, 0.5))))


def manifest(training_site=None, node_range=(1, 8)):
    return ModelManifest(
        name="m", version="1", task="classification", artifact_file="model.onnx", artifact_format="onnx",
        precision="fp32", sha256="0" * 64, position_dim=2, node_range=node_range,
        modalities={"microphone": ModalityRequirement("dace08dddfa4ecdf", 32, 128)},
        inputs=(TensorSpec("node_index", "int64", ("batch", "nodes")),),
        outputs=(TensorSpec("logits", "float32", ("batch", 5), "class_logits"),), training_site=training_site)


def write(tmp_path, data):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def test_training_site_round_trips_in_slot_order(tmp_path):
    original = manifest(SITE)
    original.write(tmp_path / "manifest.json")
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["training_site"] == {"site_id": "parking_lot", "nodes": [
        {"id": "n01", "position": [0.0, 0.0]}, {"id": "n02", "position": [13.0, 1.5]},
        {"id": "n03", "position": [27.0, 0.5]}]}
    loaded = load_manifest(tmp_path / "manifest.json")
    assert loaded == original and loaded.training_site.node_ids == ("n01", "n02", "n03")


def test_manifest_without_training_site_still_loads(tmp_path):
    manifest().write(tmp_path / "manifest.json")
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert "training_site" not in data  # nothing written when unknown: old readers see the old format
    assert load_manifest(tmp_path / "manifest.json").training_site is None


@pytest.mark.parametrize("change, message", [
    (lambda s: s["nodes"][1].update(position=[13.0]), r"nodes\[1\] \(n02\): position must be 2 finite numbers"),
    (lambda s: s["nodes"][1].update(position=[math.nan, 1.5]), "2 finite numbers"),
    (lambda s: s["nodes"][1].update(position=[1e400, 1.5]), "2 finite numbers"),  # inf after json
    (lambda s: s["nodes"][1].update(position=[10**400, 1.5]), "2 finite numbers"),  # an int beyond float
    (lambda s: s["nodes"][1].update(position=[True, 1.5]), "2 finite numbers"),
    (lambda s: s["nodes"][2].update(id="n01"), "node ids must be unique, repeated: n01"),
    (lambda s: s["nodes"][0].update(id="n/1"), r"training_site.nodes\[0\].id"),
    (lambda s: s.update(site_id=""), "training_site.site_id"),
    (lambda s: s.update(nodes=[]), "training_site has 0 nodes"),
    (lambda s: s.update(nodes="n01"), "a list 'nodes'"),
    (lambda s: s["nodes"].__setitem__(0, "n01"), r"nodes\[0\] must be an object"),
])
def test_bad_training_site_is_refused_naming_the_field(tmp_path, change, message):
    data = manifest(SITE).to_dict()
    change(data["training_site"])
    with pytest.raises(WireError, match=message) as info:
        load_manifest(write(tmp_path, data))
    assert info.value.reason == "bad_manifest"


def test_training_site_may_not_have_more_nodes_than_the_model_has_slots(tmp_path):
    data = manifest(SITE, node_range=(1, 2)).to_dict()
    with pytest.raises(WireError, match=r"training_site has 3 nodes, the model has 1..2 slots"):
        load_manifest(write(tmp_path, data))
