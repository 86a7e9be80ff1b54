"""Self-supervised pretraining loop (SPAR, MAE and the ablations), single process or DDP.

Reproducibility contract: weights are initialised from ``seed``; the window order of epoch ``e``
is a function of (seed, e); the masking and augmentation noise of step ``s`` is drawn for the
whole global batch from (seed, s) and each rank takes its slice. Hence P processes with batch b
train exactly like one process with batch P x b (up to floating-point summation order).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from spar_wire.placement_text import text_model_id
from train.checkpoint import load_checkpoint, save_checkpoint
from train.data import WindowSet, iterate_batches, load_windows, temporal_split, token_statistics
from train.distributed import DistContext, all_reduce_mean, barrier, distributed_context, wrap_model
from train.errors import TrainError
from train.models.config import ModalitySpec, SparConfig, objective_config
from train.models.spar import SparEncoder
from train.objectives import build_pretrainer
from train.run_config import PretrainConfig, as_dict

CHECKPOINT = "checkpoint.pt"


@dataclass
class PretrainResult:
    checkpoint: Path
    epochs: int
    steps: int
    train_loss: float
    val_loss: float
    seconds: float
    windows_per_s: float


def base_model_config(windows: WindowSet, overrides: dict[str, Any]) -> SparConfig:
    """A SparConfig sized for the dataset's modalities, nodes and position dimensions."""
    modalities = tuple(ModalitySpec(name, *windows.token_shapes[name],
                                    patch_grid=windows.feature_configs[name].patch_grid)
                       for name in windows.modalities)
    try:
        return SparConfig(modalities=modalities, max_nodes=windows.n_nodes,
                          position_dims=windows.position_dims, **overrides)
    except TypeError as exc:
        raise TrainError(f"bad model setting: {exc}") from None
    except ValueError as exc:
        raise TrainError(str(exc)) from None


def objective_defaults(objective: str, windows: WindowSet) -> dict[str, Any]:
    """Objective params that come from the dataset: the supervised objective's head needs the
    class count and target dimensions (and learns positions when the windows have no classes)."""
    if objective != "supervised":
        return {}
    has_targets = windows.max_targets > 0 and bool(np.isfinite(windows.target_position[:, 0]).all(axis=-1).any())
    task = "classify" if len(windows.class_names) > 1 or not has_targets else "localize"
    return {"task": task, "n_classes": max(2, len(windows.class_names)), "out_dims": windows.target_dims}


def data_info(windows: WindowSet, path: str, stats: dict[str, tuple[float, float]], **counts: int) -> dict:
    """What a checkpoint records about its training data (checked again at fine-tuning/export)."""
    return {"dataset": str(path), "feature_hashes": dict(windows.feature_hashes),
            "class_names": list(windows.class_names), "site": windows.site,
            "token_stats": {k: [float(v[0]), float(v[1])] for k, v in stats.items()},
            **({"text_model": text_model_id()} if windows.node_text is not None else {}), **counts}


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak`` then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def run_pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Pretrain; writes ``checkpoint.pt`` (every epoch), ``config.json`` and ``log.jsonl`` under cfg.out."""
    with distributed_context(cfg.device) as ctx:
        return _pretrain(cfg, ctx)


def _pretrain(cfg: PretrainConfig, ctx: DistContext) -> PretrainResult:
    out = Path(cfg.out)
    windows = load_windows(cfg.data, limit=cfg.max_windows, progress=cfg.progress and ctx.is_main)
    train_idx, val_idx = temporal_split(len(windows), cfg.val_fraction)
    global_batch = cfg.batch_size * ctx.world_size
    if len(train_idx) < global_batch:
        raise TrainError(f"{len(train_idx)} training windows are fewer than one global batch ({global_batch})")
    stats = token_statistics(windows.subset(train_idx))
    torch.manual_seed(cfg.seed)
    try:
        model_cfg = objective_config(base_model_config(windows, cfg.model), cfg.objective)
        model_cfg = replace(model_cfg, objective_params={**objective_defaults(cfg.objective, windows),
                                                         **model_cfg.objective_params})
        model = build_pretrainer(model_cfg)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    model.encoder.set_token_statistics(stats)
    model.to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, step = _resume(out, model, optimizer, cfg, ctx)
    trained = wrap_model(model, ctx)
    steps_per_epoch = len(train_idx) // global_batch
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    info = data_info(windows, cfg.data, stats, train_windows=len(train_idx), val_windows=len(val_idx))
    started, seen = time.monotonic(), 0
    train_loss = val_loss = float("nan")
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        batches = iterate_batches(train_idx, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                                  drop_last=True, rank=ctx.rank, world_size=ctx.world_size)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"pretrain {cfg.objective} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and ctx.is_main), unit="step")
        losses = []
        for index in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, cfg.lr)
            model.start_step(step, total_steps)
            noise = model.draw_noise(global_batch, windows.n_nodes, step_generator(cfg.seed, step))
            noise = noise.slice(ctx.rank * cfg.batch_size, (ctx.rank + 1) * cfg.batch_size).to(ctx.device)
            result = trained(windows.batch(index).to(ctx.device), noise)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            optimizer.step()
            losses.append(float(result.loss.detach()))
            step += 1
            seen += len(index) * ctx.world_size
            bar.set_postfix(loss=f"{losses[-1]:.4f}", windows_s=f"{seen / (time.monotonic() - started):.0f}")
        train_loss = all_reduce_mean(sum(losses) / max(1, len(losses)), ctx)
        val_loss = pretrain_loss(model, windows, val_idx, cfg.batch_size, cfg.seed, ctx.device)
        if ctx.is_main:
            record = {"epoch": epoch + 1, "step": step, "train_loss": train_loss, "val_loss": val_loss,
                      "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.monotonic() - started, 2)}
            with open(out / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            save_checkpoint(out / CHECKPOINT, kind="pretrain", model_config=model_cfg.to_dict(), model=model,
                            run_config=as_dict(cfg), data_info=info, step=step, epoch=epoch + 1,
                            optimizer=optimizer, metrics={"train_loss": train_loss, "val_loss": val_loss})
        barrier(ctx)
    elapsed = time.monotonic() - started
    return PretrainResult(out / CHECKPOINT, cfg.epochs, step, train_loss, val_loss, elapsed, seen / max(elapsed, 1e-9))


@torch.no_grad()
def pretrain_loss(model, windows: WindowSet, indices, batch_size: int, seed: int,
                  device: torch.device) -> float:
    """Mean pretraining loss over ``indices`` with fixed noise (comparable across epochs)."""
    if len(indices) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for n, index in enumerate(iterate_batches(indices, batch_size, shuffle=False, seed=seed, epoch=0,
                                               drop_last=False)):
        noise = model.draw_noise(len(index), windows.n_nodes, step_generator(seed + 7919, n)).to(device)
        total += float(model(windows.batch(index).to(device), noise).loss) * len(index)
        count += len(index)
    model.train(was_training)
    return total / count


def _resume(out: Path, model, optimizer, cfg: PretrainConfig, ctx: DistContext) -> tuple[int, int]:
    """Continue from ``out/checkpoint.pt`` when it exists (epoch granularity); else start fresh."""
    path = out / CHECKPOINT
    if not path.exists():
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "log.jsonl").unlink(missing_ok=True)
        barrier(ctx)
        return 0, 0
    ckpt = load_checkpoint(path, kind="pretrain")
    if ckpt["model_config"] != model.cfg.to_dict():
        raise TrainError(f"{path} was trained with another model config; use a new --out directory "
                         "or the same settings to resume")
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ctx.is_main:
        print(f"resuming {path} at epoch {ckpt['epoch']} (step {ckpt['step']})")
    return int(ckpt["epoch"]), int(ckpt["step"])


def load_encoder(path: str | Path) -> tuple[SparEncoder, dict[str, Any]]:
    """The pretrained encoder of a pretrain (or fine-tune) checkpoint, and the checkpoint dict."""
    ckpt = load_checkpoint(path, kind=("pretrain", "finetune"))
    cfg_dict = ckpt["model_config"] if ckpt["kind"] == "pretrain" else ckpt["extra"]["encoder_config"]
    encoder = SparEncoder(SparConfig.from_dict(cfg_dict))
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    encoder.load_state_dict(state)
    return encoder, ckpt
