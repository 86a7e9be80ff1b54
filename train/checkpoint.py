"""Checkpoints that rebuild their own model.

A checkpoint is one ``torch.save`` file holding the model config, the weights, the optimiser
state, the step, the run config and a description of the data it was trained on (feature-config
hashes, class names, site). The run config is also written beside it as ``config.json`` so a
person can read what produced it without loading torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from spar_wire.atomic_file import atomic_writer
from train.errors import TrainError

FORMAT = "spar-train-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, *, kind: str, model_config: dict[str, Any], model: torch.nn.Module,
                    run_config: dict[str, Any], data_info: dict[str, Any], step: int, epoch: int,
                    optimizer: torch.optim.Optimizer | None = None, metrics: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write atomically (temp file + rename, ``spar_wire.atomic_file``): a crash mid-save never leaves a
    torn checkpoint, and a power cut after the return cannot bring back the old one. Mode 0644: the
    exporter, benchmarks and other users read checkpoints."""
    path = Path(path)
    payload = {
        "format": FORMAT, "version": VERSION, "kind": kind,
        "model_config": model_config, "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "run_config": run_config, "data": data_info, "step": step, "epoch": epoch,
        "metrics": metrics or {}, "extra": extra or {},
    }
    with atomic_writer(path, mode=0o644) as handle:
        torch.save(payload, handle)
    (path.parent / "config.json").write_text(json.dumps(
        {"kind": kind, "run": run_config, "model": model_config, "data": data_info, "step": step,
         "epoch": epoch, "metrics": metrics or {}}, indent=2, default=str) + "\n")
    return path


def load_checkpoint(path: str | Path, *, kind: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU, checking its format and (when given) its kind."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise TrainError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise TrainError(f"{path}: not a readable checkpoint: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TrainError(f"{path}: not a {FORMAT} file")
    if payload.get("version") != VERSION:
        raise TrainError(f"{path}: checkpoint version {payload.get('version')} is not supported "
                         f"(this release reads {VERSION})")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and payload["kind"] not in kinds:
        raise TrainError(f"{path}: is a {payload['kind']!r} checkpoint, expected {' or '.join(kinds)}")
    payload["path"] = str(path)
    return payload
