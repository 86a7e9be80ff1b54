"""Linear classification head (SPAR appendix E.2/E.4: "a simple linear classifier")."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from train.heads.blocks import Head, masked_mean
from train.heads.localizer import PooledRegressor


class ClassLogits:
    """Loss and prediction of every head that outputs class logits [B, C]."""

    def loss(self, outputs: torch.Tensor, batch, frame=None) -> torch.Tensor:
        """Cross entropy of logits [B, C] against batch.label [B] (class ids; 0 = background)."""
        return F.cross_entropy(outputs, batch.label.to(outputs.device))

    @torch.no_grad()
    def predict(self, outputs: torch.Tensor, frame=None) -> dict:
        """logits [B, C] -> {"label": [B] int64, "probs": [B, C] float32} (numpy)."""
        probs = torch.softmax(outputs.float(), dim=-1)
        return {"label": probs.argmax(dim=-1).cpu().numpy(), "probs": probs.cpu().numpy()}


class LinearClassifier(ClassLogits, Head):
    """Masked mean-pool of the latents, then one ``nn.Linear`` to class logits.

    No normalisation or hidden layer: the paper evaluates the frozen encoder with a linear probe,
    so anything more would credit the head with what the encoder should provide.
    """

    task = "classify"

    def __init__(self, d: int, n_classes: int):
        super().__init__()
        self.n_classes = n_classes
        self.linear = nn.Linear(d, n_classes)

    def forward(self, latents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """latents [B, L, d], valid [B, L] bool -> logits [B, C]."""
        return self.linear(masked_mean(latents, valid))


class TransformerClassifier(ClassLogits, PooledRegressor):
    """The paper's classification head: the localization head's one pre-norm transformer block over
    the latents, masked mean-pool, one ``nn.Linear`` to class logits (PooledRegressor's forward,
    ClassLogits' loss and predict).

    The linear probe pools every token of every node into one vector before it can weigh them, so
    it cannot compare nodes (which node is loud, which one hears the engine's harmonics): a floor
    that reads per-node band energies beats it. One attention block lets the head do that.
    """

    task = "classify"

    def __init__(self, d: int, n_classes: int, heads: int = 4, layers: int = 1, mlp_ratio: float = 4.0):
        super().__init__(d, n_classes, heads=heads, layers=layers, mlp_ratio=mlp_ratio)
        self.n_classes = n_classes
