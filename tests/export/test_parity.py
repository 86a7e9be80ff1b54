"""Scoring runners on real windows: input assembly, head-format predictions, metrics, torch vs ORT parity."""

import numpy as np
import pytest
import torch

from export.errors import ExportError
from export.parity import (
    agreement,
    collect_outputs,
    evaluate_runner,
    flatten_metrics,
    onnx_runner,
    parity_report,
    predictions_from_outputs,
    torch_runner,
    window_inputs,
)
from train.metrics import summarize


def test_window_inputs_match_the_batch_assembly(trained_model, tiny_window_set):
    idx = [3, 0, 17]
    inputs = window_inputs(tiny_window_set, idx, trained_model.input_names)
    expected = trained_model.named_inputs(tiny_window_set.batch(idx))
    assert list(inputs) == list(trained_model.input_names)
    for name, value in inputs.items():
        assert value.dtype == expected[name].numpy().dtype, name
        np.testing.assert_array_equal(value, expected[name].numpy())
    assert inputs["node_index"].dtype == np.int64 and inputs["present_microphone"].dtype == np.bool_


def test_window_inputs_refuse_a_modality_the_dataset_lacks(tiny_window_set):
    with pytest.raises(ExportError, match="tokens_radar"):
        window_inputs(tiny_window_set, [0], ("tokens_radar", "positions"))


def test_predictions_have_the_head_predict_formats(trained_model, tiny_window_set):
    """Graph outputs -> predictions equal what each head's own predict() makes of its raw outputs."""
    idx = np.arange(8)
    batch = tiny_window_set.batch(idx)
    outputs = collect_outputs(trained_model, torch_runner(trained_model), tiny_window_set, idx)
    predictions = predictions_from_outputs(trained_model, outputs)
    with torch.no_grad():
        features = trained_model.encoder.forward_features(batch)
        for task, head in trained_model.heads.items():
            expected = head.predict(head(features.latents, features.valid), features.frame)
            assert set(predictions[task]) == set(expected), task
            for key, value in expected.items():
                assert predictions[task][key].shape == value.shape, (task, key)
                if value.dtype.kind in "iu":
                    np.testing.assert_array_equal(predictions[task][key], value)
                else:
                    np.testing.assert_allclose(predictions[task][key], value, rtol=1e-4, atol=1e-4)


def test_evaluate_runner_equals_summarize_of_head_predictions(trained_model, tiny_window_set, tiny_split):
    idx = tiny_split[1]
    metrics = evaluate_runner(trained_model, torch_runner(trained_model), tiny_window_set, idx, batch_size=5)
    batch = tiny_window_set.batch(idx)
    with torch.no_grad():
        features = trained_model.encoder.forward_features(batch)
        for task, head in trained_model.heads.items():
            expected = summarize(task, head.predict(head(features.latents, features.valid), features.frame), batch)
            assert metrics[task] == pytest.approx(expected, rel=1e-5, abs=1e-6, nan_ok=True)
    assert set(flatten_metrics(metrics)) >= {"classify/accuracy", "localize/mean_distance", "detect/mAP@8"}


def test_parity_torch_vs_ort_fp32(trained_model, fp32_export, tiny_window_set, tiny_split):
    report = parity_report(trained_model, onnx_runner(fp32_export.onnx, threads=1), tiny_window_set, tiny_split[1])
    assert report.windows == len(tiny_split[1])
    assert set(report.max_abs_error) == set(trained_model.output_names)
    assert max(report.max_abs_error.values()) < 1e-3
    assert report.metrics_candidate == pytest.approx(report.metrics_reference, rel=1e-4, abs=1e-4, nan_ok=True)
    text = report.to_markdown()
    assert "| position |" in text and "classify/accuracy" in text


def test_agreement_measures_decisions(trained_model, tiny_window_set):
    outputs = collect_outputs(trained_model, torch_runner(trained_model), tiny_window_set, np.arange(6))
    same = agreement(trained_model, outputs, outputs)
    assert same["logits/label_agreement"] == 1.0 and same["position/mean_shift"] == 0.0
    moved = dict(outputs, position=outputs["position"] + np.array([3.0, 4.0], np.float32))
    shifted = agreement(trained_model, outputs, moved)
    assert shifted["position/mean_shift"] == pytest.approx(5.0, rel=1e-5)


def test_a_runner_with_the_wrong_outputs_is_refused(trained_model, tiny_window_set):
    with pytest.raises(ExportError, match="outputs"):
        evaluate_runner(trained_model, lambda inputs: [np.zeros((1, 5), np.float32)], tiny_window_set, [0])
