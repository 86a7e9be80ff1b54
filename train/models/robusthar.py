"""RobustHAR (Liu et al.): multi-scale spatial-temporal masked pretraining with semantic-consistent
multi-scale feature co-learning, on the shared SPAR encoder.

Each window is masked at several scales (segment-, channel- and sensor-wise, see
``train.models.multiscale_masking`` for how they map onto our tokens), every view is encoded by
the same ``SparEncoder`` (Eq. 3) and decoded by one shared per-modality ``Decoder`` (Eq. 4). The
loss is Eq. 7:

    L = λ L_rec + (1 − λ) L_con
    L_rec = Σ_scales L1 of the masked, present tokens (standardised values, as SPAR's target; Eq. 5)
    L_con = Σ_{pairs of scales a < b} mean_B (1 − cos(X_a, X_b))                               (Eq. 6)

Departures from the paper, and why:

* The paper's "location-inspired 3D-variation" (Eq. 1) is SPAR's spatial + structural embedding
  (``OBJECTIVES["robusthar"]`` keeps both); SPAR's spatial decoder and rigid-motion augmentation
  are not used (``cfg.spatial_reconstruction`` / ``cfg.geometric_augmentation`` are ignored here).
* Eq. 6 writes sim(·, ·) as the loss; a similarity must be maximised, so we minimise 1 − cos.
* Eq. 6 compares X_a, the views' inputs with their masked parts replaced by the reconstruction
  (``consistency_space="completed"``, the default), while the text speaks of consistent
  *features*. ``"latent"`` compares the views' pooled encoder features instead (masked mean over
  each view's visible tokens, optionally through a projection of ``consistency_dim``). Without
  negatives nothing stops the encoder from satisfying that on its own: on a tiny model the latent
  term fell from 0.5 to 0.02 in 8 steps while reconstruction barely moved (a shared component of
  all latents, e.g. the final LayerNorm's bias, makes every pooled mean point the same way). The
  completed inputs are anchored in data space and cannot collapse, hence the default.
* The paper pretrains one encoder per scale (Encoder^s, Encoder^se, Encoder^c of Eq. 8); here the
  scales share the one encoder that ships, and the fine-tuning head
  (``train.heads.multiscale_fusion``) builds the scale-wise features by pooling its latents.

Shapes: B windows, N nodes, V views (one per scale), per modality L = N * m tokens of D values,
d model width, K visible tokens of a view.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F

from train.batch import Batch
from train.heads.blocks import masked_mean
from train.models.config import SparConfig
from train.models.masking import MaskResult, gather_tokens
from train.models.multiscale_masking import (
    CHANNEL_GROUPS,
    SCALES,
    MultiScaleNoise,
    channel_masks,
    draw_multiscale_noise,
    groups_per_node,
    segment_masks,
    sensor_masks,
    stack_views,
)
from train.models.spar import Decoder, Embedded, SparEncoder, masked_mean_per_sample

CONSISTENCY_SPACES = ("latent", "completed")


@dataclass(frozen=True)
class RobustHarParams:
    """RobustHAR's own hyperparameters (``SparConfig.objective_params``)."""

    balance: float = 0.5  # λ of Eq. 7 (the paper's best: 0.5, 0.7 on CZU-MHAD)
    scales: tuple[str, ...] = SCALES  # the views each window gets, among segment | channel | sensor
    # Share hidden at each scale: columns per node, channel groups per node, nodes per window.
    # 0.5 is the paper's best on RealWorld (body-worn IMUs like ours), 0.3 on the other two sets.
    segment_ratio: float = 0.5
    channel_ratio: float = 0.5
    sensor_ratio: float = 0.5
    channel_group: str = "modality"  # modality: one sensor of a node | band: one frequency row of it
    consistency_space: str = "completed"  # completed: Eq. 6 literally | latent: pooled encoder features
    consistency_dim: int = 0  # latent only: >0 adds a 2-layer projection of this width

    @classmethod
    def from_dict(cls, data: dict) -> RobustHarParams:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown robusthar objective params: {', '.join(unknown)}")
        data = dict(data)
        if "scales" in data:
            data["scales"] = (data["scales"],) if isinstance(data["scales"], str) else tuple(data["scales"])
        params = cls(**data)
        params.validate()
        return params

    def validate(self) -> None:
        if not 0.0 <= self.balance <= 1.0:
            raise ValueError(f"robusthar balance (λ) must be in [0, 1], got {self.balance}")
        if not self.scales or len(set(self.scales)) != len(self.scales) or not set(self.scales) <= set(SCALES):
            raise ValueError(f"robusthar scales must be distinct names among {', '.join(SCALES)}, got {self.scales}")
        for scale in SCALES:
            if not 0.0 <= self.ratio(scale) < 1.0:
                raise ValueError(f"robusthar {scale}_ratio must be in [0, 1), got {self.ratio(scale)}")
        if self.channel_group not in CHANNEL_GROUPS:
            raise ValueError(f"robusthar channel_group must be one of {', '.join(CHANNEL_GROUPS)}")
        if self.consistency_space not in CONSISTENCY_SPACES:
            raise ValueError(f"robusthar consistency_space must be one of {', '.join(CONSISTENCY_SPACES)}")
        if self.consistency_dim < 0:
            raise ValueError(f"robusthar consistency_dim must be >= 0, got {self.consistency_dim}")

    def ratio(self, scale: str) -> float:
        return getattr(self, f"{scale}_ratio")


@dataclass
class RobustHarOutput:
    """loss: scalar λ L_rec + (1 − λ) L_con; rec: scale -> L1 term (with grad); con: L_con;
    masks: scale -> modality -> MaskResult of the B windows."""

    loss: torch.Tensor
    rec: dict[str, torch.Tensor]
    con: torch.Tensor
    masks: dict[str, dict[str, MaskResult]]

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        """The loss terms, detached (the objective protocol's common view, see train.objectives)."""
        scales = {f"rec_{k}": v.detach() for k, v in self.rec.items()}
        return {"rec": sum(self.rec.values()).detach(), "con": self.con.detach(), **scales}


class RobustHarPretrainer(nn.Module):
    """SparEncoder + one masked-token decoder per modality (shared by all scales) + the optional
    consistency projection; loss of Eq. 7."""

    def __init__(self, cfg: SparConfig):
        super().__init__()
        self.cfg = cfg
        self.params = RobustHarParams.from_dict(cfg.objective_params)
        self.encoder = SparEncoder(cfg)
        names = self.encoder.modality_names
        self.mask_token = nn.ParameterDict({k: nn.Parameter(torch.zeros(cfg.dim)) for k in names})
        self.decoders = nn.ModuleDict({s.name: Decoder(cfg, s.token_dim) for s in cfg.modalities})
        p = self.params.consistency_dim
        self.projection = (nn.Sequential(nn.Linear(cfg.dim, p), nn.GELU(), nn.Linear(p, p))
                           if p and self.params.consistency_space == "latent" else nn.Identity())

    @property
    def grids(self) -> dict[str, tuple[int, int]]:
        return {s.name: s.grid for s in self.cfg.modalities}

    def start_step(self, step: int, total_steps: int) -> None:
        """RobustHAR has no schedule (the objective protocol's hook, see train.objectives)."""

    def draw_noise(self, batch_size: int, n_nodes: int, generator: torch.Generator | None = None) -> MultiScaleNoise:
        """Random numbers for one step of ``batch_size`` windows (draw for the global batch)."""
        groups = {k: groups_per_node(g, self.params.channel_group) for k, g in self.grids.items()}
        return draw_multiscale_noise(batch_size, n_nodes, groups, generator)

    def prepare_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, N, d_S] metres -> normalised [B, N, d_S] (no augmentation: not part of RobustHAR)."""
        return self.encoder.prepare_positions(positions)[0]

    def mask(self, embedded: dict[str, Embedded], noise: MultiScaleNoise) -> dict[str, dict[str, MaskResult]]:
        """scale -> modality -> MaskResult over [B, L], one view per configured scale."""
        valid = {name: e.valid for name, e in embedded.items()}
        p = self.params
        build = {"segment": lambda: segment_masks(valid, self.grids, p.segment_ratio, noise.segment),
                 "channel": lambda: channel_masks(valid, self.grids, p.channel_ratio, p.channel_group, noise.channel),
                 "sensor": lambda: sensor_masks(valid, self.grids, p.sensor_ratio, noise.sensor)}
        return {scale: build[scale]() for scale in p.scales}

    def forward_encoder(self, embedded: dict[str, Embedded], stacked: dict[str, MaskResult]):
        """Visible tokens of all V views in one pass -> latents [V*B, sum K, d], valid, spans."""
        views = len(self.params.scales)
        inputs = {name: (gather_tokens(e.combined.repeat(views, 1, 1), stacked[name].keep_index),
                         stacked[name].keep_valid) for name, e in embedded.items()}
        return self.encoder.encode(inputs)

    def forward_decoders(self, latents, valid, spans, embedded: dict[str, Embedded],
                         stacked: dict[str, MaskResult]) -> dict[str, torch.Tensor]:
        """modality -> reconstructions [V*B, L, D] (meaningful where masked).

        A query carries what the encoder did not see of a masked token but the decoder may use:
        its spatial + structural embedding and its patch position (as SPAR's signal queries)."""
        views = len(self.params.scales)
        out = {}
        for name, e in embedded.items():
            start, stop = spans[name]
            table = self.encoder.embeddings[name].patch_position  # [m, d]
            patch = table.repeat(e.valid.shape[1] // table.shape[0], 1)  # [L, d], node-major
            query = (self.mask_token[name] + e.spatial + e.structural + patch).repeat(views, 1, 1)
            out[name] = self.decoders[name](latents[:, start:stop], valid[:, start:stop], query, stacked[name].masked)
        return out

    def forward_loss(self, batch: Batch, latents, valid, predictions: dict[str, torch.Tensor],
                     masks: dict[str, dict[str, MaskResult]]) -> RobustHarOutput:
        """Eq. 7 from the per-scale L1 terms (Eq. 5) and the cross-scale consistency (Eq. 6)."""
        views = len(self.params.scales)
        targets = self.targets(batch)
        split = {name: pred.chunk(views) for name, pred in predictions.items()}  # V x [B, L, D]
        rec = {scale: sum(l1_reconstruction(split[name][v], targets[name], masks[scale][name].masked)
                          for name in targets)
               for v, scale in enumerate(self.params.scales)}
        if self.params.consistency_space == "latent":
            features = self.projection(masked_mean(latents, valid)).unflatten(0, (views, -1))  # [V, B, p]
        else:
            features = torch.stack([completed_views(targets, {k: s[v] for k, s in split.items()},
                                                    {k: masks[scale][k].masked for k in targets})
                                    for v, scale in enumerate(self.params.scales)])  # [V, B, sum L*D]
        con = consistency_loss(features)
        lam = self.params.balance
        return RobustHarOutput(lam * sum(rec.values()) + (1.0 - lam) * con, rec, con, masks)

    def targets(self, batch: Batch) -> dict[str, torch.Tensor]:
        """modality -> standardised tokens [B, L, D] (zero where the node is absent)."""
        out = {}
        for name in self.encoder.modality_names:
            b, n, m, d = batch.tokens[name].shape
            tokens = self.encoder.embeddings[name].normalize_tokens(batch.tokens[name], batch.present[name])
            out[name] = tokens.reshape(b, n * m, d)
        return out

    def forward(self, batch: Batch, noise: MultiScaleNoise | None = None) -> RobustHarOutput:
        """One pretraining step's forward pass; ``noise`` defaults to fresh draws."""
        if noise is None:
            noise = self.draw_noise(len(batch), batch.positions.shape[1]).to(batch.positions.device)
        embedded = self.encoder.embed(batch, self.prepare_positions(batch.positions))
        masks = self.mask(embedded, noise)
        stacked = stack_views(list(masks.values()))
        latents, valid, spans = self.forward_encoder(embedded, stacked)
        predictions = self.forward_decoders(latents, valid, spans, embedded, stacked)
        return self.forward_loss(batch, latents, valid, predictions, masks)


def l1_reconstruction(prediction: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Eq. 5 for one modality and scale: prediction, target [B, L, D], masked [B, L] bool -> mean
    over samples of each sample's mean |error| over its masked tokens and D values (a sample with
    nothing masked counts 0; a per-sample mean keeps DDP slices averaging to the whole batch)."""
    return masked_mean_per_sample((prediction - target).abs().mean(dim=-1), masked)


def consistency_loss(features: torch.Tensor) -> torch.Tensor:
    """Eq. 6 as a distance: features [V, B, p] (one row per view of the same window) -> scalar
    Σ_{a < b} mean_B (1 − cos(features[a], features[b])); 0 with fewer than two views."""
    total = features.new_zeros(())
    for a, b in itertools.combinations(range(features.shape[0]), 2):
        total = total + (1.0 - F.cosine_similarity(features[a], features[b], dim=-1)).mean()
    return total


def completed_views(targets: dict[str, torch.Tensor], predictions: dict[str, torch.Tensor],
                    masked: dict[str, torch.Tensor]) -> torch.Tensor:
    """X_a of Eq. 6 for one view: the standardised input with its masked tokens replaced by the
    reconstruction, flattened per window. modality -> [B, L, D] / [B, L] bool -> [B, sum L*D]."""
    parts = [torch.where(masked[k][..., None], predictions[k], targets[k]).flatten(1) for k in targets]
    return torch.cat(parts, dim=1)
