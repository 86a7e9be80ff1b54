"""Distillation of a fine-tuned teacher into a smaller student, on a tiny generated dataset."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import export.distill as distill
import export.distill_loss as distill_loss
from export.distill import (
    DistillConfig,
    discrepancy,
    load_student,
    load_teacher,
    model_size,
    run_distill,
    student_from_teacher,
)
from export.errors import ExportError
from train.data import drop_nodes, load_windows, temporal_split
from train.finetune import run_finetune
from train.pretrain import run_pretrain
from train.run_config import FinetuneConfig, PretrainConfig

REPO = Path(__file__).resolve().parents[2]
TEACHER_MODEL = {"dim": 16, "heads": 2, "decoder_dim": 8, "modality_depth": 1, "joint_depth": 1,
                 "structural_dims": 2}
STUDENT = {"dim": 8, "heads": 2, "modality_depth": 1, "joint_depth": 0, "mlp_ratio": 1.0}
TASKS = ("classify", "localize", "detect")


@pytest.fixture(scope="session")
def distill_dataset(tiny_parking_dataset) -> Path:
    return tiny_parking_dataset


@pytest.fixture(autouse=True, scope="session")
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def teacher(distill_dataset, tmp_path_factory) -> dict[str, str]:
    """task -> fine-tuned checkpoint, all three heads on one pretrained (frozen) encoder."""
    root = tmp_path_factory.mktemp("teacher")
    run_pretrain(PretrainConfig(data=str(distill_dataset), out=str(root / "pre"), epochs=2, batch_size=8, lr=3e-3,
                                warmup_epochs=0.5, progress=False, model=dict(TEACHER_MODEL)))
    paths = {}
    for task, epochs in zip(TASKS, (30, 15, 8), strict=True):
        result = run_finetune(FinetuneConfig(data=str(distill_dataset), out=str(root / task), task=task,
                                             encoder=str(root / "pre"), epochs=epochs, batch_size=8,
                                             progress=False))
        paths[task] = str(result.checkpoint)
    return paths


def config(data, teacher_paths, out, **changes) -> DistillConfig:
    values = dict(teacher=list(teacher_paths), data=str(data), out=str(out), student=dict(STUDENT), epochs=12,
                  batch_size=8, lr=5e-3, device="cpu", progress=False)
    values.update(changes)
    return DistillConfig(**values)


@pytest.fixture(scope="module")
def distilled(distill_dataset, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("distilled")
    return run_distill(config(distill_dataset, teacher.values(), out))


def test_distillation_brings_the_student_close_to_the_teacher(distill_dataset, teacher, distilled):
    before, after = distilled.discrepancy_before, distilled.discrepancy_after
    assert distilled.val_loss < 0.5 * distilled.val_loss_before
    assert after["logits_kl"] < before["logits_kl"]
    assert after["logits_agreement"] >= before["logits_agreement"]
    assert after["position_rmse"] < before["position_rmse"]
    assert after["detection_positions_rmse"] < before["detection_positions_rmse"]
    assert after["detection_logits_kl"] < before["detection_logits_kl"]
    # the same, measured from outside: an untrained student of the same seed vs the reloaded one
    teacher_model, _ = load_teacher(list(teacher.values()))
    student, _ = load_student(distilled.checkpoint)
    windows = load_windows(distill_dataset, progress=False)
    _, val_idx = temporal_split(len(windows), 0.25)
    fresh = student_from_teacher(teacher_model, STUDENT, student.heads["classify"].n_classes, 2, seed=0)
    untrained = discrepancy(teacher_model, fresh, windows, val_idx)
    trained = discrepancy(teacher_model, student, windows, val_idx)
    assert trained == pytest.approx(after, rel=1e-5, abs=1e-6)
    assert untrained == pytest.approx(before, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_labels_are_never_read(distill_dataset, teacher, distilled, tmp_path, monkeypatch):
    """Corrupting every label and target of the training windows changes nothing in the student."""
    real_load = distill.load_windows

    def corrupted(path, **kwargs):
        windows = real_load(path, **kwargs)
        train_idx, _ = temporal_split(len(windows), 0.25)
        rng = np.random.default_rng(7)
        n = len(train_idx)
        windows.label[train_idx] = rng.integers(0, len(windows.class_names), n)
        shape = windows.target_class[train_idx].shape
        windows.target_class[train_idx] = rng.integers(-1, len(windows.class_names), shape)
        windows.target_position[train_idx] = rng.normal(0, 1e3, windows.target_position[train_idx].shape)
        return windows

    monkeypatch.setattr(distill, "load_windows", corrupted)
    again = run_distill(config(distill_dataset, teacher.values(), tmp_path / "corrupted"))
    a = torch.load(distilled.checkpoint, weights_only=False)["state_dict"]
    b = torch.load(again.checkpoint, weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert again.train_loss == distilled.train_loss


@pytest.mark.slow
def test_teacher_outputs_computed_on_the_fly_train_the_same(distill_dataset, teacher, tmp_path, monkeypatch):
    cached = run_distill(config(distill_dataset, teacher.values(), tmp_path / "cached", epochs=2))
    monkeypatch.setattr(distill_loss, "TEACHER_CACHE_BYTES", 0)
    fly = run_distill(config(distill_dataset, teacher.values(), tmp_path / "fly", epochs=2))
    assert cached.teacher_cached and not fly.teacher_cached
    assert fly.train_loss == pytest.approx(cached.train_loss, rel=1e-4)
    assert fly.discrepancy_after == pytest.approx(cached.discrepancy_after, rel=1e-3, abs=1e-5)


@pytest.mark.slow
def test_message_loss_trains_the_student_on_partial_windows(distill_dataset, teacher, distilled, tmp_path):
    """Loss-robust distillation: a lossy student is a different student, and holds up better on lossy
    windows than the one that only saw complete windows (here at 50 % loss, on the validation windows)."""
    robust = run_distill(config(distill_dataset, teacher.values(), tmp_path / "robust", message_loss=0.6))
    plain_model, _ = load_student(distilled.checkpoint)
    robust_model, _ = load_student(robust.checkpoint)
    teacher_model, _ = load_teacher(list(teacher.values()))
    windows = load_windows(distill_dataset, progress=False)
    _, val_idx = temporal_split(len(windows), 0.25)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        full = distill_loss.forward_parts(teacher_model, distill_loss.unlabelled_batch(windows, val_idx))
        lossy_batch = drop_nodes(distill_loss.unlabelled_batch(windows, val_idx), 0.5, generator, per_modality=True)
        errors = {name: float(((distill_loss.forward_parts(model, lossy_batch)["out/localize"]
                                - full["out/localize"]) ** 2).mean())
                  for name, model in (("plain", plain_model), ("robust", robust_model))}
    assert errors["robust"] < errors["plain"]


def test_load_student_rebuilds_the_model(distill_dataset, distilled):
    student, ckpt = load_student(distilled.checkpoint)
    again, _ = load_student(Path(distilled.checkpoint).parent)
    assert ckpt["kind"] == "distilled"
    assert list(student.heads) == list(TASKS)
    assert student.encoder.cfg.dim == STUDENT["dim"] and student.encoder.cfg.objective == "distilled"
    assert not any(k.startswith("projection") for k in ckpt["state_dict"])  # the projection is discarded
    assert ckpt["data"]["feature_hashes"] and ckpt["extra"]["teacher_checkpoints"]
    inputs = distill.example_inputs(student, nodes=8, batch=3)
    with torch.no_grad():
        for x, y in zip(student(*inputs), again(*inputs), strict=True):
            assert torch.equal(x, y)
    # the reloaded student scores exactly what the run measured on the in-memory one
    windows = load_windows(distill_dataset, progress=False)
    _, val_idx = temporal_split(len(windows), 0.25)
    assert distill.task_metrics(student, windows, val_idx, 8, torch.device("cpu")) == distilled.student_metrics


def test_report_has_size_and_flops(distilled):
    t, s = distilled.teacher_size, distilled.student_size
    assert 0 < s["parameters"] < t["parameters"]
    assert 0 < s["flops"] < t["flops"]
    assert s["fp32_bytes"] < t["fp32_bytes"]
    text = distilled.report.read_text()
    assert "parameters" in text and "FLOPs" in text
    assert f"{s['parameters']:,}" in text and f"{t['flops']:,}" in text
    for task in TASKS:
        assert f"| {task} |" in text
    student, _ = load_student(distilled.checkpoint)
    assert model_size(student) == s


def test_refuses_teachers_with_different_encoders(distill_dataset, teacher, tmp_path):
    other = run_finetune(FinetuneConfig(data=str(distill_dataset), out=str(tmp_path / "scratch"), task="localize",
                                        epochs=1, batch_size=16, progress=False, model=dict(TEACHER_MODEL)))
    cfg = config(distill_dataset, [teacher["classify"], str(other.checkpoint)], tmp_path / "out")
    with pytest.raises(ExportError, match="another encoder"):
        run_distill(cfg)
    with pytest.raises(ExportError, match="no such checkpoint"):
        run_distill(config(distill_dataset, [str(tmp_path / "missing")], tmp_path / "out"))


@pytest.mark.parametrize(("changes", "message"), [
    ({"teacher": []}, "at least one fine-tuned checkpoint"),
    ({"data": ""}, "data is required"),
    ({"epochs": 0}, "epochs must be"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"feature_weight": 0.0, "output_weight": 0.0}, "nothing to distil"),
    ({"student": {"width": 8}}, "unknown or fixed setting"),
    ({"student": {"modalities": ()}}, "unknown or fixed setting"),
    ({"student": {"dim": 10, "heads": 4}}, "divisible"),
    ({"student": {"dim": 0}}, "student.dim"),
    ({"device": "tpu"}, "unknown device"),
    ({"message_loss": 1.0}, "message_loss"),
])
def test_bad_config_is_an_export_error(tmp_path, changes, message):
    cfg = replace(config(tmp_path / "data", ["a.pt"], tmp_path / "out"), **changes)
    with pytest.raises(ExportError, match=message):
        cfg.validate()
    with pytest.raises(ExportError, match=message):
        run_distill(cfg)


def test_a_student_keeps_the_teachers_head_variant(tiny_window_set):
    """A RobustHAR fusion-head teacher gets a fusion-head student (with the same token layout)."""
    from export.deploy_model import DeployModel
    from export.distill import student_from_teacher
    from train.finetune import build_head, head_settings
    from train.heads.multiscale_fusion import MultiScaleFusionClassifier
    from train.models.config import ModalitySpec, SparConfig
    from train.models.spar import SparEncoder

    windows = tiny_window_set
    cfg = SparConfig(modalities=tuple(ModalitySpec(m, *s) for m, s in windows.token_shapes.items()), max_nodes=8,
                     dim=16, heads=2, decoder_dim=16, modality_depth=1, joint_depth=1, structural_dims=2)
    kwargs = head_settings("fusion", "classify", cfg, windows)
    teacher = DeployModel(SparEncoder(cfg), {"classify": build_head("fusion", "classify", 16, 5, 2, kwargs)}, 5, 2)
    student = student_from_teacher(teacher, {"dim": 8, "heads": 2}, 5, 2)
    head = student.heads["classify"]
    assert isinstance(head, MultiScaleFusionClassifier) and head.layout == kwargs["layout"]
    assert head.variant == "fusion" and head.linear.in_features == 3 * 8
    with pytest.raises(ExportError, match="reads the teacher's token grid"):
        student_from_teacher(teacher, {"dim": 8, "heads": 2, "token_merge": 2}, 5, 2)


def test_merge_latents_averages_groups_within_one_node():
    latents = torch.arange(2 * 12 * 3, dtype=torch.float32).reshape(2, 12, 3)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 4:8] = False  # window 1: the second node (4 tokens each) is absent
    merged, merged_valid = distill_loss.merge_latents(latents, valid, 2)
    assert merged.shape == (2, 6, 3)
    assert torch.equal(merged[0, 1], latents[0, 2:4].mean(0))
    assert merged_valid[1].tolist() == [True, True, False, False, True, True]
    assert distill_loss.merge_latents(latents, valid, 1)[0] is latents


def test_a_token_merged_student_learns_and_exports(distill_dataset, teacher, tmp_path):
    """token_merge 2: the student attends over half the tokens, follows the teacher after distillation
    and exports to one ONNX graph with the teacher's very inputs (parity checked by export_onnx)."""
    from export.onnx_export import export_onnx

    result = run_distill(config(distill_dataset, teacher.values(), tmp_path / "merged",
                                student={**STUDENT, "token_merge": 2}))
    before, after = result.discrepancy_before, result.discrepancy_after
    assert result.val_loss < 0.5 * result.val_loss_before
    assert after["position_rmse"] < before["position_rmse"]
    assert after["logits_kl"] < before["logits_kl"]
    student, _ = load_student(result.checkpoint)
    teacher_model, _ = load_teacher(list(teacher.values()))
    assert student.encoder.cfg.token_merge == 2
    assert result.student_size["flops"] < model_size(student_from_teacher(teacher_model, STUDENT, 5, 2))["flops"]
    path = export_onnx(student, tmp_path / "model.onnx")
    import onnx
    graph_inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                    for i in onnx.load(path).graph.input}
    assert graph_inputs == {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                            for i in onnx.load(export_onnx(teacher_model, tmp_path / "t.onnx")).graph.input}


def test_a_node_anchored_detector_teaches_an_anchored_student(tiny_window_set):
    """The student of an anchored-detector teacher is anchored too, even with merged tokens (the
    anchors are the nodes, not the token grid), and its detections start on its nodes."""
    from export.deploy_model import DeployModel
    from export.distill import student_from_teacher
    from export.distill_loss import forward_parts
    from train.finetune import build_head, head_settings
    from train.heads.anchor_detector import NodeAnchorDetector
    from train.models.config import ModalitySpec, SparConfig
    from train.models.spar import SparEncoder

    windows = tiny_window_set
    cfg = SparConfig(modalities=tuple(ModalitySpec(m, *s) for m, s in windows.token_shapes.items()), max_nodes=8,
                     dim=16, heads=2, decoder_dim=16, modality_depth=1, joint_depth=1, structural_dims=2)
    kwargs = head_settings("anchors", "detect", cfg, windows)
    assert kwargs == {"position_dims": 2}
    teacher = DeployModel(SparEncoder(cfg), {"detect": build_head("anchors", "detect", 16, 5, 2, kwargs)}, 5, 2)
    student = student_from_teacher(teacher, {"dim": 8, "heads": 2, "token_merge": 2}, 5, 2)
    head = student.heads["detect"]
    assert isinstance(head, NodeAnchorDetector) and head.variant == "anchors" and head.n_queries == "nodes"
    batch = windows.batch(np.arange(3))
    parts = forward_parts(student, batch)
    assert parts["out/detect/logits"].shape == (3, windows.n_nodes, 6)
    normalised, _ = student.encoder.prepare_positions(batch.positions)
    torch.testing.assert_close(parts["out/detect/positions"], normalised)
