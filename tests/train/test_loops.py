"""Pretraining and fine-tuning loops end to end on a tiny generated dataset, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train.pretrain
from train.checkpoint import load_checkpoint
from train.cli import main
from train.errors import TrainError
from train.finetune import load_task_model, run_finetune
from train.pretrain import load_encoder, run_pretrain
from train.run_config import FinetuneConfig, PretrainConfig, load_run_config

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = {"dim": 16, "heads": 2, "decoder_dim": 8, "modality_depth": 1, "joint_depth": 1, "structural_dims": 2}


def pretrain_config(data, out, **changes) -> PretrainConfig:
    values = dict(data=str(data), out=str(out), epochs=2, batch_size=8, lr=3e-3, warmup_epochs=0.5,
                  progress=False, model=dict(TINY_MODEL))
    values.update(changes)
    return PretrainConfig(**values)


def log_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def states_close(a: dict, b: dict, atol: float) -> float:
    """Largest absolute difference between two state dicts."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def mean_abs_difference(a: dict, b: dict) -> float:
    diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    return float(diffs.mean())


@pytest.mark.slow
def test_pretraining_loss_falls(tiny_parking_dataset, tmp_path):
    run_pretrain(pretrain_config(tiny_parking_dataset, tmp_path / "run", epochs=8, batch_size=4))
    log = log_of(tmp_path / "run")
    assert len(log) == 8
    assert log[-1]["train_loss"] < 0.7 * log[0]["train_loss"], log
    assert log[-1]["val_loss"] < log[0]["val_loss"], log


def test_resume_continues_exactly_where_it_stopped(tiny_parking_dataset, tmp_path, monkeypatch):
    straight = run_pretrain(pretrain_config(tiny_parking_dataset, tmp_path / "straight", epochs=3))
    saves = []
    real_save = train.pretrain.save_checkpoint

    def crash_after_two_epochs(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(kwargs["epoch"])
        if len(saves) == 2:
            raise KeyboardInterrupt  # the machine goes down right after epoch 2 was saved

    monkeypatch.setattr(train.pretrain, "save_checkpoint", crash_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(pretrain_config(tiny_parking_dataset, tmp_path / "resumed", epochs=3))
    monkeypatch.undo()
    resumed = run_pretrain(pretrain_config(tiny_parking_dataset, tmp_path / "resumed", epochs=3))
    a = load_checkpoint(straight.checkpoint)
    b = load_checkpoint(resumed.checkpoint)
    assert a["step"] == b["step"] and b["epoch"] == 3
    assert states_close(a["state_dict"], b["state_dict"], 0) < 1e-6
    assert len(log_of(tmp_path / "resumed")) == 3


def test_rerunning_a_finished_pretraining_changes_nothing(tiny_parking_dataset, tmp_path, capsys):
    run = tmp_path / "done"
    run_pretrain(pretrain_config(tiny_parking_dataset, run, epochs=1))
    before = load_checkpoint(run / "checkpoint.pt")
    flags = ["pretrain", "--data", str(tiny_parking_dataset), "--out", str(run), "--epochs", "1", "--batch-size", "8",
             "--lr", "3e-3", "--no-progress"] + [f"--model={k}={v}" for k, v in TINY_MODEL.items()]
    capsys.readouterr()
    assert main(flags) == 0
    assert "already holds all 1 epochs" in capsys.readouterr().out
    after = load_checkpoint(run / "checkpoint.pt")
    assert after["step"] == before["step"] and states_close(after["state_dict"], before["state_dict"], 0) == 0


def test_resume_refuses_another_model(tiny_parking_dataset, tmp_path):
    run_pretrain(pretrain_config(tiny_parking_dataset, tmp_path / "run", epochs=1))
    with pytest.raises(TrainError, match="another model config"):
        run_pretrain(pretrain_config(tiny_parking_dataset, tmp_path / "run", epochs=2,
                                     model={**TINY_MODEL, "dim": 32}))


@pytest.mark.slow
def test_two_ddp_processes_match_one_process_with_the_doubled_batch(tiny_parking_dataset, tmp_path):
    single = run_pretrain(pretrain_config(tiny_parking_dataset, tmp_path / "single", batch_size=8))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    model_flags = [f"--model={k}={v}" for k, v in TINY_MODEL.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "train.cli", "pretrain", "--data", str(tiny_parking_dataset), "--out", str(tmp_path / "ddp"),
           "--epochs", "2", "--batch-size", "4", "--lr", "3e-3", "--device", "cpu", "--no-progress",
           *model_flags]
    # warmup_epochs is not a flag: pass it through a config file
    (tmp_path / "cfg.toml").write_text("[pretrain]\nwarmup_epochs = 0.5\n")
    cmd += ["--config", str(tmp_path / "cfg.toml")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_checkpoint(single.checkpoint)
    b = load_checkpoint(tmp_path / "ddp")
    assert a["step"] == b["step"] == 2 * (36 // 8)
    # Adam turns float summation-order noise in near-zero gradients into up to ~lr-sized steps, so a
    # few weights differ by a fraction of one step (lr 3e-3); different data would move them by ~lr x steps.
    assert states_close(a["state_dict"], b["state_dict"], 0) < 1e-3
    assert mean_abs_difference(a["state_dict"], b["state_dict"]) < 1e-5
    assert abs(a["metrics"]["train_loss"] - b["metrics"]["train_loss"]) < 1e-4


@pytest.fixture(scope="module")
def pretrained(tiny_parking_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrained")
    run_pretrain(pretrain_config(tiny_parking_dataset, out, epochs=2))
    return out


@pytest.mark.parametrize("task", ["classify", "localize", "detect"])
def test_finetune_on_the_frozen_encoder_and_reload(tiny_parking_dataset, pretrained, tmp_path, task, capsys):
    encoder_before, _ = load_encoder(pretrained)
    cfg = FinetuneConfig(data=str(tiny_parking_dataset), out=str(tmp_path / task), task=task,
                         encoder=str(pretrained), label_ratio=0.5, epochs=3, batch_size=8, progress=False)
    result = run_finetune(cfg)
    expected = {"classify": "macro_f1", "localize": "mean_distance", "detect": "mAP@4"}[task]
    assert expected in result.metrics
    model, ckpt = load_task_model(result.checkpoint)
    assert ckpt["extra"]["frozen_encoder"] is True
    # the encoder really stayed frozen
    for key, value in encoder_before.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    # `spar-train eval` on the reloaded checkpoint reproduces the metrics
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / task), "--data", str(tiny_parking_dataset), "--json",
                 "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed.pop("windows") == result.val_windows
    assert printed == pytest.approx(result.metrics, nan_ok=True)


def test_eval_json_matches_the_finetune_metrics(tiny_parking_dataset, pretrained, tmp_path, capsys):
    cfg = FinetuneConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "cls"), task="classify",
                         encoder=str(pretrained), epochs=2, batch_size=8, progress=False)
    metrics = run_finetune(cfg).metrics
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "cls"), "--data", str(tiny_parking_dataset), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == pytest.approx(metrics["accuracy"])
    # simulated node loss runs and is reproducible for a seed
    args = ["eval", "--checkpoint", str(tmp_path / "cls"), "--data", str(tiny_parking_dataset), "--json",
            "--drop-rate", "0.5", "--seed", "3"]
    main(args)
    first = json.loads(capsys.readouterr().out)
    main(args)
    assert json.loads(capsys.readouterr().out) == first


def test_supervised_from_scratch_trains_the_encoder(tiny_parking_dataset, tmp_path):
    def encoder_after(name: str, lr: float):
        cfg = FinetuneConfig(data=str(tiny_parking_dataset), out=str(tmp_path / name), task="localize", epochs=2,
                             batch_size=8, lr=lr, progress=False, model=dict(TINY_MODEL))
        result = run_finetune(cfg)
        model, ckpt = load_task_model(result.checkpoint)
        return model.encoder.state_dict(), ckpt, result

    # lr 0 leaves the seeded initial weights (twice the same: the comparison below means something)
    start, _, _ = encoder_after("still", 0.0)
    again, _, _ = encoder_after("still-again", 0.0)
    trained, ckpt, result = encoder_after("sup", 1e-3)
    assert all(torch.equal(again[k], v) for k, v in start.items())
    assert ckpt["extra"]["objective"] == "supervised" and ckpt["extra"]["frozen_encoder"] is False
    moved = [k for k, v in start.items() if v.is_floating_point() and not torch.equal(trained[k], v)]
    assert len(moved) > len(start) // 2, f"only {len(moved)} of {len(start)} encoder tensors moved"
    assert np.isfinite(result.metrics["mse"])


def test_label_ratio_uses_fewer_windows(tiny_parking_dataset, pretrained, tmp_path):
    sizes = {}
    for ratio in (1.0, 0.25):
        cfg = FinetuneConfig(data=str(tiny_parking_dataset), out=str(tmp_path / str(ratio)), task="classify",
                             encoder=str(pretrained), label_ratio=ratio, epochs=1, progress=False)
        sizes[ratio] = run_finetune(cfg).train_windows
    assert sizes[0.25] < sizes[1.0] and sizes[1.0] == 36


def test_cli_errors_are_messages_not_tracebacks(tiny_parking_dataset, tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "o")]) == 2
    assert "data is required" in capsys.readouterr().err
    assert main(["finetune", "--data", str(tiny_parking_dataset), "--out", str(tmp_path / "f"),
                 "--label-ratio", "1.5"]) == 2
    assert "label_ratio" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(tiny_parking_dataset), "--out", str(tmp_path / "o"),
                 "--model", "colour=3"]) == 2
    assert "colour" in capsys.readouterr().err
    assert main(["finetune", "--data", str(tiny_parking_dataset), "--out", str(tmp_path / "f"),
                 "--encoder", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[pretrain]\ndata = "d"\nout = "o"\nepochs = 5\n[model]\ndim = 32\n')
    cfg = load_run_config(PretrainConfig, path, "pretrain", {"epochs": 7, "lr": None})
    assert (cfg.epochs, cfg.model, cfg.lr) == (7, {"dim": 32}, 1e-3)
    path.write_text('[pretrain]\ndata = "d"\nout = "o"\nepoch = 5\n')
    with pytest.raises(TrainError, match="unknown pretrain settings: epoch"):
        load_run_config(PretrainConfig, path, "pretrain", {})


@pytest.mark.slow
def test_earthquake_hypocentres_in_3d(tmp_path):
    """A 3-D layout (stations with elevation), missing traces and a depth target, end to end."""
    from node_firmware_sim.dataset import DatasetSpec, export_dataset

    data = tmp_path / "quakes"
    export_dataset(DatasetSpec(site=str(REPO / "configs" / "sites" / "ridgecrest_like.toml"), scenario="earthquakes",
                               windows=24, shard_size=24), data, workers=1)
    run_pretrain(pretrain_config(data, tmp_path / "pre", epochs=1, batch_size=4))
    encoder, _ = load_encoder(tmp_path / "pre")
    assert encoder.cfg.position_dims == 3
    result = run_finetune(FinetuneConfig(data=str(data), out=str(tmp_path / "quake"), task="quake",
                                         encoder=str(tmp_path / "pre"), epochs=2, batch_size=4, progress=False))
    assert {"hypocentre_median", "epicentral_median", "depth_median"} <= set(result.metrics)
    assert all(np.isfinite(v) for v in result.metrics.values())
