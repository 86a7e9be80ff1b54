"""SPAR: signals + continuous spatial positions + learnable structural positions, masked
autoencoding with dual (signal and spatial) reconstruction. The MAE baseline is the same model
with the spatial/structural parts switched off (``train.models.config.OBJECTIVES``).

Shapes: B windows, N nodes, per modality m tokens of D values, d model width, L = N * m tokens of
one modality in node-major order, K visible tokens after masking, d_S position dimensions.

``SparEncoder`` is what ships (embeddings, per-modality encoders, joint encoder); its
``forward_features`` is the mask-free path a deployed graph wraps. ``SparPretrainer`` adds the two
decoders and the loss, one method per step: prepare_positions, embed, mask, forward_encoder,
forward_decoders, forward_loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from train.batch import Batch
from train.models.config import SparConfig
from train.models.masking import MaskResult, gather_tokens, mask_tokens
from train.models.positions import PositionFrame, apply_rigid_motion, normalize_positions, random_rigid_motion
from train.models.transformer import Stack


@dataclass
class Embedded:
    """Per-modality embeddings, each [B, L, d]; valid [B, L] bool (the node sent this token)."""

    signal: torch.Tensor  # signal projection + patch position
    spatial: torch.Tensor  # zeros when the spatial embedding is switched off
    structural: torch.Tensor  # zeros when the structural embedding is switched off
    valid: torch.Tensor

    @property
    def combined(self) -> torch.Tensor:
        return self.signal + self.spatial + self.structural


@dataclass
class Features:
    """Post-fusion latents of every modality, concatenated.

    latents [B, L_all, d], valid [B, L_all] bool, frame: the per-sample position normalisation;
    spans: modality -> (start, stop) slice of the L_all axis; positions [B, N, d_S]: the node
    positions in the frame's normalised units (what node-anchored heads read).
    """

    latents: torch.Tensor
    valid: torch.Tensor
    frame: PositionFrame
    spans: dict[str, tuple[int, int]]
    positions: torch.Tensor


@dataclass
class PretrainNoise:
    """All randomness of one pretraining step, drawn for a whole (global) batch.

    token: modality -> [B, L] uniform; node: modality -> [B, N] uniform;
    rotation [B, d_S, d_S], translation [B, d_S] (geometric augmentation).
    """

    token: dict[str, torch.Tensor]
    node: dict[str, torch.Tensor]
    rotation: torch.Tensor
    translation: torch.Tensor

    def slice(self, start: int, stop: int) -> PretrainNoise:
        return PretrainNoise({k: v[start:stop] for k, v in self.token.items()},
                             {k: v[start:stop] for k, v in self.node.items()},
                             self.rotation[start:stop], self.translation[start:stop])

    def to(self, device: torch.device | str) -> PretrainNoise:
        return PretrainNoise({k: v.to(device) for k, v in self.token.items()},
                             {k: v.to(device) for k, v in self.node.items()},
                             self.rotation.to(device), self.translation.to(device))


class ModalityEmbedding(nn.Module):
    """Signal (linear + learnable patch position), spatial and structural embeddings of one modality."""

    def __init__(self, cfg: SparConfig, n_tokens: int, token_dim: int):
        super().__init__()
        self.merge = cfg.token_merge
        self.n_tokens = n_tokens // self.merge  # tokens per node the encoders see
        self.signal = nn.Linear(token_dim * self.merge, cfg.dim)
        self.patch_position = nn.Parameter(torch.randn(self.n_tokens, cfg.dim) * 0.02)
        self.spatial = nn.Linear(cfg.position_dims, cfg.dim) if cfg.spatial_embedding else None
        self.structural_table = self.structural_text = self.structural = None
        if cfg.structural_embedding and cfg.structural_source == "text":
            # SPAR+LLM: frozen description embedding -> d_R -> d (the first map is what learns
            # which parts of the text matter; d_R stays small as in SPAR).
            self.structural_text = nn.Linear(cfg.text_dims, cfg.structural_dims)
            self.structural = nn.Linear(cfg.structural_dims, cfg.dim, bias=False)
        elif cfg.structural_embedding:
            self.structural_table = nn.Embedding(cfg.max_nodes, cfg.structural_dims)
            nn.init.normal_(self.structural_table.weight, std=1.0)
            self.structural = nn.Linear(cfg.structural_dims, cfg.dim, bias=False)
        # Raw dB tokens come in; the model normalises them itself, so a deployed graph needs no
        # separate preprocessing step. Set from the training data (set_token_statistics).
        self.register_buffer("token_mean", torch.zeros(()))
        self.register_buffer("token_std", torch.ones(()))

    def normalize_tokens(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """[B, N, m, D] dB -> [B, N, m, D] standardised, zero where the node is absent."""
        return (tokens - self.token_mean) / self.token_std * present[:, :, None, None].to(tokens.dtype)

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, positions: torch.Tensor,
                structure: torch.Tensor) -> Embedded:
        """tokens [B, N, m, D] standardised, present [B, N], positions [B, N, d_S] normalised,
        structure: node_index [B, N] int64 (table) or node_text [B, N, E] (text)
        -> Embedded with L = N * m / k (k = token_merge)."""
        b, n, m, d_in = tokens.shape
        m = m // self.merge
        if self.merge > 1:  # k adjacent patches of a node side by side: [B, N, m / k, k * D]
            tokens = tokens.reshape(b, n, m, self.merge * d_in)
        signal = self.signal(tokens) + self.patch_position  # [B, N, m, d]
        zeros = torch.zeros_like(signal)
        spatial = self.spatial(positions)[:, :, None, :].expand_as(signal) if self.spatial is not None else zeros
        if self.structural_text is not None:
            structural = self.structural(self.structural_text(structure))[:, :, None, :].expand_as(signal)
        elif self.structural is not None:
            structural = self.structural(self.structural_table(structure))[:, :, None, :].expand_as(signal)
        else:
            structural = zeros
        valid = present[:, :, None].expand(b, n, m)
        return Embedded(*(t.reshape(b, n * m, -1) for t in (signal, spatial, structural)), valid.reshape(b, n * m))


class SparEncoder(nn.Module):
    """Embeddings + per-modality encoders + joint encoder (the part kept frozen under heads)."""

    def __init__(self, cfg: SparConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.ModuleDict({s.name: ModalityEmbedding(cfg, s.n_tokens, s.token_dim)
                                         for s in cfg.modalities})
        self.encoders = nn.ModuleDict({s.name: Stack(cfg.dim, cfg.modality_depth, cfg.heads, cfg.mlp_ratio)
                                       for s in cfg.modalities})
        self.joint = Stack(cfg.dim, cfg.joint_depth, cfg.heads, cfg.mlp_ratio)

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.cfg.modalities)

    def set_token_statistics(self, stats: dict[str, tuple[float, float]]) -> None:
        """Standardisation of raw dB tokens: modality -> (mean, std) over present tokens."""
        for name in self.modality_names:
            mean, std = stats[name]
            self.embeddings[name].token_mean.fill_(float(mean))
            self.embeddings[name].token_std.fill_(max(float(std), 1e-3))

    def prepare_positions(self, positions: torch.Tensor) -> tuple[torch.Tensor, PositionFrame]:
        """[B, N, d_S] metres -> normalised [B, N, d_S] and the frame (zero mean, unit RMS radius)."""
        if positions.shape[-1] != self.cfg.position_dims:
            raise ValueError(f"positions have {positions.shape[-1]} dimensions, the model expects "
                             f"{self.cfg.position_dims}")
        return normalize_positions(positions)

    def embed(self, batch: Batch, positions: torch.Tensor) -> dict[str, Embedded]:
        """Embeddings of every modality, from raw tokens and normalised positions."""
        structure = self.structure_of(batch)
        out = {}
        for name in self.modality_names:
            emb = self.embeddings[name]
            tokens = emb.normalize_tokens(batch.tokens[name], batch.present[name])
            out[name] = emb(tokens, batch.present[name], positions, structure)
        return out

    def structure_of(self, batch: Batch) -> torch.Tensor:
        """What identifies each node structurally: node_index [B, N], or node_text [B, N, E] for SPAR+LLM."""
        if self.cfg.structural_source != "text":
            return batch.node_index
        if batch.node_text is None:
            raise ValueError("this SPAR+LLM model needs node_text (embeddings of the nodes' placement "
                             "descriptions); the dataset has no descriptions or wordllama is not installed")
        if batch.node_text.shape[-1] != self.cfg.text_dims:
            raise ValueError(f"node_text has {batch.node_text.shape[-1]} dims, the model expects {self.cfg.text_dims}")
        return batch.node_text.to(batch.positions.dtype)

    def encode(self, inputs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  dict[str, tuple[int, int]]]:
        """modality -> (x [B, K_k, d], valid [B, K_k]) -> joint latents [B, sum K, d], valid, spans."""
        latents, valids, spans, start = [], [], {}, 0
        for name, (x, valid) in inputs.items():
            latents.append(self.encoders[name](x, valid))
            valids.append(valid)
            spans[name] = (start, start + x.shape[1])
            start += x.shape[1]
        valid = torch.cat(valids, dim=1)
        return self.joint(torch.cat(latents, dim=1), valid), valid, spans

    def forward_features(self, batch: Batch) -> Features:
        """The deployed path: every present token, no masking, no augmentation."""
        positions, frame = self.prepare_positions(batch.positions)
        embedded = self.embed(batch, positions)
        latents, valid, spans = self.encode({k: (e.combined, e.valid) for k, e in embedded.items()})
        return Features(latents, valid, frame, spans, positions)

    def forward(self, batch: Batch) -> Features:
        return self.forward_features(batch)


class Decoder(nn.Module):
    """Visible latents + queries for masked tokens -> one prediction per query."""

    def __init__(self, cfg: SparConfig, out_dim: int):
        super().__init__()
        self.embed = nn.Linear(cfg.dim, cfg.decoder_dim)
        self.blocks = Stack(cfg.decoder_dim, cfg.decoder_depth, cfg.heads, cfg.mlp_ratio)
        self.head = nn.Linear(cfg.decoder_dim, out_dim)

    def forward(self, latents: torch.Tensor, latent_valid: torch.Tensor, queries: torch.Tensor,
                query_valid: torch.Tensor) -> torch.Tensor:
        """latents [B, K, d] + valid, queries [B, L, d] + valid -> predictions [B, L, out_dim]."""
        x = self.embed(torch.cat([latents, queries], dim=1))
        x = self.blocks(x, torch.cat([latent_valid, query_valid], dim=1))
        return self.head(x[:, latents.shape[1]:])


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # scalar: signal + weight * spatial
    signal_loss: torch.Tensor
    spatial_loss: torch.Tensor
    masks: dict[str, MaskResult]

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        """The loss terms, detached (the objective protocol's common view, see train.objectives)."""
        return {"signal": self.signal_loss, "spatial": self.spatial_loss}


class SparPretrainer(nn.Module):
    """SparEncoder + signal decoder + spatial decoder per modality, and the dual MSE loss."""

    def __init__(self, cfg: SparConfig):
        super().__init__()
        if cfg.token_merge != 1:
            raise ValueError("token_merge is a distilled student's setting; pretraining needs token_merge 1")
        self.cfg = cfg
        self.encoder = SparEncoder(cfg)
        names = self.encoder.modality_names
        self.mask_token = nn.ParameterDict({k: nn.Parameter(torch.zeros(cfg.dim)) for k in names})
        self.signal_decoders = nn.ModuleDict({s.name: Decoder(cfg, s.token_dim) for s in cfg.modalities})
        self.spatial_decoders = nn.ModuleDict({s.name: Decoder(cfg, cfg.position_dims) for s in cfg.modalities}
                                              if cfg.spatial_reconstruction else {})

    def start_step(self, step: int, total_steps: int) -> None:
        """SPAR has no schedule of its own (the objective protocol's hook, see train.objectives)."""

    def draw_noise(self, batch_size: int, n_nodes: int, generator: torch.Generator | None = None) -> PretrainNoise:
        """Random numbers for one step of ``batch_size`` windows (draw for the global batch)."""
        token = {s.name: torch.rand(batch_size, n_nodes * s.n_tokens, generator=generator)
                 for s in self.cfg.modalities}
        node = {s.name: torch.rand(batch_size, n_nodes, generator=generator) for s in self.cfg.modalities}
        rotation, translation = random_rigid_motion(batch_size, self.cfg.position_dims,
                                                    max_translation=self.cfg.max_translation, generator=generator)
        return PretrainNoise(token, node, rotation, translation)

    def prepare_positions(self, positions: torch.Tensor, noise: PretrainNoise) -> torch.Tensor:
        """[B, N, d_S] metres -> normalised (and, when enabled, randomly rotated and shifted)."""
        normalised, _ = self.encoder.prepare_positions(positions)
        if self.cfg.geometric_augmentation:
            normalised = apply_rigid_motion(normalised, noise.rotation, noise.translation)
        return normalised

    def mask(self, embedded: dict[str, Embedded], noise: PretrainNoise) -> dict[str, MaskResult]:
        return {name: mask_tokens(e.valid, self.cfg.modality(name).n_tokens, strategy=self.cfg.masking,
                                  ratio=self.cfg.mask_ratio, token_noise=noise.token[name],
                                  node_noise=noise.node[name], min_visible=self.cfg.min_visible)
                for name, e in embedded.items()}

    def forward_encoder(self, embedded: dict[str, Embedded], masks: dict[str, MaskResult]):
        """Visible tokens only -> joint latents [B, sum K, d], valid, spans."""
        inputs = {name: (gather_tokens(e.combined, masks[name].keep_index), masks[name].keep_valid)
                  for name, e in embedded.items()}
        return self.encoder.encode(inputs)

    def forward_decoders(self, latents, valid, spans, embedded: dict[str, Embedded],
                         masks: dict[str, MaskResult]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """modality -> (signal predictions [B, L, D], spatial predictions [B, L, d_S] or None).

        Signal queries carry what the encoder did not see but a decoder may know: the masked
        token's spatial + structural embedding (and its patch position). Spatial queries carry
        its signal + structural embedding instead.
        """
        out = {}
        for name, e in embedded.items():
            start, stop = spans[name]
            z, z_valid = latents[:, start:stop], valid[:, start:stop]
            query_valid = masks[name].masked
            signal_query = self.mask_token[name] + e.spatial + e.structural + self._patch_positions(name, e)
            signal = self.signal_decoders[name](z, z_valid, signal_query, query_valid)
            spatial = None
            if self.cfg.spatial_reconstruction:
                spatial_query = self.mask_token[name] + e.signal + e.structural
                spatial = self.spatial_decoders[name](z, z_valid, spatial_query, query_valid)
            out[name] = (signal, spatial)
        return out

    def _patch_positions(self, name: str, e: Embedded) -> torch.Tensor:
        """[1, L, d] patch-position embeddings of every token (node-major)."""
        table = self.encoder.embeddings[name].patch_position  # [m, d]
        return table.repeat(e.valid.shape[1] // table.shape[0], 1).unsqueeze(0)

    def forward_loss(self, batch: Batch, positions: torch.Tensor, predictions, masks) -> PretrainOutput:
        """MSE over masked, present tokens: each sample's mean over its masked tokens, then the
        batch mean (so a global batch split over DDP ranks averages to the same number)."""
        signal_loss = positions.new_zeros(())
        spatial_loss = positions.new_zeros(())
        for name, (signal, spatial) in predictions.items():
            emb = self.encoder.embeddings[name]
            b, n, m, d = batch.tokens[name].shape
            target = emb.normalize_tokens(batch.tokens[name], batch.present[name]).reshape(b, n * m, d)
            masked = masks[name].masked
            signal_loss = signal_loss + masked_mean_per_sample(((signal - target) ** 2).mean(-1), masked)
            if spatial is not None:
                target_pos = positions[:, :, None, :].expand(b, n, m, positions.shape[-1]).reshape(b, n * m, -1)
                spatial_loss = spatial_loss + masked_mean_per_sample(((spatial - target_pos) ** 2).mean(-1), masked)
        loss = signal_loss + self.cfg.spatial_loss_weight * spatial_loss
        return PretrainOutput(loss, signal_loss.detach(), spatial_loss.detach(), masks)

    def forward(self, batch: Batch, noise: PretrainNoise | None = None) -> PretrainOutput:
        """One pretraining step's forward pass; ``noise`` defaults to fresh draws."""
        if noise is None:
            noise = self.draw_noise(len(batch), batch.positions.shape[1]).to(batch.positions.device)
        positions = self.prepare_positions(batch.positions, noise)
        embedded = self.encoder.embed(batch, positions)
        masks = self.mask(embedded, noise)
        latents, valid, spans = self.forward_encoder(embedded, masks)
        predictions = self.forward_decoders(latents, valid, spans, embedded, masks)
        return self.forward_loss(batch, positions, predictions, masks)


def masked_mean_per_sample(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values [B, L], mask [B, L] bool -> mean over samples of each sample's mean over its mask
    (samples with nothing masked count as 0)."""
    weight = mask.to(values.dtype)
    per_sample = (values * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
    return per_sample.mean()
