"""Single-target position regression heads (SPAR appendix E.2: one transformer layer, MSE)."""

from __future__ import annotations

import torch
from torch import nn

from train.heads.blocks import Head, TransformerBlock, first_target, masked_mean, masked_mse, zero_invalid


class PooledRegressor(Head):
    """``layers`` pre-norm transformer blocks over the latents, masked mean-pool, Linear.

    Output [B, out_dims] in the per-sample normalised units of ``PositionFrame``; the regression
    target is ``frame.normalize`` of the first target slot. Windows whose first slot is empty (NaN)
    are left out of the loss, so background windows can share a batch with labelled ones.

    No LayerNorm between the blocks and the readout: the residual path then carries the latents
    straight to the pooled Linear, so the head contains the linear probe as a special case. A
    final norm discards each vector's magnitude and made a linear target ~10x harder to fit in
    the synthetic test; the frozen encoder's output is already normalised.
    """

    def __init__(self, d: int, out_dims: int, heads: int = 4, layers: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        self.out_dims = out_dims
        self.blocks = nn.ModuleList(TransformerBlock(d, heads, mlp_ratio) for _ in range(layers))
        self.linear = nn.Linear(d, out_dims)

    def forward(self, latents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """latents [B, L, d], valid [B, L] bool -> positions [B, out_dims] (normalised units)."""
        x = zero_invalid(latents, valid)
        for block in self.blocks:
            x = block(x, valid)
        return self.linear(masked_mean(x, valid))

    def loss(self, outputs: torch.Tensor, batch, frame) -> torch.Tensor:
        """MSE (mean over kept windows and dims) between outputs [B, out_dims] and the normalised
        first target slot; 0 with a gradient path when no window has a target."""
        target = frame.normalize(first_target(batch, self.out_dims).to(outputs.device))
        return masked_mse(outputs, target)

    @torch.no_grad()
    def predict(self, outputs: torch.Tensor, frame) -> dict:
        """outputs [B, out_dims] normalised -> {"position": [B, out_dims] metres} (numpy)."""
        return {"position": frame.denormalize(outputs.float()).cpu().numpy()}


class TransformerLocalizer(PooledRegressor):
    """Vehicle localization: one transformer block (the paper's setting), [B, out_dims] output."""

    task = "localize"

    def __init__(self, d: int, out_dims: int = 2, heads: int = 4, layers: int = 1, **kwargs):
        super().__init__(d, out_dims, heads=heads, layers=layers, **kwargs)
