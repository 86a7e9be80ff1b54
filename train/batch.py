"""The batch every model, head and loop in train/ consumes.

Field names and shapes follow the deployed model's inputs (spar_wire.model_manifest), so the
exported graph takes exactly what the aggregator assembles. B windows, N nodes in site order,
per modality ``m``: ``n_tokens`` tokens of ``token_dim`` values; K target slots.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """One batch of windows.

    tokens:          modality -> [B, N, m, D] float32 token values in dB (zeros where absent)
    present:         modality -> [B, N] bool, False where the node sent nothing for the window
    positions:       [B, N, d_S] float32 node positions in metres (site frame), known for every node
    node_index:      [B, N] int64 row of each node in the structural-position table (site order)
    label:           [B] int64 window label (class id; 0 = background / none)
    target_class:    [B, K] int64 class of each target, -1 for an empty slot
    target_position: [B, K, d_T] float32 target positions in metres (NaN in empty slots)
    node_text:       [B, N, E] float32 placement-description embeddings (SPAR+LLM), or None
    """

    tokens: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    positions: torch.Tensor
    node_index: torch.Tensor
    label: torch.Tensor
    target_class: torch.Tensor
    target_position: torch.Tensor
    node_text: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.tokens)

    def to(self, device: torch.device | str) -> Batch:
        """A copy on ``device``."""
        return self.map(lambda t: t.to(device))

    def slice(self, start: int, stop: int) -> Batch:
        """Windows ``start:stop`` (how a global batch is split between DDP ranks)."""
        return self.map(lambda t: t[start:stop])

    def map(self, fn) -> Batch:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            else:
                out[f.name] = {k: fn(v) for k, v in value.items()} if isinstance(value, dict) else fn(value)
        return Batch(**out)
