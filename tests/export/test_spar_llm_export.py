"""SPAR+LLM exports like SPAR: node_text replaces node_index in the graph, the manifest names the text
encoder, and the aggregator's ONNX Runtime backend runs it on what its assembler builds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edge_runtime.errors import AggregatorError
from edge_runtime.inference.onnxruntime_backend import OnnxRuntimeBackend
from edge_runtime.service import placement_text_encoder
from export.deploy_model import DeployModel
from export.manifests import manifest_for, manifest_path_for
from export.onnx_export import export_onnx
from export.parity import window_inputs
from spar_wire.model_manifest import load_manifest
from spar_wire.placement_text import text_model_id
from train.data import token_statistics
from train.heads import make_head
from train.models.config import ModalitySpec, SparConfig, objective_config
from train.models.spar import SparEncoder


@pytest.fixture(scope="module")
def llm_export(tiny_window_set, tmp_path_factory):
    windows = tiny_window_set
    assert windows.node_text is not None and windows.node_text.shape == (windows.n_nodes, 256)
    torch.manual_seed(0)
    base = SparConfig(modalities=tuple(ModalitySpec(m, *shape) for m, shape in windows.token_shapes.items()),
                      max_nodes=windows.n_nodes, position_dims=2, dim=16, heads=2, modality_depth=1, joint_depth=1,
                      structural_dims=2, decoder_dim=16)
    encoder = SparEncoder(objective_config(base, "spar_llm"))
    encoder.set_token_statistics(token_statistics(windows))
    model = DeployModel(encoder, {"localize": make_head("localize", 16, len(windows.class_names), 2)},
                        len(windows.class_names), 2).eval()
    path = export_onnx(model, tmp_path_factory.mktemp("llm") / "model.onnx")
    manifest = manifest_for(model, {"feature_hashes": windows.feature_hashes, "class_names": list(windows.class_names),
                                    "text_model": text_model_id()}, path, name="tiny-llm", version="0.0.1")
    manifest.write(manifest_path_for(path))
    return model, load_manifest(manifest_path_for(path))


def test_the_graph_takes_description_embeddings_instead_of_slots(llm_export):
    model, manifest = llm_export
    names = [t.name for t in manifest.inputs]
    assert "node_text" in names and "node_index" not in names
    assert manifest.needs_text and manifest.text_model == text_model_id()
    assert next(t for t in manifest.inputs if t.name == "node_text").shape == ("batch", "nodes", 256)


def test_onnx_runtime_matches_torch_on_real_windows_and_reads_the_text(llm_export, tiny_window_set):
    model, manifest = llm_export
    inputs = window_inputs(tiny_window_set, np.arange(4), [t.name for t in manifest.inputs])
    backend = OnnxRuntimeBackend(manifest)
    got = backend.run(inputs)["position"]
    with torch.no_grad():
        expected = model(*(torch.from_numpy(inputs[n]) for n in model.input_names))[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    changed = dict(inputs, node_text=np.roll(inputs["node_text"], 1, axis=1))  # descriptions swapped round
    assert np.abs(backend.run(changed)["position"] - got).max() > 1e-4


def test_the_aggregator_refuses_embeddings_from_another_encoder(llm_export, parking_lot):
    _, manifest = llm_export
    assert placement_text_encoder(parking_lot, manifest) is not None
    other = dataclasses.replace(manifest, text_model="wordllama-l2_supercat-256/9.9")
    with pytest.raises(AggregatorError, match="install that version"):
        placement_text_encoder(parking_lot, other)


def test_a_text_model_without_node_text_fails_clearly(llm_export, tiny_window_set):
    model, _ = llm_export
    batch = dataclasses.replace(tiny_window_set.batch([0]), node_text=None)
    with pytest.raises(ValueError, match="needs node_text"):
        model.encoder.forward_features(batch)
