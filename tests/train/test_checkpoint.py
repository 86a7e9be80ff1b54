"""Checkpoints are written through spar_wire.atomic_file: readable by other users, never torn."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from train.checkpoint import load_checkpoint, save_checkpoint


def _save(path, model: torch.nn.Module, step: int):
    return save_checkpoint(path, kind="pretrain", model_config={"dim": 4}, model=model, run_config={"lr": 1e-3},
                           data_info={"feature_hashes": {}}, step=step, epoch=1)


def test_a_checkpoint_round_trips_and_others_may_read_it(tmp_path):
    model = torch.nn.Linear(4, 2)
    path = _save(tmp_path / "run" / "checkpoint.pt", model, step=7)
    loaded = load_checkpoint(tmp_path / "run", kind="pretrain")
    assert loaded["step"] == 7 and loaded["path"] == str(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["state_dict"][key], value)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert json.loads((path.parent / "config.json").read_text())["step"] == 7
    assert sorted(os.listdir(path.parent)) == ["checkpoint.pt", "config.json"]


def test_a_failed_save_keeps_the_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    path = _save(tmp_path / "checkpoint.pt", torch.nn.Linear(4, 2), step=1)
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # the operator stops training mid-save

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(path, torch.nn.Linear(4, 2), step=2)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "config.json"]
