"""DETR-style multi-target detection head (SPAR appendix E.2: two-layer transformer, DETR loss).

Class ids: the head classifies into the *window* classes, ``n_classes`` of them, and uses the
values of ``batch.target_class`` directly as indices. In the parking-lot data those are vehicle
classes 1..4 while 0 ("none") is the background label of a window and never occurs as a target,
so ``n_classes`` = 5 there and class 0 is simply never a matching target. Index ``n_classes`` is
the extra "no object" class of DETR.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from train.heads.blocks import DecoderBlock, Head, zero_invalid


class DetrDetector(Head):
    """Learnable queries decoded against the latents; one (class, position) guess per query.

    Loss (Carion et al., 2020): per window, a Hungarian matching between queries and targets on
    cost = -w_class * p(query says the target's class) + w_pos * L1(query position, target) in
    normalised units; then cross entropy over all queries (matched -> target class, unmatched ->
    "no object", down-weighted by ``eos_coef``) plus w_pos * L1 (or MSE) on matched positions,
    summed over coordinates and divided by the number of targets in the batch.
    """

    task = "detect"

    def __init__(self, d: int, n_classes: int, n_queries: int = 8, layers: int = 2, out_dims: int = 2,
                 heads: int = 4, mlp_ratio: float = 4.0, w_class: float = 1.0,
                 w_pos: float = 5.0, eos_coef: float = 0.1, pos_loss: str = "l1"):
        super().__init__()
        if pos_loss not in ("l1", "mse"):
            raise ValueError(f"pos_loss must be 'l1' or 'mse', got {pos_loss!r}")
        self.n_classes, self.n_queries, self.out_dims = n_classes, n_queries, out_dims
        self.w_class, self.w_pos, self.pos_loss = w_class, w_pos, pos_loss
        self.query_embed = nn.Parameter(torch.randn(n_queries, d) * 0.02)  # [Q, d]
        self.blocks = nn.ModuleList(DecoderBlock(d, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.class_head = nn.Linear(d, n_classes + 1)
        self.position_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(),
                                           nn.Linear(d, out_dims))
        weight = torch.ones(n_classes + 1)
        weight[-1] = eos_coef  # most queries are "no object"; full weight would drown the objects
        self.register_buffer("class_weight", weight, persistent=False)

    def forward(self, latents: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """latents [B, L, d], valid [B, L] bool ->
        {"logits": [B, Q, n_classes + 1] (last = no object), "positions": [B, Q, out_dims] normalised}."""
        memory = zero_invalid(latents, valid)
        query_pos = self.query_embed.unsqueeze(0).expand(latents.shape[0], -1, -1)  # [B, Q, d]
        x = torch.zeros_like(query_pos)  # DETR starts the decoder state at 0; queries enter via query_pos
        for block in self.blocks:
            x = block(x, query_pos, memory, valid)
        x = self.norm(x)
        return {"logits": self.class_head(x), "positions": self.position_head(x)}

    def _targets(self, batch, frame, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(classes [B, K] int64, normalised positions [B, K, d] with empty slots zeroed, occupied [B, K])."""
        classes = batch.target_class.to(device)
        positions = batch.target_position.to(device)
        if positions.shape[-1] != self.out_dims:
            raise ValueError(f"detector predicts {self.out_dims}-D positions but batch.target_position is "
                             f"{positions.shape[-1]}-D")
        occupied = classes >= 0
        if bool((classes >= self.n_classes).any()):
            raise ValueError(f"target_class holds ids up to {int(classes.max())} but the detector has "
                             f"n_classes={self.n_classes} (ids are used directly as indices)")
        if bool((occupied & ~torch.isfinite(positions).all(dim=-1)).any()):
            raise ValueError("an occupied target slot (target_class >= 0) has a non-finite position")
        normed = frame.normalize(positions)
        normed = torch.where(occupied.unsqueeze(-1), normed, torch.zeros_like(normed))
        return classes, normed, occupied

    @torch.no_grad()
    def match(self, outputs: dict[str, torch.Tensor], batch, frame) -> list[tuple[np.ndarray, np.ndarray]]:
        """Hungarian matching of each window's queries to its occupied target slots.

        Returns one (query_index [M], slot_index [M]) pair of int64 arrays per window, M = min(Q,
        number of targets); slot indices refer to batch.target_class's K axis.
        """
        logits, positions = outputs["logits"], outputs["positions"]
        classes, targets, occupied = self._targets(batch, frame, logits.device)
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()  # [B, Q, C+1]
        pred = positions.float().cpu().numpy()  # [B, Q, d]
        classes_np, targets_np = classes.cpu().numpy(), targets.float().cpu().numpy()
        occupied_np = occupied.cpu().numpy()
        matches = []
        for b in range(probs.shape[0]):
            slots = np.flatnonzero(occupied_np[b])
            if slots.size == 0:
                matches.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
                continue
            cost_class = -probs[b][:, classes_np[b, slots]]  # [Q, T]
            cost_pos = np.abs(pred[b][:, None, :] - targets_np[b, slots][None, :, :]).sum(-1)  # [Q, T]
            q_idx, t_idx = linear_sum_assignment(self.w_class * cost_class + self.w_pos * cost_pos)
            matches.append((q_idx.astype(np.int64), slots[t_idx].astype(np.int64)))
        return matches

    def loss(self, outputs: dict[str, torch.Tensor], batch, frame) -> torch.Tensor:
        """Scalar DETR set loss for outputs of ``forward`` (see the class docstring)."""
        logits, positions = outputs["logits"], outputs["positions"]
        b, q, _ = logits.shape
        classes, targets, _ = self._targets(batch, frame, logits.device)
        matches = self.match(outputs, batch, frame)
        batch_idx = torch.as_tensor(np.concatenate([np.full(len(qi), i, np.int64) for i, (qi, _) in
                                                    enumerate(matches)]), device=logits.device)
        query_idx = torch.as_tensor(np.concatenate([qi for qi, _ in matches]), device=logits.device)
        slot_idx = torch.as_tensor(np.concatenate([si for _, si in matches]), device=logits.device)

        target_cls = torch.full((b, q), self.n_classes, dtype=torch.int64, device=logits.device)
        target_cls[batch_idx, query_idx] = classes[batch_idx, slot_idx]
        loss_class = F.cross_entropy(logits.reshape(b * q, -1).float(), target_cls.reshape(-1),
                                     weight=self.class_weight.float())

        diff = positions[batch_idx, query_idx].float() - targets[batch_idx, slot_idx].float()  # [M, d]
        per_coord = diff.abs() if self.pos_loss == "l1" else diff ** 2
        # An empty index still keeps positions in the graph, so backward() works without targets.
        loss_pos = per_coord.sum() / max(int(batch_idx.numel()), 1)
        return self.w_class * loss_class + self.w_pos * loss_pos

    @torch.no_grad()
    def predict(self, outputs: dict[str, torch.Tensor], frame) -> dict:
        """-> numpy {"scores": [B, Q] probability of the best real class, "classes": [B, Q] int64
        that class, "positions": [B, Q, out_dims] metres}. Every query is reported; mAP ranks them
        by score, so the "no object" mass only lowers a query's score."""
        probs = torch.softmax(outputs["logits"].float(), dim=-1)[..., :-1]
        scores, classes = probs.max(dim=-1)
        positions = frame.denormalize(outputs["positions"].float())
        return {"scores": scores.cpu().numpy(), "classes": classes.cpu().numpy(),
                "positions": positions.cpu().numpy()}
