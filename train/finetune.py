"""Fine-tuning: a task head on a frozen pretrained encoder (or everything from scratch).

With a frozen encoder the features of every window are computed once and cached, so the head's
epochs cost almost nothing; this is what makes label-ratio sweeps cheap on a CPU. The supervised
baseline (no --encoder) trains encoder and head together on the labelled windows.

Full fine-tuning (``freeze_encoder=False`` with an encoder, ``spar-train finetune --unfreeze``)
trains encoder and heads end to end as MAE fine-tuning does: every layer from the first step,
layer i below the head at ``lr * layer_decay ** i`` (layer-wise learning-rate decay), one epoch of
warm-up then cosine decay. Several tasks (``task="classify,localize"``) train one shared encoder
with one head each (the sum of the heads' losses) and are written as one checkpoint per task in
``out/<task>/``, so the heads deploy together on that encoder.
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
from train.heads import HEAD_VARIANTS, HEADS, make_head, make_head_variant, run_head
from train.heads.node_identity import NodeIdentityHead
from train.layerwise import apply_unfreezing, encoder_layers, layerwise_param_groups, unfrozen_depth
from train.metrics import summarize
from train.models.config import SparConfig, objective_config
from train.models.positions import PositionFrame
from train.models.spar import SparEncoder
from train.pretrain import base_model_config, data_info, load_encoder, lr_at
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
        return run_head(self.head, features.latents, features.valid, features.positions), features.frame


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


def task_list(task: str) -> list[str]:
    """``"classify,localize"`` -> ["classify", "localize"]; TrainError for an unknown or repeated task."""
    tasks = [t.strip() for t in str(task).split(",") if t.strip()]
    unknown = [t for t in tasks if t not in HEADS]
    if not tasks or unknown:
        raise TrainError(f"unknown task {task!r}; known: {', '.join(sorted(HEADS))} (several: comma-separated)")
    if len(set(tasks)) != len(tasks):
        raise TrainError(f"task {task!r} names a task twice")
    return tasks


def build_task_model(cfg: FinetuneConfig, windows: WindowSet, train_idx: np.ndarray,
                     task: str | None = None, encoder: SparEncoder | None = None) -> tuple[TaskModel, dict]:
    """The encoder (pretrained, or fresh for the supervised baseline) with a new head for ``task``
    (default ``cfg.task``); ``encoder`` shares an already built one (joint fine-tuning)."""
    task = task or cfg.task
    if task not in HEADS:
        raise TrainError(f"unknown task {task!r}; known: {', '.join(sorted(HEADS))}")
    torch.manual_seed(cfg.seed)
    if encoder is not None:
        return _with_head(cfg, windows, task, encoder, _source(cfg, encoder))
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
    return _with_head(cfg, windows, task, encoder, source)


def _source(cfg: FinetuneConfig, encoder: SparEncoder) -> dict[str, Any]:
    return {"encoder_checkpoint": str(cfg.encoder) if cfg.encoder else None, "objective": encoder.cfg.objective}


def _with_head(cfg: FinetuneConfig, windows: WindowSet, task: str, encoder: SparEncoder,
               source: dict[str, Any]) -> tuple[TaskModel, dict]:
    """``encoder`` with a fresh head of ``task``: cfg.head where that variant is a head of this task
    (joint fine-tuning gives the other tasks their default head), wrapped with node identities for
    the fair MAE baseline when cfg.node_identity."""
    name = cfg.head if cfg.head and HEAD_VARIANTS.get(cfg.head, (task,))[0] == task else ""
    head_kwargs = head_settings(name, task, encoder.cfg, windows)
    head = build_head(name, task, encoder.cfg.dim, len(windows.class_names), windows.target_dims, head_kwargs)
    identity = node_identity_settings(encoder.cfg) if cfg.node_identity else None
    if identity:
        head = NodeIdentityHead(head, identity["tokens_per_node"], identity["max_nodes"], encoder.cfg.dim)
    return TaskModel(encoder, head, task), {**source, "head": name, "head_kwargs": head_kwargs,
                                            "node_identity": identity}


def node_identity_settings(encoder_cfg: SparConfig) -> dict[str, Any]:
    """What NodeIdentityHead needs to rebuild: tokens per node of each modality, node table size."""
    return {"tokens_per_node": [s.n_tokens for s in encoder_cfg.modalities], "max_nodes": encoder_cfg.max_nodes}


def head_settings(name: str, task: str, encoder_cfg: SparConfig, windows: WindowSet) -> dict[str, Any]:
    """The data-dependent constructor kwargs of head ``name`` (JSON-able, stored in the checkpoint):
    the token layout for the multi-scale fusion head, the legal-position grid for the map head."""
    if not name:
        return {}
    if name not in HEAD_VARIANTS:
        raise TrainError(f"unknown head {name!r}; known: {', '.join(HEAD_VARIANTS)}")
    if HEAD_VARIANTS[name][0] != task:
        raise TrainError(f"head {name!r} is a {HEAD_VARIANTS[name][0]} head, the task is {task!r}")
    if name == "transformer":
        return {}
    if name == "anchors":
        return {"position_dims": encoder_cfg.position_dims}
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
    """Train a head (and, from scratch or unfrozen, the encoder); writes checkpoint.pt, config.json,
    log.jsonl and metrics.json under cfg.out (under cfg.out/<task>/ per task when several)."""
    started = time.monotonic()
    device = pick_device(cfg.device)
    tasks = task_list(cfg.task)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    windows = load_windows(cfg.data, limit=cfg.max_windows, progress=cfg.progress)
    train_all, val_all = temporal_split(len(windows), cfg.val_fraction)
    # Joint tasks learn from the union of their usable windows (each head's loss skips the rest);
    # each task is scored on its own usable validation windows.
    train_all = np.unique(np.concatenate([task_indices(windows, t, train_all) for t in tasks]))
    val_of = {t: task_indices(windows, t, val_all) for t in tasks}
    if len(train_all) == 0 or any(len(v) == 0 for v in val_of.values()):
        raise TrainError(f"no windows usable for task {cfg.task!r} in {cfg.data} "
                         f"(train {len(train_all)}, validation {min(len(v) for v in val_of.values())})")
    train_idx = label_subset(train_all, stratify_labels(windows, tasks[0], train_all), cfg.label_ratio, cfg.seed)
    models, sources = {}, {}
    encoder = None
    for task in tasks:
        models[task], sources[task] = build_task_model(cfg, windows, train_idx, task, encoder)
        encoder = models[task].encoder
    for model in models.values():
        model.to(device)
    frozen = cfg.freeze_encoder and cfg.encoder is not None and not cfg.layerwise
    log = open(out / "log.jsonl", "w")
    try:
        if frozen:
            for p in encoder.parameters():
                p.requires_grad_(False)
            # One shared frozen encoder: its features are computed once for every head.
            cache = encode_windows(encoder, windows, train_idx, cfg.batch_size, device, cfg.progress)
            for model in models.values():
                _train_frozen(model, cache, windows, train_idx, cfg, device, log)
        else:
            _train_end_to_end(encoder, {t: m.head for t, m in models.items()}, windows, train_idx, cfg, device, log)
    finally:
        log.close()
    info = data_info(windows, cfg.data, _stats_of(encoder), train_windows=len(train_idx),
                     val_windows=min(len(v) for v in val_of.values()), label_ratio=cfg.label_ratio)
    metrics = {}
    for task, model in models.items():
        metrics[task] = evaluate(model, windows, val_of[task], cfg.batch_size, device)
        where = out if len(tasks) == 1 else out / task
        where.mkdir(parents=True, exist_ok=True)
        save_checkpoint(where / CHECKPOINT, kind="finetune", model_config=encoder.cfg.to_dict(), model=model,
                        run_config=as_dict(replace(cfg, task=task)), data_info=info, step=0,
                        epoch=epochs_for(cfg, len(train_idx)), metrics=metrics[task],
                        extra={"encoder_config": encoder.cfg.to_dict(), "task": task,
                               "n_classes": len(windows.class_names), "out_dims": windows.target_dims,
                               "frozen_encoder": frozen, "fine_tuning": _mode(cfg, frozen),
                               "joint_tasks": tasks, **sources[task]})
        (where / "metrics.json").write_text(json.dumps(metrics[task], indent=2) + "\n")
    flat = metrics[tasks[0]] if len(tasks) == 1 else {f"{t}/{k}": v for t, m in metrics.items() for k, v in m.items()}
    if len(tasks) > 1:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    checkpoint = out / CHECKPOINT if len(tasks) == 1 else out / tasks[0] / CHECKPOINT
    return FinetuneResult(checkpoint, flat, len(train_idx), min(len(v) for v in val_of.values()),
                          time.monotonic() - started)


def _mode(cfg: FinetuneConfig, frozen: bool) -> str:
    """How the encoder was treated: frozen | layerwise (AEMP) | full (end to end, LLRD) | scratch."""
    if cfg.encoder is None:
        return "scratch"
    if frozen:
        return "frozen"
    return "layerwise" if cfg.layerwise else "full"


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
    """Frozen features of ``indices``: latents [W, L, d], valid [W, L], frame mean [W, d_S], scale [W],
    normalised node positions [W, N, d_S]."""
    encoder.eval()
    parts: dict[str, list[torch.Tensor]] = {"latents": [], "valid": [], "mean": [], "scale": [], "positions": []}
    batches = iterate_batches(indices, batch_size, shuffle=False, seed=0, epoch=0, drop_last=False)
    for index in tqdm(list(batches), desc="encoding", disable=not progress, unit="batch"):
        f = encoder.forward_features(windows.batch(index).to(device))
        for key, value in (("latents", f.latents), ("valid", f.valid), ("mean", f.frame.mean),
                           ("scale", f.frame.scale), ("positions", f.positions)):
            parts[key].append(value.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _targets(windows: WindowSet, index: np.ndarray, device: torch.device) -> SimpleNamespace:
    """Only what a head's loss reads: the cached-feature loop must not assemble token tensors."""
    return SimpleNamespace(**{name: torch.from_numpy(getattr(windows, name)[index]).to(device)
                              for name in ("label", "target_class", "target_position")})


def _train_frozen(model: TaskModel, cache: dict[str, torch.Tensor], windows, train_idx, cfg: FinetuneConfig,
                  device, log) -> None:
    """The head of ``model`` on cached frozen features (``encode_windows`` of ``train_idx``)."""
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
            outputs = run_head(model.head, cache["latents"][rows].to(device), cache["valid"][rows].to(device),
                               cache["positions"][rows].to(device))
            loss = model.head.loss(outputs, _targets(windows, index, device), frame)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        _log_epoch(log, bar, epoch, losses)


def _train_end_to_end(encoder: SparEncoder, heads: dict[str, nn.Module], windows, train_idx,
                      cfg: FinetuneConfig, device, log) -> None:
    """Encoder + heads together: from scratch, AEMP's layer-wise unfreezing (cfg.layerwise), or
    full fine-tuning of a pretrained encoder with layer-wise learning-rate decay. Full fine-tuning
    runs one epoch of linear warm-up, then cosine decay (every group keeps its ``lr_scale``); from
    scratch and layer-wise keep the constant rate they were tuned with (at their short benchmark
    budgets a cosine schedule cost the from-scratch baseline 0.3 m on CSI)."""
    layers = None
    head_stack = nn.ModuleList(heads.values())
    if cfg.encoder is not None:
        decay = cfg.layer_decay if cfg.layer_decay is not None else (0.5 if cfg.layerwise else 0.75)
        groups = layerwise_param_groups(encoder, head_stack, cfg.lr, decay)
        if cfg.layerwise:
            # AEMP: the heads alone for the first fifth of the epochs, then the encoder too.
            layers = encoder_layers(encoder, head_stack)
    else:
        groups = [{"params": [*encoder.parameters(), *head_stack.parameters()], "lr": cfg.lr, "lr_scale": 1.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    epochs = epochs_for(cfg, len(train_idx))
    per_epoch = max(1, math.ceil(len(train_idx) / cfg.batch_size))
    total, warmup = epochs * per_epoch, per_epoch if epochs > 1 else max(1, per_epoch // 10)
    scheduled = cfg.encoder is not None and not cfg.layerwise
    step = 0
    tasks = "+".join(heads)
    bar = tqdm(range(epochs), desc=f"train {tasks} (encoder + head)", disable=not cfg.progress)
    for epoch in bar:
        if layers is not None:
            apply_unfreezing(layers, unfrozen_depth(epoch, len(layers), freeze_epochs=max(1, epochs // 5)))
        encoder.train()
        head_stack.train()
        losses = []
        for index in iterate_batches(train_idx, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                                     drop_last=False):
            if scheduled:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, warmup, cfg.lr) * group["lr_scale"]
            batch = windows.batch(index).to(device)
            features = encoder.forward_features(batch)
            loss = sum(head.loss(run_head(head, features.latents, features.valid, features.positions), batch,
                                 features.frame)
                       for head in heads.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
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
    identity = extra.get("node_identity")
    if identity:
        head = NodeIdentityHead(head, identity["tokens_per_node"], identity["max_nodes"], encoder.cfg.dim)
    model = TaskModel(encoder, head, extra["task"])
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt
