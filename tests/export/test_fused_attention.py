"""Fused attention in the exported graph (issue 20, item 1): export -> reload -> infer parity, the fused op
is really in the graph (and ONNX Runtime would not have fused the plain one), INT8 still quantizes, and
the exporter keeps a plain graph for TensorRT."""

import numpy as np
import onnx
import pytest
import torch

from export.attention import DEFAULT_ATTENTION, contrib_ops, fused_attention_nodes, ort_fused_at_load
from export.deploy_model import DeployModel
from export.errors import ExportError
from export.onnx_export import example_inputs, export_onnx, max_abs_error, onnx_session, run_onnx, without_nodes
from train.models.transformer import Attention


@pytest.fixture(scope="module")
def model(untrained_deploy_model) -> DeployModel:
    return untrained_deploy_model


@pytest.fixture(scope="module")
def graphs(model, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("attention")
    return {mode: export_onnx(model, root / f"{mode}.onnx", attention=mode, check_nodes=(1, 8))
            for mode in ("plain", "mha", "attention23")}


def attention_modules(model) -> int:
    return sum(isinstance(m, Attention) for m in model.modules())


def test_default_export_has_one_fused_op_per_attention(model, graphs, tmp_path):
    """Fails on the legacy exporter: its graph has MatMul/Softmax and no fused attention op."""
    default = export_onnx(model, tmp_path / "model.onnx", check_nodes=(4,))
    nodes = onnx.load(default).graph.node
    assert DEFAULT_ATTENTION == "mha"
    assert sum(n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft" for n in nodes) == \
        attention_modules(model)
    assert not any(n.op_type == "Softmax" for n in nodes)
    assert fused_attention_nodes(graphs["attention23"]) == attention_modules(model)
    assert max(o.version for o in onnx.load(graphs["attention23"]).opset_import if o.domain in ("", "ai.onnx")) == 23


def test_plain_graph_needs_no_fused_op_and_ort_does_not_fuse_it_at_load(graphs):
    plain = graphs["plain"]
    assert fused_attention_nodes(plain) == 0 and contrib_ops(plain) == []
    assert any(n.op_type == "Softmax" for n in onnx.load(plain).graph.node)
    # the legacy split costs what it costs: ONNX Runtime's own optimiser leaves it split on CPU
    assert ort_fused_at_load(plain, "all")["fused"] == 0
    assert ort_fused_at_load(graphs["mha"], "all")["fused"] == fused_attention_nodes(graphs["mha"])


@pytest.mark.parametrize("mode", ["mha", "attention23"])
def test_reloaded_fused_graph_matches_torch(model, graphs, mode):
    session = onnx_session(graphs[mode])
    for batch, nodes in ((1, 5), (4, 16), (3, 1)):
        inputs = example_inputs(model, batch, nodes, seed=nodes + batch)
        assert max_abs_error(model, graphs[mode], inputs, session) < 1e-4
        # a window without any present node: every key masked, the output must stay finite and equal
        assert max_abs_error(model, graphs[mode], without_nodes(inputs, model), session) < 1e-4


def test_absent_nodes_do_not_matter_in_the_fused_graph(model, graphs):
    inputs = list(example_inputs(model, 2, 8))
    inputs[1][:, 3] = False  # node 3 sent no microphone tokens
    session = onnx_session(graphs["mha"])
    before = run_onnx(session, model.input_names, tuple(inputs))
    inputs[0][:, 3] = 1e4
    after = run_onnx(session, model.input_names, tuple(inputs))
    for a, b in zip(after, before, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_export_restores_the_model_attention(model, graphs):
    assert all("forward" not in vars(m) for m in model.modules() if isinstance(m, Attention))


def test_unknown_attention_mode_is_refused(model, tmp_path):
    with pytest.raises(ExportError, match="attention mode"):
        export_onnx(model, tmp_path / "m.onnx", attention="flash")


def test_fused_graph_quantizes_to_int8(trained_model, tiny_window_set, tiny_split, tmp_path):
    from export.parity import collect_outputs, onnx_runner
    from export.quant_graph import summarize_graph
    from export.quant_int8 import quantize_static_int8

    fp32 = export_onnx(trained_model, tmp_path / "model.onnx", attention="mha", check_nodes=(4,))
    int8 = quantize_static_int8(fp32, tmp_path / "model.int8.onnx", tiny_window_set, tiny_split[0][:12])
    summary = summarize_graph(int8)
    assert summary.op_counts.get("MultiHeadAttention") == fused_attention_nodes(fp32)  # stays one float op
    assert summary.quantized and not summary.quantized_other
    idx = tiny_split[1]
    got = collect_outputs(trained_model, onnx_runner(int8, 1, trained_model.output_names), tiny_window_set, idx)
    ref = collect_outputs(trained_model, onnx_runner(fp32, 1, trained_model.output_names), tiny_window_set, idx)
    assert all(np.isfinite(v).all() for v in got.values())
    assert np.mean(got["logits"].argmax(-1) == ref["logits"].argmax(-1)) >= 0.75


def test_exporter_keeps_a_plain_graph_for_tensorrt(tiny_window_set, tmp_path, monkeypatch):
    """`spar-export onnx` with the default attention writes model.onnx (fused, ORT) and model.plain.onnx
    (split, TensorRT) with manifests; the engine build refuses the fused one before TensorRT is touched."""
    from export import exporter
    from export import tensorrt_engine as te
    from tests.export.conftest import build_deploy_model, data_info

    model = build_deploy_model(tiny_window_set, tasks=("classify",))
    monkeypatch.setattr(exporter, "load_deployable", lambda paths: (model, data_info(tiny_window_set)))
    result = exporter.export_checkpoints(["unused"], tmp_path, name="tiny", version="0.0.1")
    assert result.onnx.name == "model.onnx" and result.plain.name == "model.plain.onnx"
    assert result.plain_manifest.name == "model.plain.manifest.json" and result.manifest.name == "manifest.json"
    assert contrib_ops(result.onnx) == ["com.microsoft::MultiHeadAttention"] and contrib_ops(result.plain) == []
    with pytest.raises(ExportError, match="model.plain.onnx"):
        te.build_engine(result.onnx, tmp_path / "m.engine")
    assert te.default_engine_path(result.plain, "fp16").name == "model.fp16.trt.engine"
    assert te.default_engine_path(tmp_path / "model.plain.int8.onnx", "int8").name == "model.int8.trt.engine"
    plain_only = exporter.export_checkpoints(["unused"], tmp_path / "plain", name="tiny", version="0.0.1",
                                             attention="plain")
    assert plain_only.plain is None and not (tmp_path / "plain" / "model.plain.onnx").exists()


@pytest.mark.slow
def test_onnxscript_ort_fusion_rewriter_fuses_the_dynamo_graph(model, tmp_path):
    pytest.importorskip("onnxscript")
    path = export_onnx(model, tmp_path / "fused.onnx", attention="ort-fusion", check_nodes=(4,))
    assert fused_attention_nodes(path) == attention_modules(model)
    assert not list(tmp_path.glob("*.data"))  # one self-contained file, as the manifest hashes it


def test_int8_reports_of_both_graphs_live_side_by_side():
    from pathlib import Path

    from export.formats import report_name

    assert report_name(Path("m/model.int8.onnx").name) == "parity-int8.md"
    assert report_name(Path("m/model.plain.int8.onnx").name) == "parity-int8.plain.md"
