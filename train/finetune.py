"""Fine-tuning: a task head on a frozen pretrained encoder (or everything from scratch).

With a frozen encoder the features of every window are computed once and cached, so the head's
epochs cost almost nothing; this is what makes label-ratio sweeps cheap on a CPU. The supervised
baseline (no --encoder) trains encoder and head together on the labelled windows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from spar_wire.floor_plan import floor_plan_from_source
from spar_wire.placement_text import text_model_id
from train.batch import Batch
from train.checkpoint import load_checkpoint, save_checkpoint
from train.data import WindowSet, iterate_batches, label_subset, load_windows, temporal_split, token_statistics
from train.distributed import pick_device
from train.errors import TrainError
from train.heads import HEAD_VARIANTS, HEADS, make_head, make_head_variant
from train.layerwise import apply_unfreezing, encoder_layers, layerwise_param_groups, unfrozen_depth
from train.metrics import summarize
from train.models.config import SparConfig, objective_config
from train.models.positions import PositionFrame
from train.models.spar import SparEncoder
from train.pretrain import base_model_config, data_info, load_encoder
from train.run_config import FinetuneConfig, as_dict
from train.unseen_layout import assign_structural_slots

CHECKPOINT = "checkpoint.pt"
LEGAL_CELL_M = 0.25  # legal-position grid of the map head: fine next to a wall's thickness


class TaskModel(nn.Module):
    """Frozen (or trained) encoder + task head: the model that is evaluated and exported."""

    def __init__(self, encoder: SparEncoder, head: nn.Module, task: str):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.task = task

    def forward(self, batch):
        """Batch -> (head outputs, PositionFrame)."""
        features = self.encoder.forward_features(batch)
        return self.head(features.latents, features.valid), features.frame


@dataclass
class FinetuneResult:
    checkpoint: Path
    metrics: dict[str, float]
    train_windows: int
    val_windows: int
    seconds: float


def task_indices(windows: WindowSet, task: str, indices: np.ndarray) -> np.ndarray:
    """The windows a task can learn from: localization needs a target in the first slot."""
    if task in ("localize", "quake"):
        first = windows.target_position[indices, 0]
        return indices[np.isfinite(first).all(axis=-1)]
    return indices


def stratify_labels(windows: WindowSet, task: str, indices: np.ndarray) -> np.ndarray:
    """What the label subset is stratified on: the window label, or the first target's class."""
    if task in ("localize", "detect"):
        return windows.target_class[indices, 0]
    return windows.label[indices]


def build_task_model(cfg: FinetuneConfig, windows: WindowSet, train_idx: np.ndarray) -> tuple[TaskModel, dict]:
    """The encoder (pretrained, or fresh for the supervised baseline) with a new head."""
    if cfg.task not in HEADS:
        raise TrainError(f"unknown task {cfg.task!r}; known: {', '.join(sorted(HEADS))}")
    torch.manual_seed(cfg.seed)
    if cfg.encoder:
        encoder, ckpt = load_encoder(cfg.encoder)
        check_compatible(ckpt["data"], windows, cfg.encoder)
        assign_structural_slots(encoder, ckpt["data"].get("site", {}), windows, cfg.slots, cfg.seed)
        source = {"encoder_checkpoint": str(cfg.encoder), "objective": encoder.cfg.objective}
    else:
        encoder = SparEncoder(objective_config(base_model_config(windows, cfg.model), "spar"))
        encoder.cfg = _relabel(encoder.cfg, "supervised")
        encoder.set_token_statistics(token_statistics(windows.subset(train_idx)))
        source = {"encoder_checkpoint": None, "objective": "supervised"}
    head_kwargs = head_settings(cfg.head, cfg.task, encoder.cfg, windows)
    head = build_head(cfg.head, cfg.task, encoder.cfg.dim, len(windows.class_names), windows.target_dims, head_kwargs)
    return TaskModel(encoder, head, cfg.task), {**source, "head": cfg.head, "head_kwargs": head_kwargs}


def head_settings(name: str, task: str, encoder_cfg: SparConfig, windows: WindowSet) -> dict[str, Any]:
    """The data-dependent constructor kwargs of head ``name`` (JSON-able, stored in the checkpoint):
    the token layout for the multi-scale fusion head, the legal-position grid for the map head."""
    if not name:
        return {}
    if name not in HEAD_VARIANTS:
        raise TrainError(f"unknown head {name!r}; known: {', '.join(HEAD_VARIANTS)}")
    if HEAD_VARIANTS[name][0] != task:
        raise TrainError(f"head {name!r} is a {HEAD_VARIANTS[name][0]} head, the task is {task!r}")
    if name == "fusion":
        from train.heads.multiscale_fusion import layout_of

        return {"layout": layout_of(encoder_cfg, windows.n_nodes)}
    plan = floor_plan_from_source(windows.source)
    if plan is None:
        raise TrainError("the map head needs a floor plan in the dataset (the indoor_csi scenario records one)")
    grid = plan.legal_grid(LEGAL_CELL_M)
    return {"legal_grid": {"grid": grid.mask.astype(int).tolist(), "origin": list(grid.origin), "cell_m": grid.cell_m}}


def build_head(name: str, task: str, d: int, n_classes: int, out_dims: int, kwargs: dict[str, Any]) -> nn.Module:
    """The task's default head, or variant ``name`` with its stored kwargs."""
    if not name:
        return make_head(task, d, n_classes, out_dims)
    head = make_head_variant(name, d, n_classes, out_dims, **kwargs)
    head.variant, head.variant_kwargs = name, dict(kwargs)  # distillation gives the student the same head
    return head


def check_compatible(trained_on: dict[str, Any], windows: WindowSet, where: str) -> None:
    """Refuse data whose features (or description embeddings) differ from what the encoder was
    pretrained on."""
    theirs, ours = trained_on.get("feature_hashes", {}), dict(windows.feature_hashes)
    if theirs != ours:
        raise TrainError(f"{where} was pretrained on feature configs {theirs}, this dataset has {ours}; "
                         "tokens would not mean the same thing")
    text_model = trained_on.get("text_model")
    if text_model and windows.node_text is not None and text_model != text_model_id():
        raise TrainError(f"{where} was pretrained with description embeddings from {text_model}, this machine "
                         f"has {text_model_id()}")


def run_finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Train a head (and, from scratch, the encoder); writes checkpoint.pt, config.json, log.jsonl."""
    started = time.monotonic()
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    windows = load_windows(cfg.data, limit=cfg.max_windows, progress=cfg.progress)
    train_all, val_idx = temporal_split(len(windows), cfg.val_fraction)
    train_all, val_idx = task_indices(windows, cfg.task, train_all), task_indices(windows, cfg.task, val_idx)
    if len(train_all) == 0 or len(val_idx) == 0:
        raise TrainError(f"no windows usable for task {cfg.task!r} in {cfg.data} "
                         f"(train {len(train_all)}, validation {len(val_idx)})")
    train_idx = label_subset(train_all, stratify_labels(windows, cfg.task, train_all), cfg.label_ratio, cfg.seed)
    model, source = build_task_model(cfg, windows, train_idx)
    model.to(device)
    frozen = cfg.freeze_encoder and cfg.encoder is not None and not cfg.layerwise
    log = open(out / "log.jsonl", "w")
    try:
        if frozen:
            _train_frozen(model, windows, train_idx, cfg, device, log)
        else:
            _train_end_to_end(model, windows, train_idx, cfg, device, log)
    finally:
        log.close()
    metrics = evaluate(model, windows, val_idx, cfg.batch_size, device)
    info = data_info(windows, cfg.data, _stats_of(model.encoder), train_windows=len(train_idx),
                     val_windows=len(val_idx), label_ratio=cfg.label_ratio)
    save_checkpoint(out / CHECKPOINT, kind="finetune", model_config=model.encoder.cfg.to_dict(), model=model,
                    run_config=as_dict(cfg), data_info=info, step=0, epoch=epochs_for(cfg, len(train_idx)),
                    metrics=metrics,
                    extra={"encoder_config": model.encoder.cfg.to_dict(), "task": cfg.task,
                           "n_classes": len(windows.class_names), "out_dims": windows.target_dims,
                           "frozen_encoder": frozen, **source})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return FinetuneResult(out / CHECKPOINT, metrics, len(train_idx), len(val_idx), time.monotonic() - started)


def epochs_for(cfg: FinetuneConfig, windows: int) -> int:
    """``cfg.epochs``, or with ``cfg.steps`` the whole epochs that make at least that many steps
    (so label ratios 1.0 and 0.2 can get the same number of updates)."""
    if cfg.steps is None:
        return cfg.epochs
    return max(1, math.ceil(cfg.steps / max(1, math.ceil(windows / cfg.batch_size))))


def _stats_of(encoder: SparEncoder) -> dict[str, tuple[float, float]]:
    return {k: (float(e.token_mean), float(e.token_std)) for k, e in encoder.embeddings.items()}


def _relabel(cfg: SparConfig, objective: str) -> SparConfig:
    return replace(cfg, objective=objective)


@torch.no_grad()
def encode_windows(encoder: SparEncoder, windows: WindowSet, indices: np.ndarray, batch_size: int,
                   device: torch.device, progress: bool = False) -> dict[str, torch.Tensor]:
    """Frozen features of ``indices``: latents [W, L, d], valid [W, L], frame mean [W, d_S], scale [W]."""
    encoder.eval()
    parts: dict[str, list[torch.Tensor]] = {"latents": [], "valid": [], "mean": [], "scale": []}
    batches = iterate_batches(indices, batch_size, shuffle=False, seed=0, epoch=0, drop_last=False)
    for index in tqdm(list(batches), desc="encoding", disable=not progress, unit="batch"):
        f = encoder.forward_features(windows.batch(index).to(device))
        for key, value in (("latents", f.latents), ("valid", f.valid), ("mean", f.frame.mean),
                           ("scale", f.frame.scale)):
            parts[key].append(value.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _targets(windows: WindowSet, index: np.ndarray, device: torch.device) -> SimpleNamespace:
    """Only what a head's loss reads: the cached-feature loop must not assemble token tensors."""
    return SimpleNamespace(**{name: torch.from_numpy(getattr(windows, name)[index]).to(device)
                              for name in ("label", "target_class", "target_position")})


def _train_frozen(model: TaskModel, windows, train_idx, cfg: FinetuneConfig, device, log) -> None:
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    cache = encode_windows(model.encoder, windows, train_idx, cfg.batch_size, device, cfg.progress)
    position = {int(w): i for i, w in enumerate(train_idx)}
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bar = tqdm(range(epochs_for(cfg, len(train_idx))), desc=f"finetune {cfg.task} (frozen encoder)",
               disable=not cfg.progress)
    for epoch in bar:
        model.head.train()
        losses = []
        for index in iterate_batches(train_idx, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                                     drop_last=False):
            rows = torch.tensor([position[int(w)] for w in index])
            frame = PositionFrame(cache["mean"][rows].to(device), cache["scale"][rows].to(device))
            outputs = model.head(cache["latents"][rows].to(device), cache["valid"][rows].to(device))
            loss = model.head.loss(outputs, _targets(windows, index, device), frame)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        _log_epoch(log, bar, epoch, losses)


def _train_end_to_end(model: TaskModel, windows, train_idx, cfg: FinetuneConfig, device, log) -> None:
    layers = None
    if cfg.layerwise and cfg.encoder is not None:
        # AEMP's layer-wise fine-tuning: the head alone for the first fifth of the epochs, then the
        # encoder too, each layer below the head at a learning rate decayed by cfg.layer_decay.
        layers = encoder_layers(model.encoder, model.head)
        optimizer = torch.optim.AdamW(layerwise_param_groups(model.encoder, model.head, cfg.lr, cfg.layer_decay),
                                      lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    epochs = epochs_for(cfg, len(train_idx))
    bar = tqdm(range(epochs), desc=f"train {cfg.task} (encoder + head)", disable=not cfg.progress)
    for epoch in bar:
        if layers is not None:
            apply_unfreezing(layers, unfrozen_depth(epoch, len(layers), freeze_epochs=max(1, epochs // 5)))
        model.train()
        losses = []
        for index in iterate_batches(train_idx, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                                     drop_last=False):
            batch = windows.batch(index).to(device)
            outputs, frame = model(batch)
            loss = model.head.loss(outputs, batch, frame)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        _log_epoch(log, bar, epoch, losses)


def _log_epoch(log, bar, epoch: int, losses: list[float]) -> None:
    mean = sum(losses) / max(1, len(losses))
    bar.set_postfix(loss=f"{mean:.4f}")
    log.write(json.dumps({"epoch": epoch + 1, "train_loss": mean}) + "\n")
    log.flush()


@torch.no_grad()
def predict(model: TaskModel, windows: WindowSet, indices: np.ndarray, batch_size: int,
            device: torch.device, transform: Callable[[Batch], Batch] | None = None) -> dict[str, np.ndarray]:
    """The head's predictions for ``indices``, concatenated (metres / class ids); ``transform``
    alters each batch first (e.g. simulated node loss)."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for index in iterate_batches(indices, batch_size, shuffle=False, seed=0, epoch=0, drop_last=False):
        batch = windows.batch(index)
        outputs, frame = model((transform(batch) if transform else batch).to(device))
        for key, value in model.head.predict(outputs, frame).items():
            parts.setdefault(key, []).append(np.asarray(value))
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate(model: TaskModel, windows: WindowSet, indices: np.ndarray, batch_size: int,
             device: torch.device, transform: Callable[[Batch], Batch] | None = None) -> dict[str, float]:
    """Task metrics of ``model`` on ``indices`` (see train.metrics.summarize)."""
    predictions = predict(model, windows, indices, batch_size, device, transform)
    truth = {"label": windows.label[indices], "target_class": windows.target_class[indices],
             "target_position": windows.target_position[indices]}
    return summarize(model.task, predictions, truth)


def load_task_model(path: str | Path) -> tuple[TaskModel, dict[str, Any]]:
    """Rebuild a fine-tuned model (encoder + head) from its checkpoint alone."""
    ckpt = load_checkpoint(path, kind="finetune")
    extra = ckpt["extra"]
    encoder = SparEncoder(SparConfig.from_dict(extra["encoder_config"]))
    head = build_head(extra.get("head", ""), extra["task"], encoder.cfg.dim, extra["n_classes"], extra["out_dims"],
                      extra.get("head_kwargs", {}))
    model = TaskModel(encoder, head, extra["task"])
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt
