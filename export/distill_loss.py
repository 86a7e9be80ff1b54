"""What a distilled student learns from: the frozen teacher's targets and the loss against them.

Split from ``export.distill`` (which trains, measures and reports) because this is the one part a
loss-robust or a new head changes: the inputs a window gives without reading its labels
(``unlabelled_batch``), the parts of a forward pass the loss compares (``forward_parts``), the
teacher's targets, cached once per window set (``TeacherOutputs``), and the loss itself
(``distill_loss``; its terms are described in the docstring of ``export.distill``).

Shapes: B windows, L tokens (all modalities, node-major), d model width, C classes, Q detection
queries, P position dims.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from export.deploy_model import DeployModel
from train.batch import Batch
from train.data import WindowSet, iterate_batches
from train.heads import run_head

TEACHER_CACHE_BYTES = 2 << 30  # cache the teacher's latents + outputs in (CPU) memory up to this size


class LossSettings(Protocol):
    """The settings the loss reads (``export.distill.DistillConfig`` has them)."""

    batch_size: int
    feature_weight: float  # latent MSE (through the projection)
    output_weight: float  # sum over heads of the output losses
    temperature: float  # softening of class logits in the KL terms


def unlabelled_batch(windows: WindowSet, index: np.ndarray) -> Batch:
    """The model inputs of windows ``index``, built without touching labels or targets."""
    idx = np.asarray(index, dtype=np.int64)
    node_index = torch.arange(windows.n_nodes, dtype=torch.int64).expand(len(idx), -1).contiguous()
    empty = torch.zeros(())
    return Batch(tokens={k: torch.from_numpy(v[idx]) for k, v in windows.tokens.items()},
                 present={k: torch.from_numpy(v[idx]) for k, v in windows.present.items()},
                 positions=torch.from_numpy(windows.positions[idx]), node_index=node_index,
                 label=empty, target_class=empty, target_position=empty,
                 node_text=None if windows.node_text is None else torch.from_numpy(windows.node_text).expand(
                     len(idx), -1, -1))


def forward_parts(model: DeployModel, batch: Batch) -> dict[str, torch.Tensor]:
    """Latents [B, L, d], valid [B, L] and every head's raw outputs (normalised units), flat: ``latents``,
    ``valid``, ``out/<task>`` ([B, C] logits or [B, P] positions) or ``out/<task>/<key>`` (detection:
    ``logits`` [B, Q, C + 1], ``positions`` [B, Q, P])."""
    features = model.encoder.forward_features(batch)
    parts = {"latents": features.latents, "valid": features.valid}
    for task, head in model.heads.items():
        raw = run_head(head, features.latents, features.valid, features.positions)
        if isinstance(raw, dict):
            parts.update({f"out/{task}/{k}": v for k, v in raw.items()})
        else:
            parts[f"out/{task}"] = raw
    return parts


def merge_latents(latents: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher latents [B, L, d], valid [B, L] -> the mean of every k consecutive tokens [B, L / k, d]
    and their valid [B, L / k]: the targets of a student with ``token_merge`` k.

    Every modality's span holds N * m tokens node-major with m % k == 0, so no group of k
    consecutive tokens crosses a node or a modality: group j is exactly the student's token j.
    """
    if k == 1:
        return latents, valid
    b, length, d = latents.shape
    return latents.reshape(b, length // k, k, d).mean(2), valid.reshape(b, length // k, k).any(-1)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)) * T^2, averaged over the rows of [..., C] logits."""
    s = F.log_softmax(student_logits.float().reshape(-1, student_logits.shape[-1]) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, teacher_logits.shape[-1]) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2


def distill_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], projection: nn.Module,
                 tasks: list[str], cfg: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts (``feature``, ``<task>``) for one batch of ``forward_parts`` outputs."""
    # Tokens the student lost (message_loss) have no latents to compare.
    valid = (teacher["valid"] & student["valid"]).to(torch.float32)
    err = ((projection(student["latents"]) - teacher["latents"].float()) ** 2).mean(-1)
    parts = {"feature": (err * valid).sum() / valid.sum().clamp_min(1.0)}
    T = cfg.temperature
    for task in tasks:
        if task == "classify":
            parts[task] = soft_kl(student[f"out/{task}"], teacher[f"out/{task}"], T)
        elif task == "detect":
            parts[task] = (F.mse_loss(student["out/detect/positions"], teacher["out/detect/positions"].float())
                           + soft_kl(student["out/detect/logits"], teacher["out/detect/logits"], T))
        else:  # localize, quake: positions in normalised units
            parts[task] = F.mse_loss(student[f"out/{task}"], teacher[f"out/{task}"].float())
    total = cfg.feature_weight * parts["feature"] + cfg.output_weight * sum(parts[t] for t in tasks)
    return total, parts


class TeacherOutputs:
    """The teacher's ``forward_parts`` for a window set: cached once on the CPU when they fit in
    ``TEACHER_CACHE_BYTES``, else recomputed per batch."""

    def __init__(self, teacher: DeployModel, windows: WindowSet, indices: np.ndarray, batch_size: int,
                 device: torch.device, progress: bool = False, merge: int = 1):
        self.teacher, self.windows, self.device, self.merge = teacher, windows, device, merge
        self.cache: dict[str, torch.Tensor] | None = None
        self.rows = {int(w): i for i, w in enumerate(indices)}
        if self.estimate_bytes(len(indices)) <= TEACHER_CACHE_BYTES:
            chunks: dict[str, list[torch.Tensor]] = {}
            batches = list(iterate_batches(indices, batch_size, shuffle=False, seed=0, epoch=0, drop_last=False))
            with torch.no_grad():
                for index in tqdm(batches, desc="teacher outputs", unit="batch", disable=not progress):
                    for key, value in self._compute(index).items():
                        chunks.setdefault(key, []).append(value.cpu())
            self.cache = {k: torch.cat(v) for k, v in chunks.items()}

    def estimate_bytes(self, n_windows: int) -> int:
        cfg = self.teacher.encoder.cfg
        tokens = sum(self.windows.n_nodes * s.n_tokens for s in cfg.modalities)
        return n_windows * tokens * (cfg.dim * 4 + 1) // self.merge  # latents dominate; head outputs are small

    @torch.no_grad()
    def _compute(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        parts = forward_parts(self.teacher, unlabelled_batch(self.windows, index).to(self.device))
        parts["latents"], parts["valid"] = merge_latents(parts["latents"], parts["valid"], self.merge)
        return parts

    def get(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        if self.cache is None:
            return self._compute(index)
        rows = torch.tensor([self.rows[int(w)] for w in index])
        return {k: v[rows].to(self.device) for k, v in self.cache.items()}


@torch.no_grad()
def validation_loss(student: DeployModel, projection: nn.Module, targets: TeacherOutputs, indices: np.ndarray,
                    cfg: LossSettings, device: torch.device) -> float:
    """Window-weighted mean distillation loss over ``indices``."""
    student.eval()
    total, count = 0.0, 0
    for index in iterate_batches(indices, cfg.batch_size, shuffle=False, seed=0, epoch=0, drop_last=False):
        parts = forward_parts(student, unlabelled_batch(targets.windows, index).to(device))
        loss, _ = distill_loss(parts, targets.get(index), projection, list(student.heads), cfg)
        total += float(loss) * len(index)
        count += len(index)
    return total / max(1, count)
