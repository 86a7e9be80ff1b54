"""Full fine-tuning (encoder + heads, layer-wise lr decay), joint tasks on one encoder, the paper's
classification head and the fair MAE's node-identity head, on the tiny generated dataset."""

from __future__ import annotations

import json

import pytest
import torch

from export.deploy_model import deploy_model_from_checkpoints
from train.cli import main
from train.errors import TrainError
from train.finetune import load_task_model, run_finetune, task_list
from train.heads.classifier import TransformerClassifier
from train.heads.node_identity import NodeIdentityHead
from train.pretrain import load_encoder, run_pretrain
from train.run_config import FinetuneConfig, PretrainConfig

TINY_MODEL = {"dim": 16, "heads": 2, "decoder_dim": 8, "modality_depth": 1, "joint_depth": 1, "structural_dims": 2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def pretrained(tiny_parking_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    run_pretrain(PretrainConfig(data=str(tiny_parking_dataset), out=str(out), epochs=1, batch_size=8,
                                progress=False, model=dict(TINY_MODEL)))
    return out


@pytest.fixture(scope="module")
def mae(tiny_parking_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("mae")
    run_pretrain(PretrainConfig(data=str(tiny_parking_dataset), out=str(out), objective="mae", epochs=1,
                                batch_size=8, progress=False, model=dict(TINY_MODEL)))
    return out


def test_joint_full_finetuning_moves_the_encoder_and_deploys_both_heads(tiny_parking_dataset, pretrained, tmp_path):
    before, _ = load_encoder(pretrained)
    result = run_finetune(FinetuneConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "full"),
                                         task="classify,localize", head="transformer", encoder=str(pretrained),
                                         freeze_encoder=False, epochs=2, batch_size=8, progress=False))
    assert {"classify/accuracy", "localize/mse"} <= set(result.metrics)
    cls, cls_ckpt = load_task_model(tmp_path / "full" / "classify")
    loc, loc_ckpt = load_task_model(tmp_path / "full" / "localize")
    assert isinstance(cls.head, TransformerClassifier)
    assert cls_ckpt["extra"]["fine_tuning"] == "full" and cls_ckpt["extra"]["joint_tasks"] == ["classify", "localize"]
    moved = [k for k, v in before.state_dict().items() if not torch.equal(cls.encoder.state_dict()[k], v)]
    assert moved, "full fine-tuning left the encoder as pretrained"
    for key, value in cls.encoder.state_dict().items():  # one encoder shared by both heads
        assert torch.equal(loc.encoder.state_dict()[key], value), key
    model, _ = deploy_model_from_checkpoints([str(tmp_path / "full" / t) for t in ("classify", "localize")])
    assert model.output_names == ("logits", "position")
    stored = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert stored["localize"]["mse"] == pytest.approx(result.metrics["localize/mse"])


def test_layer_decay_scales_lower_layers(tiny_parking_dataset, pretrained, tmp_path, monkeypatch):
    import train.finetune as finetune

    seen = []
    original = torch.optim.AdamW

    def spy(groups, **kwargs):
        seen.extend(groups)
        return original(groups, **kwargs)

    monkeypatch.setattr(finetune.torch.optim, "AdamW", spy)
    run_finetune(FinetuneConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "d"), task="localize",
                                encoder=str(pretrained), freeze_encoder=False, layer_decay=0.5, epochs=1,
                                batch_size=8, progress=False))
    scales = [g["lr_scale"] for g in seen]
    assert scales[0] == 1.0 and scales == sorted(scales, reverse=True) and scales[-1] < 0.2


def test_task_lists_are_checked():
    assert task_list("classify, localize") == ["classify", "localize"]
    with pytest.raises(TrainError, match="twice"):
        task_list("classify,classify")
    with pytest.raises(TrainError, match="unknown task"):
        task_list("classify,dance")


def test_fair_mae_head_tells_nodes_apart(tiny_parking_dataset, mae, tmp_path):
    result = run_finetune(FinetuneConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "fair"), task="localize",
                                         encoder=str(mae), node_identity=True, steps=5, batch_size=8, progress=False))
    model, ckpt = load_task_model(result.checkpoint)
    assert isinstance(model.head, NodeIdentityHead) and ckpt["extra"]["node_identity"]["max_nodes"] == 8
    # same latents, nodes swapped: a blind pooled head could not see the difference, this one does
    d, m = model.encoder.cfg.dim, sum(s.n_tokens for s in model.encoder.cfg.modalities)
    with torch.no_grad():
        model.head.node_embedding.weight.normal_()
        latents = torch.randn(1, 2 * m, d)
        tokens = [s.n_tokens for s in model.encoder.cfg.modalities]
        # node 0 and node 1 exchange their tokens in every modality
        blocks, start = [], 0
        for k in tokens:
            a, b = latents[:, start:start + k], latents[:, start + k:start + 2 * k]
            blocks.append(torch.cat([b, a], 1))
            start += 2 * k
        swapped = torch.cat(blocks, 1)
        valid = torch.ones(1, 2 * m, dtype=torch.bool)
        assert not torch.allclose(model.head(latents, valid), model.head(swapped, valid))
        assert model.head.node_ids(2 * m, torch.device("cpu")).tolist() == sum(
            ([0] * k + [1] * k for k in tokens), [])


def test_cli_full_finetune_and_unknown_head(tiny_parking_dataset, pretrained, tmp_path, capsys):
    assert main(["finetune", "--data", str(tiny_parking_dataset), "--encoder", str(pretrained), "--task",
                 "classify,localize", "--unfreeze", "--epochs", "1", "--batch-size", "8", "--out",
                 str(tmp_path / "cli"), "--no-progress"]) == 0
    assert (tmp_path / "cli" / "classify" / "checkpoint.pt").exists()
    assert main(["finetune", "--data", str(tiny_parking_dataset), "--encoder", str(pretrained), "--task",
                 "dance", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_the_anchored_detector_trains_on_frozen_features_and_reloads(tiny_parking_dataset, pretrained, tmp_path):
    """`spar-train finetune --task detect --head anchors`: the frozen-feature cache carries the node
    positions the head reads, and the checkpoint rebuilds the same head alone."""
    from train.heads.anchor_detector import NodeAnchorDetector

    out = tmp_path / "anchors"
    assert main(["finetune", "--data", str(tiny_parking_dataset), "--encoder", str(pretrained), "--task", "detect",
                 "--head", "anchors", "--steps", "20", "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    model, ckpt = load_task_model(out / "checkpoint.pt")
    assert isinstance(model.head, NodeAnchorDetector) and ckpt["extra"]["head"] == "anchors"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"mAP@4", "mAP@8"} and all(0.0 <= v <= 1.0 for v in metrics.values())
    moved = [k for k, v in model.head.state_dict().items() if k.startswith("position_head.4") and v.abs().sum() > 0]
    assert moved, "20 steps left the offset head at its zero start"
