"""Static INT8 QDQ quantization on real windows: parity with FP32, the graph's shape, calibration choice,
the whole ``quantize`` step and its refusals.

Tolerances (tiny model of conftest: d = 16, one block, trained 60 steps; 12 held-out windows of a
parking lot about 40 m across). Measured with the default settings (MinMax, per-channel weights,
MatMul inputs only, attention MatMuls and regression readouts float): label agreement 12 / 12,
position shift mean 0.14 m / max 0.39 m, logits max |error| 0.012, detection positions max |error|
0.22 m. The bounds leave 2.5-10x headroom for other CPUs' kernels:
  * classification: INT8 argmax agrees with FP32 on >= 90 % of windows (at most 1 of 12 may differ);
  * positions: mean shift <= 0.5 m and max shift <= 1.0 m (1.25 % / 2.5 % of the layout);
  * logits: max |INT8 - FP32| <= 0.15.
"""

import os
import shutil

import numpy as np
import onnx
import pytest

from export.errors import ExportError
from export.formats import export_format
from export.manifests import manifest_path_for
from export.parity import collect_outputs, onnx_runner, torch_runner
from export.quant_calibration import METHODS, WindowCalibrationReader
from export.quant_candidates import choose_calibration
from export.quant_graph import activation_matmuls, regression_tail_nodes, summarize_graph
from export.quant_int8 import quantize_dynamic_int8, quantize_static_int8
from export.quantize import quantize
from spar_wire.model_manifest import load_manifest

LABEL_AGREEMENT = 0.9
MEAN_SHIFT_M = 0.5
MAX_SHIFT_M = 1.0
LOGIT_ERROR = 0.15
FAST_ENTROPY = {"num_bins": 256}  # histogram bins; entropy with the default 2048 takes ~1 min here


@pytest.fixture(scope="module")
def int8_path(fp32_export, tiny_window_set, tiny_split, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    return quantize_static_int8(fp32_export.onnx, out, tiny_window_set, tiny_split[0])


def _producers(graph):
    return {out: node for node in graph.node for out in node.output}


def _fed_by(node, producer, op_type):
    return [i for i in node.input if i in producer and producer[i].op_type == op_type]


def test_int8_stays_within_tolerance_of_fp32(trained_model, int8_path, tiny_window_set, tiny_split):
    idx = tiny_split[1]
    fp32 = collect_outputs(trained_model, torch_runner(trained_model), tiny_window_set, idx)
    int8 = collect_outputs(trained_model, onnx_runner(int8_path, threads=1), tiny_window_set, idx)
    assert np.mean(fp32["logits"].argmax(-1) == int8["logits"].argmax(-1)) >= LABEL_AGREEMENT
    shift = np.linalg.norm(int8["position"] - fp32["position"], axis=-1)
    assert shift.mean() <= MEAN_SHIFT_M and shift.max() <= MAX_SHIFT_M, shift
    assert np.abs(int8["logits"] - fp32["logits"]).max() <= LOGIT_ERROR
    assert np.abs(int8["position"] - fp32["position"]).max() > 0  # it really is another graph


def test_int8_runs_at_other_node_counts(trained_model, int8_path, tiny_window_set):
    run = onnx_runner(int8_path, threads=1)
    for nodes in (3, 8):
        inputs = {k: v[:, :nodes] for k, v in
                  collect_inputs(trained_model, tiny_window_set, [0, 5]).items()}
        outputs = run(inputs)
        assert outputs[0].shape == (2, 5) and outputs[1].shape == (2, 2)
        assert all(np.isfinite(o).all() for o in outputs)


def collect_inputs(model, windows, idx):
    from export.parity import window_inputs

    return window_inputs(windows, idx, model.input_names)


def test_qdq_graph_quantizes_matmuls_only(int8_path, fp32_export):
    graph = onnx.load(int8_path).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    producer = _producers(graph)
    quantized = [n for n in graph.node if n.op_type == "MatMul" and len(_fed_by(n, producer, "DequantizeLinear")) == 2]
    assert len(quantized) >= 10  # the weight MatMuls of every block and embedding
    for node in quantized:  # activation input: Q -> DQ; weight: int8 initializer -> DQ
        activation, weight = (producer[i] for i in node.input)
        assert producer[activation.input[0]].op_type == "QuantizeLinear"
        assert weight.input[0] in {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Add", "Mul", "Div", "Sqrt", "Erf"):
            assert not _fed_by(node, producer, "DequantizeLinear"), f"{node.op_type} {node.name} reads INT8 values"
    summary = summarize_graph(int8_path)
    assert summary.quantized_other == ()
    assert summary.op_counts["LayerNormalization"] == sum(
        n.op_type == "LayerNormalization" for n in onnx.load(fp32_export.onnx).graph.node)


def test_regression_readouts_and_attention_matmuls_stay_float(int8_path, fp32_export):
    fp32 = onnx.load(fp32_export.onnx)
    tails = {out: regression_tail_nodes(fp32, [out]) for out in ("position", "detection_positions")}
    linear = {n.name: n.op_type for n in fp32.graph.node if n.op_type in ("MatMul", "Gemm")}
    readouts = {out: [n for n in names if n in linear] for out, names in tails.items()}
    assert readouts == {"position": ["/localize/linear/Gemm"],
                        "detection_positions": ["/detect/position_head/position_head.4/MatMul"]}
    graph = onnx.load(int8_path).graph
    producer = _producers(graph)
    by_name = {n.name: n for n in graph.node}
    for name in [*readouts["position"], *readouts["detection_positions"], *activation_matmuls(fp32)]:
        assert not _fed_by(by_name[name], producer, "DequantizeLinear"), name
    # and the layer before the readout (detector MLP) is quantized: only the tail stays float
    assert _fed_by(by_name["/detect/position_head/position_head.2/MatMul"], producer, "DequantizeLinear")


def test_calibration_reader_yields_real_windows(tiny_window_set, trained_model):
    names = list(trained_model.input_names)
    reader = WindowCalibrationReader(tiny_window_set, [4, 9, 30], names, batch_size=2)
    batches = []
    while (item := reader.get_next()) is not None:
        batches.append(item)
    assert len(batches) == len(reader) == 2
    assert [b["positions"].shape[0] for b in batches] == [2, 1]
    first = batches[0]
    assert list(first) == names
    assert first["tokens_microphone"].dtype == np.float32 and first["present_geophone"].dtype == np.bool_
    assert first["positions"].dtype == np.float32 and first["node_index"].dtype == np.int64
    np.testing.assert_array_equal(first["tokens_microphone"], tiny_window_set.tokens["microphone"][[4, 9]])
    np.testing.assert_array_equal(batches[1]["positions"][0], tiny_window_set.positions[30])
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["tokens_geophone"], first["tokens_geophone"])
    with pytest.raises(ExportError, match="out of range"):
        WindowCalibrationReader(tiny_window_set, [48], names)


def test_chunked_calibration_sees_every_window(fp32_export, tiny_window_set, tiny_split, tmp_path, monkeypatch):
    """Ranges are collected in chunks of calibration batches (memory); MinMax must equal one pass."""
    import export.quant_calibration as calibration_module

    names = [i.name for i in onnx.load(fp32_export.onnx).graph.input]
    reader = WindowCalibrationReader(tiny_window_set, tiny_split[0], names)
    ranges = {}
    for chunk in (5, 1000):
        monkeypatch.setattr(calibration_module, "CALIBRATION_CHUNK", chunk)
        data = calibration_module.calibrate(fp32_export.onnx, reader, "minmax", ("MatMul", "Gemm"), tmp_path)
        ranges[chunk] = {name: tuple(np.asarray(v.range_value, np.float64).tolist()) for name, v in data.items()}
    assert len(ranges[5]) > 20 and ranges[5] == ranges[1000]


def test_choose_calibration_measures_every_method(trained_model, fp32_export, tiny_window_set, tiny_split, tmp_path):
    choice = choose_calibration(fp32_export.onnx, tmp_path, tiny_window_set, tiny_split[0], tiny_split[1],
                                trained_model, threads=1, calibrator_options=FAST_ENTROPY)
    assert choice.best in METHODS
    assert [c.label for c in choice.candidates] == list(METHODS)
    assert all((tmp_path / f"{m}.onnx").is_file() for m in METHODS)
    best = choice.best_candidate
    assert best.key == min(c.key for c in choice.candidates)
    table = choice.to_markdown()
    for method in METHODS:
        assert f"| {method} |" in table
    assert "torch FP32" in table and f"picked: **{choice.best}**" in table


def test_quantize_writes_model_manifest_and_report(trained_model, fp32_export, tiny_window_set, tiny_split, tmp_path):
    fp32 = tmp_path / "model.onnx"
    shutil.copyfile(fp32_export.onnx, fp32)
    shutil.copyfile(fp32_export.manifest, manifest_path_for(fp32))
    out = tmp_path / "model.int8.onnx"
    report = quantize(fp32, out, tiny_window_set, tiny_split[0], tiny_split[1], trained_model, method="minmax",
                      threads=1)
    assert report.settings["preprocess"] == "applied"
    assert report.method == "minmax" and out.is_file() and (tmp_path / "model.int8.dynamic.onnx").is_file()
    # exactly the files of the table's onnx-int8 and onnx-int8-dynamic rows, beside the FP32 input
    assert sorted(os.listdir(tmp_path)) == sorted([fp32.name, manifest_path_for(fp32).name,
                                                   *export_format("onnx-int8").files,
                                                   *export_format("onnx-int8-dynamic").files])
    manifest = load_manifest(report.manifest_path)
    assert report.manifest_path == tmp_path / "model.int8.manifest.json"
    manifest.verify_artifact()
    base = load_manifest(manifest_path_for(fp32))
    assert manifest.precision == "int8" and manifest.artifact_file == "model.int8.onnx"
    assert manifest.inputs == base.inputs and manifest.outputs == base.outputs
    assert manifest.modalities == base.modalities and manifest.sha256 != base.sha256
    assert manifest.metric["windows"] == len(tiny_split[1]) and "classify/accuracy" in manifest.metric
    assert max(report.parity_fp32.max_abs_error.values()) < 1e-3
    assert report.agreement_int8["logits/label_agreement"] >= LABEL_AGREEMENT
    assert report.dynamic is not None and report.dynamic.agreement["logits/label_agreement"] >= LABEL_AGREEMENT
    assert set(report.excluded_linear) == {"/localize/linear/Gemm", "/detect/position_head/position_head.4/MatMul"}
    text = (tmp_path / "parity-int8.md").read_text()
    assert text == report.to_markdown()
    assert "ORT INT8" in text and "ORT INT8 dynamic" in text and "| position/mean_shift |" in text
    # the dynamic graph is deployable too: its own manifest, its own measured metric, runs in the runtime
    from edge_runtime.inference import load_backend

    dynamic = load_manifest(tmp_path / "model.int8.dynamic.manifest.json")
    dynamic.verify_artifact()
    assert dynamic.artifact_file == "model.int8.dynamic.onnx" and dynamic.precision == "int8"
    assert dynamic.inputs == base.inputs and dynamic.metric["windows"] == len(tiny_split[1])
    assert dynamic.metric["classify/accuracy"] == report.parity_dynamic.metrics_candidate["classify/accuracy"]
    backend = load_backend(dynamic, "onnxruntime")
    from export.parity import window_inputs

    outputs = backend.run(window_inputs(tiny_window_set, tiny_split[1][:2], [t.name for t in base.inputs]))
    assert outputs["logits"].shape[0] == 2


def test_quantize_auto_picks_a_method(trained_model, fp32_export, tiny_window_set, tiny_split, tmp_path):
    report = quantize(fp32_export.onnx, tmp_path / "auto.onnx", tiny_window_set, tiny_split[0], tiny_split[1],
                      trained_model, threads=1, include_dynamic=False, methods=("minmax", "percentile"))
    assert report.method in ("minmax", "percentile") and report.calibration is not None
    assert report.calibration.best == report.method
    assert "## Calibration methods" in report.to_markdown()
    assert load_manifest(report.manifest_path).precision == "int8"


def test_dynamic_quantization_runs(trained_model, fp32_export, tiny_window_set, tmp_path):
    path = quantize_dynamic_int8(fp32_export.onnx, tmp_path / "dyn.onnx")
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear"}
    outputs = onnx_runner(path, threads=1)(collect_inputs(trained_model, tiny_window_set, [0, 1]))
    assert outputs[0].shape == (2, 5)


def test_refusals(trained_model, fp32_export, tiny_window_set, tiny_split, tmp_path):
    calib, held = tiny_split
    with pytest.raises(ExportError, match="no such ONNX file"):
        quantize_static_int8(tmp_path / "missing.onnx", tmp_path / "o.onnx", tiny_window_set, calib)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07this is not a protobuf model\xff\xff")
    with pytest.raises(ExportError, match="not an ONNX model"):
        quantize_static_int8(garbage, tmp_path / "o.onnx", tiny_window_set, calib)
    with pytest.raises(ExportError, match="calibration method"):
        quantize_static_int8(fp32_export.onnx, tmp_path / "o.onnx", tiny_window_set, calib, method="magic")
    lonely = tmp_path / "lonely" / "model.onnx"
    lonely.parent.mkdir()
    shutil.copyfile(fp32_export.onnx, lonely)
    with pytest.raises(ExportError, match="no manifest"):
        quantize(lonely, tmp_path / "o.onnx", tiny_window_set, calib, held, trained_model, method="minmax")
    # a manifest whose microphone feature hash is not the dataset's
    other = tmp_path / "other" / "model.onnx"
    other.parent.mkdir()
    shutil.copyfile(fp32_export.onnx, other)
    text = fp32_export.manifest.read_text().replace(tiny_window_set.feature_hashes["microphone"], "0" * 16)
    manifest_path_for(other).write_text(text)
    for call in (lambda: quantize(other, tmp_path / "o.onnx", tiny_window_set, calib, held, trained_model),
                 lambda: quantize_static_int8(other, tmp_path / "o.onnx", tiny_window_set, calib)):
        with pytest.raises(ExportError, match="microphone feature hash"):
            call()
    with pytest.raises(ExportError, match="overwrite"):
        quantize(fp32_export.onnx, fp32_export.onnx, tiny_window_set, calib, held, trained_model, method="minmax")
