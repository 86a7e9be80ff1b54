"""Run configurations of ``spar-train``: one dataclass per command, read from TOML and flags.

A TOML file holds a table per command (``[pretrain]``, ``[finetune]``) and, for pretraining, a
``[model]`` table of SparConfig overrides. Flags given on the command line win over the file.
The resolved config is saved beside every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from spar_wire.errors import WireError
from spar_wire.toml_file import read_toml
from train.errors import TrainError

SLOT_POLICIES = ("site", "nearest", "mean", "random")


@dataclass
class PretrainConfig:
    data: str = ""  # spar-node dataset directory
    out: str = ""  # run directory: checkpoint.pt, config.json, log.jsonl
    objective: str = "spar"  # spar | mae | an ablation (see train.models.config.ABLATIONS)
    epochs: int = 20
    batch_size: int = 32  # per process; the global batch is batch_size x world size
    lr: float = 1e-3  # peak learning rate (AdamW), after a linear warm-up
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    val_fraction: float = 0.25  # the last windows (temporal split, as in the paper)
    max_windows: int | None = None  # use only the first windows of the dataset
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True
    model: dict[str, Any] = field(default_factory=dict)  # SparConfig overrides: dim, modality_depth, ...

    def validate(self) -> None:
        _require(self.data, "data")
        _require(self.out, "out")
        _positive(self, "epochs", "batch_size", "lr")
        if not 0.0 < self.val_fraction < 1.0:
            raise TrainError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class FinetuneConfig:
    data: str = ""  # spar-node dataset directory
    out: str = ""  # run directory
    task: str = "classify"  # classify | localize | detect | quake; several comma-separated train jointly
    encoder: str | None = None  # pretrain checkpoint; None trains the encoder from scratch (supervised)
    label_ratio: float = 1.0  # share of the training windows whose labels are used (class-stratified)
    freeze_encoder: bool = True  # False: full fine-tuning, encoder too (always False from scratch)
    epochs: int = 100  # frozen heads train on cached features, so epochs are cheap
    steps: int | None = None  # instead of epochs: train until this many optimiser steps (whole epochs)
    batch_size: int = 32
    lr: float = 3e-3  # for frozen heads; from scratch 1e-3 with ~30 epochs works better
    weight_decay: float = 1e-4
    val_fraction: float = 0.25
    max_windows: int | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    model: dict[str, Any] = field(default_factory=dict)  # from scratch only: SparConfig overrides
    # Structural positions of the dataset's nodes when its layout differs from the pretraining one
    # (SPAR Table 7): "site" (slot i = node i), "nearest" (slot of the nearest pretraining node),
    # "mean" (every node gets the mean learned vector), "random" (a random learned slot per node).
    slots: str = "site"
    # "" = the task's default head; transformer (SPAR's one-block head, classify) | fusion (RobustHAR,
    # classify) | map (AEMP, localize)
    head: str = ""
    layerwise: bool = False  # AEMP: head first, then the encoder unfrozen with per-layer decayed lr
    # lr of layer i below the head = lr * layer_decay ** i; None = 0.5 layer-wise (AEMP), 0.75 full (MAE)
    layer_decay: float | None = None
    # Fair MAE baseline: a learnable per-node vector added to the latents inside the head, so a
    # placement-agnostic encoder's head still knows which node each token came from.
    node_identity: bool = False

    def validate(self) -> None:
        _require(self.data, "data")
        _require(self.out, "out")
        _positive(self, "epochs", "batch_size", "lr")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise TrainError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.slots not in SLOT_POLICIES:
            raise TrainError(f"slots must be one of {', '.join(SLOT_POLICIES)}, got {self.slots!r}")
        if self.steps is not None and self.steps < 1:
            raise TrainError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 < self.label_ratio <= 1.0:
            raise TrainError(f"label_ratio must be in (0, 1], got {self.label_ratio}")
        if not 0.0 < self.val_fraction < 1.0:
            raise TrainError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def load_run_config(cls, path: str | Path | None, section: str, overrides: dict[str, Any]):
    """``cls`` from the ``[section]`` table of a TOML file (and ``[model]``), then ``overrides``
    (flags left at None are ignored)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            doc = read_toml(Path(path))
        except WireError as exc:
            raise TrainError(exc.detail) from None
        values.update(doc.get(section, {}))
        if "model" in doc:
            values["model"] = dict(doc["model"])
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainError(f"unknown {section} settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    cfg = cls(**values)
    cfg.validate()
    return cfg


def as_dict(cfg) -> dict[str, Any]:
    return asdict(cfg)


def _require(value: str, name: str) -> None:
    if not value:
        raise TrainError(f"{name} is required (flag --{name.replace('_', '-')} or the config file)")


def _positive(cfg, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise TrainError(f"{name} must be > 0, got {getattr(cfg, name)}")
