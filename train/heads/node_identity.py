"""Node identity for heads on a placement-agnostic encoder: the fair MAE baseline.

A plain MAE encoder gets neither positions nor node identities, so nothing in its latents says
which node heard what. AudioMAE / CAV-MAE style evaluation gives the *head* that knowledge
instead: here a learnable vector per node slot is added to every latent token of that node before
the task head runs. The encoder stays placement-agnostic; only the head learns the site.

Token layout (``train.models.spar.Features``): modalities in config order, each a block of
N x m_k tokens in node-major order, so token j of modality k belongs to node j // m_k. The node
count is read from the sequence length, so the head keeps working (and exports) for any N.
"""

from __future__ import annotations

import torch
from torch import nn


class NodeIdentityHead(nn.Module):
    """``inner`` head with a learnable node embedding added to the latents.

    forward(latents [B, L, d], valid [B, L]) -> whatever ``inner`` returns, with
    L = N * sum_k m_k; ``loss`` and ``predict`` are ``inner``'s.
    """

    def __init__(self, inner: nn.Module, tokens_per_node: list[int], max_nodes: int, d: int):
        super().__init__()
        self.inner = inner
        self.task = inner.task
        self.tokens_per_node = [int(m) for m in tokens_per_node]
        self.node_embedding = nn.Embedding(max_nodes, d)
        nn.init.normal_(self.node_embedding.weight, std=0.02)

    def node_ids(self, length: int, device: torch.device) -> torch.Tensor:
        """[L] int64 node slot of every latent token (clamped into the table)."""
        n = length // sum(self.tokens_per_node)
        ids = [torch.arange(n * m, device=device) // m for m in self.tokens_per_node]
        return torch.cat(ids).clamp_max(self.node_embedding.num_embeddings - 1)

    def forward(self, latents: torch.Tensor, valid: torch.Tensor, *positions: torch.Tensor):
        """``positions``: the node positions, for an ``inner`` head that reads them (``run_head``)."""
        ids = self.node_ids(latents.shape[1], latents.device)
        return self.inner(latents + self.node_embedding(ids)[None], valid, *positions)

    def loss(self, outputs, batch, frame=None) -> torch.Tensor:
        return self.inner.loss(outputs, batch, frame)

    @torch.no_grad()
    def predict(self, outputs, frame=None) -> dict:
        return self.inner.predict(outputs, frame)

    def __getattr__(self, name: str):
        # Heads are read for attributes such as n_queries or n_classes by export and distillation.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)
