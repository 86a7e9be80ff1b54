"""A small pre-norm transformer, written out so masking is explicit and the graph exports to ONNX.

Padding and missing-node tokens are excluded as attention *keys* with a boolean mask. The mask
fills scores with the dtype's most negative finite value rather than -inf: a row whose keys are
all invalid (every node of a window missing) then softmaxes to a uniform average instead of NaN,
and the attention output of such a row is then zeroed, so only the output bias remains.
"""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """Multi-head attention of queries over keys/values, with a key-validity mask."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model dimension {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, Lq, d], context [B, Lk, d], key_valid [B, Lk] bool (None: all valid) -> [B, Lq, d]."""
        b, lq, d = x.shape
        lk = context.shape[1]
        h = self.heads
        q = self.q(x).reshape(b, lq, h, d // h).transpose(1, 2)  # [B, h, Lq, dh]
        kv = self.kv(context).reshape(b, lk, 2, h, d // h).permute(2, 0, 3, 1, 4)  # [2, B, h, Lk, dh]
        k, v = kv[0], kv[1]
        mask = None
        if key_valid is not None:  # additive, finite: see the module docstring
            mask = torch.zeros(key_valid.shape, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(~key_valid, torch.finfo(q.dtype).min)[:, None, None, :]
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, h, Lq, dh]
        if key_valid is not None:
            out = out * key_valid.any(dim=-1).to(out.dtype)[:, None, None, None]
        return self.out(out.transpose(1, 2).reshape(b, lq, d))


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = max(1, int(dim * ratio))
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm self-attention block: x + Attn(LN x), then x + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, d], valid [B, L] bool -> [B, L, d]."""
        y = self.norm1(x)
        x = x + self.attn(y, y, valid)
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    """``depth`` blocks and a final LayerNorm (identity when depth is 0)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim) if depth else nn.Identity()

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, d], valid [B, L] bool -> [B, L, d]."""
        for block in self.blocks:
            x = block(x, valid)
        return self.norm(x)
