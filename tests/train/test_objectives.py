"""The objective registry and the supervised objective (RobustHAR/AEMP: test_robusthar.py, test_aemp.py)."""

from __future__ import annotations

import math

import pytest
import torch

from train.checkpoint import load_checkpoint
from train.errors import TrainError
from train.finetune import run_finetune
from train.models.config import ModalitySpec, SparConfig
from train.objectives import PRETRAINERS, build_pretrainer, objective_names
from train.pretrain import load_encoder, run_pretrain
from train.run_config import FinetuneConfig, PretrainConfig

TINY_MODEL = {"dim": 16, "heads": 2, "decoder_dim": 8, "modality_depth": 1, "joint_depth": 1, "structural_dims": 2}


def test_every_objective_named_by_the_issue_is_known():
    assert {"spar", "mae", "robusthar", "aemp", "supervised"} <= set(objective_names())
    assert PRETRAINERS["no_spatial_reconstruction"] == PRETRAINERS["spar"]


def test_unknown_objective_is_refused_with_the_known_names():
    cfg = SparConfig(modalities=(ModalitySpec("a", 4, 3),), objective="contrastive")
    with pytest.raises(ValueError, match="known: spar"):
        build_pretrainer(cfg)


def test_patch_grid_must_hold_the_tokens():
    assert ModalitySpec("a", 12, 3, patch_grid=[3, 4]).grid == (3, 4)
    assert ModalitySpec("a", 12, 3).grid == (1, 12)
    with pytest.raises(ValueError, match="does not hold 12 tokens"):
        ModalitySpec("a", 12, 3, patch_grid=(3, 5))


def test_supervised_params_are_validated():
    cfg = SparConfig(modalities=(ModalitySpec("a", 4, 3),), objective="supervised",
                     objective_params={"task": "detect"})
    with pytest.raises(ValueError, match="supervised task"):
        build_pretrainer(cfg)


def test_supervised_objective_trains_an_encoder_that_heads_reuse(tiny_parking_dataset, tmp_path):
    cfg = PretrainConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "sup"), objective="supervised",
                         epochs=2, batch_size=8, lr=3e-3, progress=False, model=dict(TINY_MODEL))
    result = run_pretrain(cfg)
    ckpt = load_checkpoint(result.checkpoint, kind="pretrain")
    params = ckpt["model_config"]["objective_params"]
    assert params["task"] == "classify" and params["n_classes"] >= 2
    assert math.isfinite(result.train_loss)  # neither NaN nor infinite
    encoder, _ = load_encoder(result.checkpoint)
    assert encoder.cfg.objective == "supervised"
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    head = run_finetune(FinetuneConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "head"),
                                       encoder=str(result.checkpoint), epochs=2, progress=False))
    assert "accuracy" in head.metrics
    reloaded, _ = load_encoder(result.checkpoint)
    assert all(torch.equal(before[k], v) for k, v in reloaded.state_dict().items())


def test_pretrain_refuses_an_unknown_objective(tiny_parking_dataset, tmp_path):
    cfg = PretrainConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "x"), objective="bogus",
                         epochs=1, batch_size=8, progress=False, model=dict(TINY_MODEL))
    with pytest.raises(TrainError, match="unknown objective"):
        run_pretrain(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("objective, task, head", [("robusthar", "classify", "fusion"), ("aemp", "localize", "")])
def test_alternative_objectives_export_and_run_in_the_aggregator(tiny_parking_dataset, tmp_path, objective, task,
                                                                 head):
    """RobustHAR and AEMP encoders go through the same fine-tune -> export -> ONNX Runtime path as SPAR."""
    import numpy as np

    from edge_runtime.inference.onnxruntime_backend import OnnxRuntimeBackend
    from export.exporter import export_checkpoints
    from export.parity import window_inputs
    from spar_wire.model_manifest import load_manifest
    from train.data import load_windows

    pre = run_pretrain(PretrainConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "pre"), objective=objective,
                                      epochs=1, batch_size=8, lr=3e-3, progress=False, model=dict(TINY_MODEL)))
    tuned = run_finetune(FinetuneConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "head"), task=task,
                                        encoder=str(pre.checkpoint), head=head, epochs=2, progress=False))
    exported = export_checkpoints([str(tuned.checkpoint)], tmp_path / "export", name=f"tiny-{objective}",
                                  version="0.0.1", data=str(tiny_parking_dataset))
    assert exported.parity is not None and max(exported.parity.max_abs_error.values()) < 1e-4
    manifest = load_manifest(exported.manifest)
    windows = load_windows(tiny_parking_dataset, progress=False)
    outputs = OnnxRuntimeBackend(manifest).run(window_inputs(windows, np.arange(3), [t.name for t in manifest.inputs]))
    assert all(np.isfinite(v).all() and v.shape[0] == 3 for v in outputs.values())


def test_layerwise_finetuning_trains_the_head_first_then_the_encoder(tiny_parking_dataset, tmp_path):
    pre = run_pretrain(PretrainConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "pre"), epochs=1,
                                      batch_size=8, progress=False, model=dict(TINY_MODEL)))
    before, _ = load_encoder(pre.checkpoint)
    short = run_finetune(FinetuneConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "one"), task="localize",
                                        encoder=str(pre.checkpoint), layerwise=True, epochs=1, progress=False))
    long = run_finetune(FinetuneConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "six"), task="localize",
                                       encoder=str(pre.checkpoint), layerwise=True, epochs=6, progress=False))
    frozen_phase, _ = load_encoder(short.checkpoint)
    unfrozen, ckpt = load_encoder(long.checkpoint)
    reference = before.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in frozen_phase.state_dict().items())  # epoch 0: head only
    assert any(not torch.equal(reference[k], v) for k, v in unfrozen.state_dict().items())
    assert ckpt["extra"]["frozen_encoder"] is False
