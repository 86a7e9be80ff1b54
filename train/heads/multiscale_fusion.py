"""RobustHAR's adaptive multi-scale feature fusion (Sec. 3.3, Eqs. 8-11) as a classification head.

The paper fine-tunes with three scale-specific feature sets (Eq. 8): sensor-wise F^s, channel-wise
F^c and segment-wise F^se. On the frozen encoder's latents we build them by masked pooling along
the three axes of the paper's X in R^{T x C x N}:

* sensor-wise: one feature per node (all its tokens, every modality);
* channel-wise: one feature per channel group over all nodes and times: a modality
  (``channel_group="modality"``) or one frequency row of a modality (``"band"``);
* segment-wise: one feature per time segment over all nodes, modalities and rows. Segments are the
  columns of the modality with the fewest; a modality with more columns pools several into each.

Each set goes through its own linear map (standing in for the paper's scale-specific encoders).
Then, for every pair of scales (a, b), as in the cross-attention network the paper cites (Hou et
al. 2019):

    R^a = norm(F^a) norm(F^b)^T                  correlation layer, cosine (Eq. 9); R^b = (R^a)^T
    w^a = softmax_i(meta^a(R^a_i))               meta-learner: each a-group's correlations -> a weight
    A^a = sum_i w^a_i F^a_i                      correlation-guided attention over F^a (Eq. 10)
    F^ab = A^a ⊙ A^b                             fusion (Eq. 11, elementwise: a vector per window)

and the classifier reads LayerNorm([F^sc, F^s,se, F^c,se]). The paper spells out the s-c pair only;
fusing all three pairs treats the scales alike.

Invalid tokens (padding, absent nodes) never reach a pooled feature; a group with no valid token is
masked out of the correlations and the attention. Everything is fixed-size matrix algebra, so the
head exports to ONNX (only the batch dimension varies; L is fixed by ``layout``).

Shapes: B windows, L latent tokens of width d, G_a groups of scale a.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F

from train.heads.blocks import Head, zero_invalid
from train.models.config import SparConfig

SCALES = ("sensor", "channel", "segment")
CHANNEL_GROUPS = ("modality", "band")


def layout_of(cfg: SparConfig, n_nodes: int) -> list[list]:
    """The head's ``layout``: [[modality, n_nodes, rows, cols], ...] in cfg order (JSON-able)."""
    return [[s.name, int(n_nodes), *map(int, s.grid)] for s in cfg.modalities]


def group_assignments(layout: list[list], channel_group: str = "modality") -> dict[str, torch.Tensor]:
    """scale -> [G, L] 0/1 matrix: which latent token (modalities concatenated, each node-major,
    row-major grid per node) belongs to which group of that scale."""
    if channel_group not in CHANNEL_GROUPS:
        raise ValueError(f"channel_group must be one of {', '.join(CHANNEL_GROUPS)}, got {channel_group!r}")
    segments = min(int(cols) for _, _, _, cols in layout)
    node, channel, segment = [], [], []
    channel_offset = 0
    for _, n_nodes, rows, cols in layout:
        i, r, c = torch.meshgrid(torch.arange(n_nodes), torch.arange(rows), torch.arange(cols), indexing="ij")
        node.append(i.flatten())
        channel.append(channel_offset + (r.flatten() if channel_group == "band" else torch.zeros_like(r.flatten())))
        channel_offset += rows if channel_group == "band" else 1
        segment.append(c.flatten() * segments // cols)
    index = {"sensor": torch.cat(node), "channel": torch.cat(channel), "segment": torch.cat(segment)}
    return {scale: F.one_hot(idx).T.to(torch.float32) for scale, idx in index.items()}


def pool_groups(latents: torch.Tensor, valid: torch.Tensor, assignment: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """Masked mean per group: latents [B, L, d], valid [B, L] bool, assignment [G, L] ->
    features [B, G, d] (zeros for a group without a valid token) and group validity [B, G] bool."""
    weight = assignment[None] * valid[:, None, :].to(latents.dtype)  # [B, G, L]
    count = weight.sum(dim=-1)  # [B, G]
    features = weight @ zero_invalid(latents, valid) / count.clamp_min(1.0)[..., None]
    return features, count > 0


class CorrelationAttention(nn.Module):
    """Eqs. 9-10 for one scale a against another b: correlation-guided attention pooling of F^a."""

    def __init__(self, n_other: int, hidden: int):
        super().__init__()
        # the meta-learner reads one group's correlations with all G_b groups of the other scale
        self.meta = nn.Sequential(nn.Linear(n_other, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor, valid: torch.Tensor, correlation: torch.Tensor) -> torch.Tensor:
        """features [B, G_a, d], valid [B, G_a] bool, correlation [B, G_a, G_b] -> A^a [B, d]."""
        logits = self.meta(correlation).squeeze(-1)  # [B, G_a]
        logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)  # finite: no NaN when all invalid
        weights = torch.softmax(logits, dim=-1) * valid.to(logits.dtype)
        return (weights[..., None] * features).sum(dim=1)


class MultiScaleFusionClassifier(Head):
    """Sensor-, channel- and segment-wise pooled features of the frozen latents, fused pairwise by
    correlation-guided cross-attention (RobustHAR Sec. 3.3), then a linear classifier.

    layout: [[modality, n_nodes, rows, cols], ...] (``layout_of``); channel_group: modality | band;
    hidden: width of the correlation meta-learners.
    """

    task = "classify"

    def __init__(self, d: int, n_classes: int, layout: list[list], channel_group: str = "modality",
                 hidden: int = 32):
        super().__init__()
        self.n_classes = n_classes
        self.layout = [list(entry) for entry in layout]
        for scale, assignment in group_assignments(self.layout, channel_group).items():
            self.register_buffer(f"assign_{scale}", assignment, persistent=False)  # rebuilt from layout
        sizes = {scale: self.assignment(scale).shape[0] for scale in SCALES}
        self.project = nn.ModuleDict({scale: nn.Linear(d, d) for scale in SCALES})
        self.attend = nn.ModuleDict({f"{a}_{b}": CorrelationAttention(sizes[b], hidden)
                                     for a, b in itertools.permutations(SCALES, 2)})
        self.norm = nn.LayerNorm(3 * d)
        self.linear = nn.Linear(3 * d, n_classes)

    def assignment(self, scale: str) -> torch.Tensor:
        return getattr(self, f"assign_{scale}")

    def scale_features(self, latents: torch.Tensor, valid: torch.Tensor) -> dict[str, tuple[torch.Tensor,
                                                                                          torch.Tensor]]:
        """latents [B, L, d], valid [B, L] -> scale -> (F [B, G, d] projected, group valid [B, G])."""
        if not torch.onnx.is_in_onnx_export() and latents.shape[1] != self.assignment("sensor").shape[1]:
            raise ValueError(f"latents hold {latents.shape[1]} tokens, the layout {self.layout} "
                             f"{self.assignment('sensor').shape[1]}")
        out = {}
        for scale in SCALES:
            pooled, group_valid = pool_groups(latents, valid, self.assignment(scale))
            out[scale] = (self.project[scale](pooled), group_valid)
        return out

    def fuse(self, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
             name_a: str, name_b: str) -> torch.Tensor:
        """Eqs. 9-11 for scales a, b: (F [B, G, d], valid [B, G]) each -> F^ab [B, d]."""
        (fa, va), (fb, vb) = a, b
        pair = (va[:, :, None] & vb[:, None, :]).to(fa.dtype)
        correlation = F.normalize(fa, dim=-1) @ F.normalize(fb, dim=-1).transpose(1, 2) * pair  # [B, G_a, G_b]
        att_a = self.attend[f"{name_a}_{name_b}"](fa, va, correlation)
        att_b = self.attend[f"{name_b}_{name_a}"](fb, vb, correlation.transpose(1, 2))
        return att_a * att_b

    def forward(self, latents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """latents [B, L, d], valid [B, L] bool -> logits [B, C]."""
        feats = self.scale_features(latents, valid)
        fused = [self.fuse(feats[a], feats[b], a, b) for a, b in itertools.combinations(SCALES, 2)]
        return self.linear(self.norm(torch.cat(fused, dim=-1)))

    def loss(self, outputs: torch.Tensor, batch, frame=None) -> torch.Tensor:
        """Cross entropy of logits [B, C] against batch.label [B] (class ids; 0 = background)."""
        return F.cross_entropy(outputs, batch.label.to(outputs.device))

    @torch.no_grad()
    def predict(self, outputs: torch.Tensor, frame=None) -> dict:
        """logits [B, C] -> {"label": [B] int64, "probs": [B, C] float32} (numpy)."""
        probs = torch.softmax(outputs.float(), dim=-1)
        return {"label": probs.argmax(dim=-1).cpu().numpy(), "probs": probs.cpu().numpy()}
