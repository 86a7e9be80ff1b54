"""Building blocks shared by the task heads: masked pooling, masked attention, pre-norm blocks,
and the small protocol every head follows.

Shapes: B windows, L latent tokens of width d (the frozen encoder's post-fusion sequence), Q
decoder queries. ``valid`` [B, L] bool is False for padding and missing-node tokens; such tokens
must never influence a head's output, so every block zeroes them on entry and masks them as
attention keys.

Everything here traces to ONNX: masks are applied arithmetically (``masked_fill`` / ``where``)
rather than by Python branches on tensor values, and no nested or ragged tensors are used.
"""

from __future__ import annotations

import torch
from torch import nn

from train.models.transformer import MLP, Attention, Block


def masked_mean(latents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of the valid tokens of each row.

    Args:
        latents: [B, L, d]
        valid: [B, L] bool
    Returns:
        [B, d]; zeros for a row without any valid token (a finite, input-independent value, so a
        window where every node is missing still yields a prediction instead of NaN).
    """
    keep = valid.unsqueeze(-1)  # [B, L, 1]
    # where(), not multiplication: 0 * inf in an invalid slot would give NaN.
    total = torch.where(keep, latents, torch.zeros_like(latents)).sum(dim=1)  # [B, d]
    count = keep.to(latents.dtype).sum(dim=1).clamp_min(1.0)  # [B, 1]
    return total / count


def zero_invalid(latents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, L, d] latents with the invalid tokens ([B, L] valid False) replaced by zeros.

    Invalid tokens still pass through the residual stream as queries of self-attention; zeroing
    them first keeps arbitrary (even inf) values there from leaking into anything."""
    return torch.where(valid.unsqueeze(-1), latents, torch.zeros_like(latents))


# One attention implementation for encoder and heads (SDPA, finite key mask, zero output for a
# row without any valid key): see train.models.transformer.
MaskedMultiheadAttention = Attention
FeedForward = MLP
TransformerBlock = Block


class DecoderBlock(nn.Module):
    """Pre-norm DETR decoder block: query self-attention, cross-attention to the valid latents, MLP."""

    def __init__(self, d: int, heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = Attention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.cross_attn = Attention(d, heads)
        self.norm_memory = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)
        self.mlp = MLP(d, mlp_ratio)

    def forward(self, queries: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """
        Args:
            queries: [B, Q, d] decoder state
            query_pos: [B, Q, d] learnt query embedding, re-added at every attention as in DETR so
                the queries stay distinguishable when their states coincide (e.g. at layer 0)
            memory: [B, L, d] latents
            valid: [B, L] bool key mask on the latents
        Returns:
            [B, Q, d]
        """
        h = self.norm1(queries) + query_pos
        queries = queries + self.self_attn(h, h)
        h = self.norm2(queries) + query_pos
        queries = queries + self.cross_attn(h, self.norm_memory(memory), valid)
        return queries + self.mlp(self.norm3(queries))


class Head(nn.Module):
    """The protocol every task head follows (see train/heads/__init__.py for the registry).

    forward(latents [B, L, d], valid [B, L]) -> Tensor or dict of Tensors (raw outputs; positions
        in the per-sample normalised units of ``PositionFrame``)
    loss(outputs, batch, frame) -> scalar Tensor with a gradient path, even for a batch that has no
        usable target
    predict(outputs, frame) -> dict of numpy arrays (classes, probabilities, positions in metres)

    A head with ``reads_positions`` True also takes the encoder's normalised node positions
    [B, N, d_S] as a third argument (``run_head`` passes them).
    """

    task: str = ""
    reads_positions: bool = False

    def loss(self, outputs, batch, frame) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, outputs, frame=None) -> dict:
        raise NotImplementedError


def run_head(head: nn.Module, latents: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor):
    """``head``'s forward on the encoder's features: latents [B, L, d], valid [B, L], and, for a head
    that reads them, the normalised node positions [B, N, d_S]."""
    if getattr(head, "reads_positions", False):
        return head(latents, valid, positions)
    return head(latents, valid)


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE over the rows of ``target`` that are fully finite.

    Args:
        pred: [B, d]
        target: [B, d], a row with any NaN is "no target" and contributes nothing
    Returns:
        scalar: mean squared error over the kept rows and all d dims; 0 (still connected to
        ``pred`` so backward() works) when no row is kept.
    """
    keep = torch.isfinite(target).all(dim=-1, keepdim=True)  # [B, 1]
    # Clean the NaNs before subtracting: where() alone would still send NaN gradients to pred.
    safe = torch.where(keep, target, torch.zeros_like(target))
    sq = torch.where(keep, (pred - safe) ** 2, torch.zeros_like(pred))
    count = keep.to(pred.dtype).sum() * pred.shape[-1]
    return sq.sum() / count.clamp_min(1.0)


def first_target(batch, out_dims: int) -> torch.Tensor:
    """[B, out_dims] metres: the first target slot of each window (NaN where the slot is empty).

    Raises ValueError when the batch's target dimension differs from the head's output dimension,
    which would otherwise silently train on the wrong axes."""
    target = batch.target_position[:, 0]
    if target.shape[-1] != out_dims:
        raise ValueError(f"head predicts {out_dims}-D positions but batch.target_position is "
                         f"{target.shape[-1]}-D")
    return target


__all__ = ["DecoderBlock", "FeedForward", "Head", "MaskedMultiheadAttention", "TransformerBlock", "first_target",
           "masked_mean", "masked_mse", "run_head", "zero_invalid"]
