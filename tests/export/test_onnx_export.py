"""ONNX export of encoder + heads: parity with torch, dynamic batch and node count, the graph's ops."""

import numpy as np
import onnx
import pytest
import torch

from export.deploy_model import DeployModel
from export.errors import ExportError
from export.manifests import manifest_for
from export.onnx_export import example_inputs, export_onnx, max_abs_error, onnx_session, run_onnx
from spar_wire.model_manifest import load_manifest


@pytest.fixture(scope="module")
def deploy_model(untrained_deploy_model) -> DeployModel:
    return untrained_deploy_model


@pytest.fixture(scope="module")
def exported(deploy_model, tmp_path_factory):
    torch.set_num_threads(1)
    return export_onnx(deploy_model, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_parity_within_1e4_at_other_node_counts_and_batches(deploy_model, exported):
    session = onnx_session(exported)
    for batch, nodes in ((1, 5), (4, 16), (2, 8), (3, 1)):
        assert max_abs_error(deploy_model, exported, example_inputs(deploy_model, batch, nodes, seed=nodes + batch),
                             session) < 1e-4


def test_graph_is_lean_and_dynamic(deploy_model, exported):
    graph = onnx.load(exported).graph
    ops = {n.op_type for n in graph.node}
    assert "LayerNormalization" in ops  # opset 17 keeps it one op
    assert [i.name for i in graph.input] == list(deploy_model.input_names)
    assert [o.name for o in graph.output] == ["logits", "position", "detection_logits", "detection_positions"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert (dims[0].dim_param, dims[1].dim_param) == ("batch", "nodes")


def test_positions_come_out_in_metres(deploy_model, exported):
    """Shifting the whole site by 1 km shifts predicted positions by 1 km and changes nothing else."""
    inputs = list(example_inputs(deploy_model, 2, 8))
    session = onnx_session(exported)
    before = run_onnx(session, deploy_model.input_names, tuple(inputs))
    inputs[-2] = inputs[-2] + torch.tensor([1000.0, -500.0])
    after = run_onnx(session, deploy_model.input_names, tuple(inputs))
    np.testing.assert_allclose(after[0], before[0], atol=1e-4)  # logits
    np.testing.assert_allclose(after[1] - before[1], np.tile([1000.0, -500.0], (2, 1)), atol=1e-2)


def test_absent_nodes_do_not_matter(deploy_model, exported):
    inputs = list(example_inputs(deploy_model, 2, 8))
    inputs[1][:, 3] = False  # node 3 sent no microphone tokens
    session = onnx_session(exported)
    before = run_onnx(session, deploy_model.input_names, tuple(inputs))
    inputs[0][:, 3] = 1e4
    after = run_onnx(session, deploy_model.input_names, tuple(inputs))
    for a, b in zip(after, before, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_manifest_describes_the_graph(deploy_model, exported):
    info = {"feature_hashes": {"microphone": "a" * 16, "geophone": "b" * 16}, "class_names": list("abcde")}
    manifest = manifest_for(deploy_model, info, exported, name="tiny", version="0.0.1", metric={"accuracy": 0.5})
    manifest.write(exported.parent / "manifest.json")
    loaded = load_manifest(exported.parent / "manifest.json")
    loaded.verify_artifact()
    assert loaded.task == "multitask" and loaded.node_range == (1, 16)
    assert [t.name for t in loaded.inputs] == list(deploy_model.input_names)
    assert {t.name: t.kind for t in loaded.outputs}["position"] == "regression"


def test_old_opsets_are_refused(deploy_model, tmp_path):
    with pytest.raises(ExportError, match="opset"):
        export_onnx(deploy_model, tmp_path / "m.onnx", opset=13)


def test_a_node_anchored_detector_exports_with_one_query_per_node(untrained_deploy_model, tmp_path):
    """The anchored detector's outputs have a dynamic ``nodes`` axis: export -> manifest -> ONNX
    Runtime at other node counts, within 1e-4 of torch, with detections in metres."""
    from train.heads import make_head_variant

    torch.manual_seed(1)
    head = make_head_variant("anchors", 16, 5, 2, layers=1, position_dims=2)
    with torch.no_grad():
        head.position_head[-1].weight.normal_(0, 0.1)  # non-zero offsets, as after training
    model = DeployModel(untrained_deploy_model.encoder, {"detect": head}, n_classes=5, out_dims=2).eval()
    path = export_onnx(model, tmp_path / "model.onnx", check_nodes=(3, 8))
    graph = onnx.load(path).graph
    assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim[:2]] == ["batch", "nodes"]
    session = onnx_session(path)
    for batch, nodes in ((1, 5), (2, 12)):
        inputs = example_inputs(model, batch, nodes, seed=nodes)
        logits, positions = run_onnx(session, model.input_names, inputs)
        assert logits.shape == (batch, nodes, 6) and positions.shape == (batch, nodes, 2)
        assert max_abs_error(model, path, inputs, session) < 1e-4
    info = {"feature_hashes": {"microphone": "a" * 16, "geophone": "b" * 16}, "class_names": list("abcde")}
    manifest_for(model, info, path, name="anchors", version="0.0.1").write(tmp_path / "manifest.json")
    loaded = load_manifest(tmp_path / "manifest.json")
    assert [t.shape for t in loaded.outputs] == [("batch", "nodes", 6), ("batch", "nodes", 2)]
