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
masked out of the correlations and the attention. The node count comes from the input, not from
``layout`` (nodes join and move in the field), so the head exports to ONNX with dynamic batch and
node axes. For that the meta-learner reads the mean and max of a group's correlations instead of
the whole row (whose length would be the node count).

Shapes: B windows, L latent tokens of width d, G_a groups of scale a.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F

from train.heads.blocks import Head
from train.heads.classifier import ClassLogits
from train.models.config import SparConfig

SCALES = ("sensor", "channel", "segment")
CHANNEL_GROUPS = ("modality", "band")


def layout_of(cfg: SparConfig, n_nodes: int) -> list[list]:
    """The head's ``layout``: [[modality, n_nodes, rows, cols], ...] in cfg order (JSON-able)."""
    return [[s.name, int(n_nodes), *map(int, s.grid)] for s in cfg.modalities]


def segment_maps(layout: list[list]) -> list[torch.Tensor]:
    """Per modality, [S, cols] 0/1: which of its time columns fall into each of the S shared
    segments (S = the fewest columns of any modality)."""
    segments = min(int(cols) for _, _, _, cols in layout)
    maps = []
    for _, _, _, cols in layout:
        index = torch.arange(int(cols)) * segments // int(cols)
        maps.append(F.one_hot(index, segments).T.to(torch.float32))
    return maps


def masked_sum(x: torch.Tensor, valid: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the valid rows of x [..., d] over ``dims`` (valid has x's shape minus d), and the count."""
    # where(), not multiplication: an absent node's latents may be inf, and 0 * inf is NaN
    total = torch.where(valid[..., None], x, torch.zeros_like(x)).sum(dim=dims)
    return total, valid.to(x.dtype).sum(dim=dims)


def summarize_correlation(correlation: torch.Tensor, other_valid: torch.Tensor) -> torch.Tensor:
    """[B, G_a, G_b] correlations, [B, G_b] valid -> [B, G_a, 2] (mean, max over the valid G_b).

    The paper's meta-learner reads a group's whole correlation row; a row as long as the node
    count would fix N in the head, and the aggregator's node set changes when nodes join. Mean and
    max keep what the row says about agreement at any N."""
    keep = other_valid[:, None, :].to(correlation.dtype)
    mean = (correlation * keep).sum(-1) / keep.sum(-1).clamp_min(1.0)
    peak = correlation.masked_fill(~other_valid[:, None, :], -1.0).max(dim=-1).values
    return torch.stack([mean, peak], dim=-1)


class CorrelationAttention(nn.Module):
    """Eqs. 9-10 for one scale a against another b: correlation-guided attention pooling of F^a."""

    def __init__(self, hidden: int):
        super().__init__()
        # the meta-learner reads a summary of one group's correlations with the other scale's groups
        self.meta = nn.Sequential(nn.Linear(2, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor, valid: torch.Tensor, correlation: torch.Tensor,
                other_valid: torch.Tensor) -> torch.Tensor:
        """features [B, G_a, d], valid [B, G_a] bool, correlation [B, G_a, G_b], other_valid [B, G_b]
        -> A^a [B, d]."""
        logits = self.meta(summarize_correlation(correlation, other_valid)).squeeze(-1)  # [B, G_a]
        logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)  # finite: no NaN when all invalid
        weights = torch.softmax(logits, dim=-1) * valid.to(logits.dtype)
        return (weights[..., None] * features).sum(dim=1)


class MultiScaleFusionClassifier(ClassLogits, Head):
    """Sensor-, channel- and segment-wise pooled features of the frozen latents, fused pairwise by
    correlation-guided cross-attention (RobustHAR Sec. 3.3), then a linear classifier.

    layout: [[modality, n_nodes, rows, cols], ...] (``layout_of``); channel_group: modality | band;
    hidden: width of the correlation meta-learners.
    """

    task = "classify"

    def __init__(self, d: int, n_classes: int, layout: list[list], channel_group: str = "modality",
                 hidden: int = 32):
        super().__init__()
        if channel_group not in CHANNEL_GROUPS:
            raise ValueError(f"channel_group must be one of {', '.join(CHANNEL_GROUPS)}, got {channel_group!r}")
        self.n_classes = n_classes
        self.layout = [list(entry) for entry in layout]  # its node counts are ignored: N comes from the input
        self.channel_group = channel_group
        for k, segment_map in enumerate(segment_maps(self.layout)):
            self.register_buffer(f"segments_{k}", segment_map, persistent=False)  # rebuilt from layout
        self.project = nn.ModuleDict({scale: nn.Linear(d, d) for scale in SCALES})
        self.attend = nn.ModuleDict({f"{a}_{b}": CorrelationAttention(hidden)
                                     for a, b in itertools.permutations(SCALES, 2)})
        self.norm = nn.LayerNorm(3 * d)
        self.linear = nn.Linear(3 * d, n_classes)

    def split(self, latents: torch.Tensor, valid: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """latents [B, L, d], valid [B, L] -> per modality (x [B, N, rows, cols, d], valid [B, N, rows, cols]);
        N = L / (tokens per node of all modalities), whatever it is in this batch."""
        per_node = sum(int(rows) * int(cols) for _, _, rows, cols in self.layout)
        if not torch.onnx.is_in_onnx_export() and latents.shape[1] % per_node:
            raise ValueError(f"latents hold {latents.shape[1]} tokens, not a multiple of the {per_node} tokens per "
                             f"node of layout {self.layout}")
        b, d = latents.shape[0], latents.shape[-1]
        n = latents.shape[1] // per_node
        parts, start = [], 0
        for _, _, rows, cols in self.layout:
            stop = start + n * int(rows) * int(cols)
            parts.append((latents[:, start:stop].reshape(b, n, int(rows), int(cols), d),
                          valid[:, start:stop].reshape(b, n, int(rows), int(cols))))
            start = stop
        return parts

    def scale_features(self, latents: torch.Tensor, valid: torch.Tensor) -> dict[str, tuple[torch.Tensor,
                                                                                          torch.Tensor]]:
        """latents [B, L, d], valid [B, L] -> scale -> (F [B, G, d] projected, group valid [B, G]).

        sensor: G = N nodes (all their tokens); channel: G = modalities (or modality rows); segment:
        G = S shared time segments. Masked means: invalid tokens never count."""
        parts = self.split(latents, valid)
        sensor = [masked_sum(x, v, (2, 3)) for x, v in parts]  # [B, N, d], [B, N]
        sensor_sum, sensor_count = sum(s for s, _ in sensor), sum(c for _, c in sensor)
        channel_dims = (1, 3) if self.channel_group == "band" else (1, 2, 3)
        channel = [masked_sum(x, v, channel_dims) for x, v in parts]  # [B, rows, d] or [B, d]
        if self.channel_group == "modality":
            channel = [(s[:, None], c[:, None]) for s, c in channel]
        segment_sum = segment_count = 0
        for k, (x, v) in enumerate(parts):
            s, c = masked_sum(x, v, (1, 2))  # [B, cols, d], [B, cols]
            segment_map = getattr(self, f"segments_{k}")  # [S, cols]
            segment_sum = segment_sum + segment_map @ s
            segment_count = segment_count + c @ segment_map.T
        pooled = {"sensor": (sensor_sum, sensor_count),
                  "channel": (torch.cat([s for s, _ in channel], dim=1), torch.cat([c for _, c in channel], dim=1)),
                  "segment": (segment_sum, segment_count)}
        return {scale: (self.project[scale](total / count.clamp_min(1.0)[..., None]), count > 0)
                for scale, (total, count) in pooled.items()}

    def fuse(self, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
             name_a: str, name_b: str) -> torch.Tensor:
        """Eqs. 9-11 for scales a, b: (F [B, G, d], valid [B, G]) each -> F^ab [B, d]."""
        (fa, va), (fb, vb) = a, b
        pair = (va[:, :, None] & vb[:, None, :]).to(fa.dtype)
        correlation = F.normalize(fa, dim=-1) @ F.normalize(fb, dim=-1).transpose(1, 2) * pair  # [B, G_a, G_b]
        att_a = self.attend[f"{name_a}_{name_b}"](fa, va, correlation, vb)
        att_b = self.attend[f"{name_b}_{name_a}"](fb, vb, correlation.transpose(1, 2), va)
        return att_a * att_b

    def forward(self, latents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """latents [B, L, d], valid [B, L] bool -> logits [B, C]."""
        feats = self.scale_features(latents, valid)
        fused = [self.fuse(feats[a], feats[b], a, b) for a, b in itertools.combinations(SCALES, 2)]
        return self.linear(self.norm(torch.cat(fused, dim=-1)))
