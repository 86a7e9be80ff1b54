"""Node-anchored detection head: one DETR query per node, placed at that node.

Why: the plain DETR head (``train.heads.detector``) must learn absolute positions from learnt
queries alone, and at the budgets a 2-core box allows it stays below a physics floor that simply
calls the loudest node of a neighbourhood a vehicle (``train.detect_floors.EnergyPeakFloor``). Here
the continuous node positions that SPAR already embeds do double duty: query n starts from an
embedding of node n's (normalised) position, cross-attends to every latent like a DETR query, and
predicts its vehicle as an *offset* from node n. A vehicle beside a node is then a short hop for
the query anchored there, and the head works unchanged on any layout and node count (the anchors
are the nodes the aggregator assembled, not a learnt table).

Loss, matching and ``predict`` are DETR's (Hungarian matching of the N queries to the targets).
Outputs: {"logits": [B, N, n_classes + 1], "positions": [B, N, out_dims]} in normalised units; the
deployed graph's detection outputs therefore have a ``nodes`` axis instead of a fixed query count.
"""

from __future__ import annotations

import torch
from torch import nn

from train.heads.blocks import zero_invalid
from train.heads.detector import DetrDetector


class NodeAnchorDetector(DetrDetector):
    """DETR decoder whose N queries are anchored at the N nodes (see the module docstring).

    forward(latents [B, L, d], valid [B, L] bool, positions [B, N, d_S] normalised) ->
    {"logits": [B, N, n_classes + 1], "positions": [B, N, out_dims]}.
    """

    reads_positions = True

    def __init__(self, d: int, n_classes: int, out_dims: int = 2, position_dims: int = 2, layers: int = 2,
                 heads: int = 4, mlp_ratio: float = 4.0, w_class: float = 1.0, w_pos: float = 5.0,
                 eos_coef: float = 0.1, pos_loss: str = "l1"):
        super().__init__(d, n_classes, n_queries=1, layers=layers, out_dims=out_dims, heads=heads,
                         mlp_ratio=mlp_ratio, w_class=w_class, w_pos=w_pos, eos_coef=eos_coef, pos_loss=pos_loss)
        del self.query_embed  # the anchors replace DETR's learnt query table
        self.n_queries = "nodes"  # the output axis the export names: one query per node
        self.position_dims = position_dims
        self.anchor_embed = nn.Sequential(nn.Linear(position_dims, d), nn.ReLU(), nn.Linear(d, d))
        # The offset starts at 0: every query first guesses "at my node", the floor's own answer.
        nn.init.zeros_(self.position_head[-1].weight)
        nn.init.zeros_(self.position_head[-1].bias)

    def forward(self, latents: torch.Tensor, valid: torch.Tensor,
                positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """See the class docstring; positions are the encoder's normalised node positions."""
        if positions.shape[-1] != self.position_dims:
            raise ValueError(f"anchor detector built for {self.position_dims}-D node positions, got "
                             f"{positions.shape[-1]}-D")
        memory = zero_invalid(latents, valid)
        query_pos = self.anchor_embed(positions)  # [B, N, d]
        x = torch.zeros_like(query_pos)
        for block in self.blocks:
            x = block(x, query_pos, memory, valid)
        x = self.norm(x)
        return {"logits": self.class_head(x), "positions": self.anchors(positions) + self.position_head(x)}

    def anchors(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, N, d_S] node positions -> [B, N, out_dims]: cut, or padded with 0 (e.g. depth under a
        2-D layout: the frame's mean depth)."""
        if self.out_dims <= self.position_dims:
            return positions[..., :self.out_dims]
        return nn.functional.pad(positions, (0, self.out_dims - self.position_dims))
