"""AEMP: autoregressive-enhanced masked pretraining (shared/papers/aemp.md) of the shared SparEncoder.

Shapes: B windows, N nodes (access points), P = min(top_aps, N) strongest APs, V views per window,
N' nodes per view, B' = B * V view-samples (window-major: row ``b * V + v``). Per modality the m
tokens of a node lie on an (R, T) grid, R rows (subcarrier groups) x T columns (time patches),
row-major; D values per token, L = N' * m tokens, F = R * D values of one node at one time step
(a "frame" of the temporal module), S spans drawn per node, d model width.

One step, one method each (``forward`` runs them in order):

* ``select_views``: rank the present APs by signal strength, keep the top P and build the paper's
  multi-view combination: P views, view v leaving out the v-th strongest (C(P, P-1) = P subsets).
* ``gather_views``: the B' view-samples (tokens, presence, positions, node ids of the kept APs).
* ``mask``: 2-D span masking of each node's token grid (``span_mask``).
* ``embed``: BERT-style corruption of the masked tokens (zero / random / unchanged), embeddings.
* ``forward_encoder``: ``SparEncoder.encode`` of every valid token (BERT-style: the encoder sees
  the corrupted sequence, not only the visible tokens as in MAE).
* ``forward_decoder``: a per-token Gaussian, mean and clamped log-variance (``Decoder``).
* ``forward_ar``: the GPT-style temporal module (``TemporalAR``) on per-node frame sequences:
  teacher-forced next-frame prediction and a k-step rollout.
* ``forward_loss``: Gaussian NLL + lambda(t) * ((1 - eta) * confidence-weighted MSE + eta * rollout
  MSE), or learnt (Kendall) weights for the two temporal terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from train.batch import Batch
from train.models.config import SparConfig
from train.models.masking import MaskResult
from train.models.spar import Decoder, Embedded, SparEncoder, masked_mean_per_sample


@dataclass(frozen=True)
class AempParams:
    """``cfg.objective_params`` of the AEMP objective; the paper's value where it gives one."""

    top_aps: int = 6  # paper N = 6: pool of strongest APs; each view keeps N - 1 of them
    views_per_step: int | None = None  # None: all N views; k: a random k of them per window
    mask_ratio: float = 0.15  # tokens masked per present node (BERT/SpanBERT budget; paper: none)
    span_p: float = 0.2  # span lengths ~ Geo(p) (SpanBERT's p; paper: none)
    span_max: int = 10  # l_max (SpanBERT); also clipped at the grid's extent
    replace_zero: float = 0.8  # paper: masked values -> 0 (80%), random (10%), unchanged (10%)
    replace_random: float = 0.1
    logvar_min: float = -6.0  # clamp of the predicted log-variance (standardised units)
    logvar_max: float = 6.0
    ar_dim: int | None = None  # width of the temporal module; None: cfg.decoder_dim
    ar_depth: int = 1  # causal blocks (paper: 6 at width 512; kept small like our decoder)
    ar_weight: float = 1.0  # lambda at the end of its cosine ramp
    ar_weight_ramp: bool = True  # paper: lambda rises from 0 by a cosine schedule over training
    rollout_weight: float = 0.3  # eta of eq. (9) (paper: none)
    rollout_steps: int = 2  # k frames rolled out (paper: none)
    rollout_prob: float = 0.2  # a step trains the rollout with this (low) probability
    tf_start: float = 1.0  # teacher-forcing probability p of eq. (6), linear from start ...
    tf_end: float = 0.5  # ... to end over training (paper: "gradually decreases")
    input_noise: float = 0.05  # std of the noise added to the temporal module's inputs
    confidence_xi: float = 1.0  # xi of eq. (7): W = 1 / (1 + xi * sigma^2)
    coupling_steps: int | None = None  # stop-gradient phase; None: 25% of training (paper: 25/100)
    coupling_ramp_steps: int = 0  # then scale the temporal gradient linearly from 0 to 1
    uncertainty_weighting: bool = False  # learnt log-variances weight the temporal terms

    @classmethod
    def from_dict(cls, data: dict) -> AempParams:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown aemp objective params: {', '.join(unknown)}")
        params = cls(**data)
        params.validate()
        return params

    def validate(self) -> None:
        checks = [
            (self.top_aps >= 1, "top_aps must be >= 1"),
            (self.views_per_step is None or self.views_per_step >= 1, "views_per_step must be >= 1 or None"),
            (0.0 <= self.mask_ratio < 1.0, "mask_ratio must be in [0, 1)"),
            (0.0 < self.span_p <= 1.0, "span_p must be in (0, 1]"),
            (self.span_max >= 1, "span_max must be >= 1"),
            (self.replace_zero >= 0 and self.replace_random >= 0 and self.replace_zero + self.replace_random <= 1,
             "replace_zero and replace_random must be >= 0 with a sum <= 1"),
            (self.logvar_min < self.logvar_max, "logvar_min must be below logvar_max"),
            (self.ar_dim is None or self.ar_dim >= 1, "ar_dim must be >= 1 or None"),
            (self.ar_depth >= 1 and self.rollout_steps >= 1, "ar_depth and rollout_steps must be >= 1"),
            (self.ar_weight >= 0 and 0 <= self.rollout_weight <= 1, "need ar_weight >= 0, rollout_weight in [0, 1]"),
            (0 <= self.rollout_prob <= 1 and 0 <= self.tf_start <= 1 and 0 <= self.tf_end <= 1,
             "rollout_prob, tf_start and tf_end must be probabilities"),
            (self.input_noise >= 0 and self.confidence_xi >= 0, "input_noise and confidence_xi must be >= 0"),
            (self.coupling_steps is None or self.coupling_steps >= 0, "coupling_steps must be >= 0 or None"),
            (self.coupling_ramp_steps >= 0, "coupling_ramp_steps must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"aemp objective params: {message}")


@dataclass
class AempNoise:
    """All randomness of one AEMP step for a (global) batch; every tensor has the window on dim 0,
    so ``slice`` hands each DDP rank the draws one process would have used for its windows.

    "view" [B, P] uniform (which views, when views_per_step < P); "rollout" [B] one uniform repeated
    (every rank must agree whether this step trains the rollout); per modality ``name``:
    "name.span" [B, V, N', S, 4] uniform (height, width, top, left of each span),
    "name.corrupt" [B, V, N', m] uniform (zero / random / keep), "name.random" [B, V, N', m, D]
    standard normal (replacement values), "name.teacher" [B, V, N', T] uniform (b_t of eq. 6),
    "name.input" [B, V, N', T, F] standard normal (noise on the temporal module's inputs).
    """

    tensors: dict[str, torch.Tensor]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def slice(self, start: int, stop: int) -> AempNoise:
        return AempNoise({k: v[start:stop] for k, v in self.tensors.items()})

    def to(self, device: torch.device | str) -> AempNoise:
        return AempNoise({k: v.to(device) for k, v in self.tensors.items()})


@dataclass
class Gaussian:
    """Per-token reconstruction: mean and clamped log-variance, each [B', L, D] (standardised units)."""

    mean: torch.Tensor
    logvar: torch.Tensor


@dataclass
class TemporalOutput:
    """One modality's temporal predictions, frames of F values.

    pred, target, weight [B', N', T-1, F]: teacher-forced prediction of frames 2..T, the true
    frames, the confidence weights W of eq. (7) (detached); rollout, rollout_target [B', N', k, F].
    """

    pred: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    rollout: torch.Tensor
    rollout_target: torch.Tensor


@dataclass
class AempOutput:
    """loss: the scalar trained; nll, pred, rollout: the three terms, still attached to the graph
    (tests backpropagate single terms); masks: modality -> MaskResult over the view-samples."""

    loss: torch.Tensor
    nll: torch.Tensor
    pred: torch.Tensor
    rollout: torch.Tensor
    masks: dict[str, MaskResult]

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        return {"nll": self.nll.detach(), "pred": self.pred.detach(), "rollout": self.rollout.detach()}


def geometric_lengths(u: torch.Tensor, p: float, l_max: int) -> torch.Tensor:
    """Uniforms u in [0, 1) -> integer lengths ~ Geo(p) clipped to [1, l_max] (inverse CDF:
    P(l > k) = (1 - p)^k, so l = 1 + floor(log(1 - u) / log(1 - p)); clipping piles the tail on l_max)."""
    if p >= 1.0:
        return torch.ones_like(u, dtype=torch.long)
    length = 1 + torch.floor(torch.log1p(-u) / math.log1p(-p))
    return length.clamp(1, l_max).to(torch.long)


def clipped_geometric_mean(p: float, l_max: int) -> float:
    """E[min(Geo(p), l_max)] = sum_{k < l_max} (1 - p)^k = (1 - (1 - p)^l_max) / p."""
    return float(l_max) if p <= 0 else (1.0 - (1.0 - p) ** l_max) / p


def span_rectangles(u: torch.Tensor, rows: int, cols: int, p: float, l_max: int) -> torch.Tensor:
    """u [..., S, 4] uniforms -> rectangles [..., S, 4] long (top, left, height, width).

    Height ~ Geo(p) clipped at min(l_max, rows), width likewise on cols (a span along the
    subcarrier axis, one along time, or a block of both); the corner is uniform among the
    positions where the rectangle fits."""
    height = geometric_lengths(u[..., 0], p, min(l_max, rows))
    width = geometric_lengths(u[..., 1], p, min(l_max, cols))
    top = torch.floor(u[..., 2] * (rows - height + 1)).to(torch.long)
    left = torch.floor(u[..., 3] * (cols - width + 1)).to(torch.long)
    return torch.stack([top, left, height, width], dim=-1)


def rectangle_cells(rect: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """rect [..., 4] (top, left, height, width) -> [..., rows * cols] bool cells (row-major)."""
    r = torch.arange(rows, device=rect.device)
    c = torch.arange(cols, device=rect.device)
    in_rows = (r >= rect[..., 0:1]) & (r < rect[..., 0:1] + rect[..., 2:3])  # [..., R]
    in_cols = (c >= rect[..., 1:2]) & (c < rect[..., 1:2] + rect[..., 3:4])  # [..., T]
    return (in_rows[..., :, None] & in_cols[..., None, :]).flatten(-2)


def span_mask(u: torch.Tensor, rows: int, cols: int, budget: torch.Tensor, p: float, l_max: int) -> torch.Tensor:
    """2-D span masking of token grids.

    Args:
        u: [..., S, 4] uniforms, S candidate spans per grid, drawn in order.
        budget: [...] long, tokens to mask in each grid (0: none).
    Returns:
        [..., rows * cols] bool, row-major.

    As SpanBERT on a sequence, spans are added in order until the budget is reached: span s adds
    its cells not yet masked while fewer than ``budget`` are masked; the span that crosses the
    budget is cut, keeping its first new cells in row-major order, so exactly ``budget`` cells are
    masked (fewer only if all S spans together cover less). Vectorised: every span before the cut
    one is taken whole, so "masked before span s" is the cumulative union of the uncut rectangles.
    """
    cells = rectangle_cells(span_rectangles(u, rows, cols, p, l_max), rows, cols)  # [..., S, m]
    union = cells.to(torch.uint8).cummax(dim=-2).values.bool()
    before = torch.cat([torch.zeros_like(union[..., :1, :]), union[..., :-1, :]], dim=-2)
    room = (budget[..., None] - before.sum(-1)).clamp_min(0)  # [..., S] cells span s may still add
    new = cells & ~before
    accepted = new & (new.cumsum(-1) <= room[..., None])
    return accepted.any(dim=-2)


def node_frames(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[B', N' * m, D] or [B', N', m, D] row-major tokens -> [B', N', T, F]: node n's frame at time
    step t holds the R tokens of column t (all subcarrier groups), F = R * D."""
    b, d = x.shape[0], x.shape[-1]
    grid = x.reshape(b, -1, rows, cols, d)
    return grid.permute(0, 1, 3, 2, 4).reshape(b, grid.shape[1], cols, rows * d)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """[length, dim] the transformer's sine/cosine position encoding."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


class TemporalAR(nn.Module):
    """GPT-style temporal subnetwork: frames [.., t, F] -> the next frame at every position.

    Input projection + sinusoidal position, causal pre-norm transformer, then (paper 3.6.1) a GRU
    and a linear head. Output t predicts frame t + 1 from frames <= t only, so a rollout that
    appends its own predictions reuses the same function.
    """

    def __init__(self, frame_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float, max_len: int):
        super().__init__()
        self.input = nn.Linear(frame_dim, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, max(1, int(dim * mlp_ratio)), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, frame_dim)
        self.register_buffer("position", sinusoidal_positions(max_len, dim), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [S, t, F] -> next-frame predictions [S, t, F]."""
        t = frames.shape[1]
        x = self.input(frames) + self.position[:t]
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=frames.device, dtype=x.dtype)
        h, _ = self.gru(self.blocks(x, mask=causal, is_causal=True))
        return self.head(h)

    def teacher_forcing(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [S, T, F] (given frames) -> predictions of frames 2..T [S, T-1, F]."""
        return self(inputs[:, :-1])

    def rollout(self, start: torch.Tensor, steps: int) -> torch.Tensor:
        """start [S, t0, F] true frames -> the next ``steps`` frames [S, steps, F], each predicted
        from the start and the earlier predictions (eq. 8)."""
        sequence, predictions = start, []
        for _ in range(steps):
            nxt = self(sequence)[:, -1:]
            predictions.append(nxt)
            sequence = torch.cat([sequence, nxt], dim=1)
        return torch.cat(predictions, dim=1)


class AempPretrainer(nn.Module):
    """SparEncoder + Gaussian decoder per modality + temporal module per modality, and the AEMP loss."""

    def __init__(self, cfg: SparConfig):
        super().__init__()
        self.cfg = cfg
        self.params = AempParams.from_dict(cfg.objective_params)
        self.encoder = SparEncoder(cfg)
        self.decoders = nn.ModuleDict({s.name: Decoder(cfg, 2 * s.token_dim) for s in cfg.modalities})
        ar_dim = self.params.ar_dim or cfg.decoder_dim
        if ar_dim % cfg.heads:
            raise ValueError(f"aemp ar_dim ({ar_dim}) must be divisible by heads ({cfg.heads})")
        # A grid with one time column has no "next frame": such a modality gets no temporal module.
        self.temporal = nn.ModuleDict({
            s.name: TemporalAR(s.grid[0] * s.token_dim, ar_dim, self.params.ar_depth, cfg.heads, cfg.mlp_ratio,
                               s.grid[1])
            for s in cfg.modalities if s.grid[1] >= 2})
        # Kendall et al.: s_j = log sigma_j^2 of the two temporal terms (see forward_loss).
        self.log_vars = nn.Parameter(torch.zeros(2)) if self.params.uncertainty_weighting else None
        self._step: int | None = None
        self._total = 0

    # ------------------------------------------------------------------ schedules
    def start_step(self, step: int, total_steps: int) -> None:
        """Where training is: drives lambda(t), the teacher-forcing probability and the coupling."""
        self._step, self._total = int(step), max(1, int(total_steps))

    def _progress(self) -> float:
        """Fraction of training done; 1 before start_step is ever called (the schedules' end state)."""
        return 1.0 if self._step is None else min(1.0, self._step / self._total)

    def ar_weight(self) -> float:
        """lambda(t): cosine ramp from 0 to ar_weight over training (eq. 9), or constant."""
        if not self.params.ar_weight_ramp:
            return self.params.ar_weight
        return self.params.ar_weight * 0.5 * (1.0 - math.cos(math.pi * self._progress()))

    def teacher_probability(self) -> float:
        """p of eq. (6), linear from tf_start to tf_end over training."""
        return self.params.tf_start + (self.params.tf_end - self.params.tf_start) * self._progress()

    def coupling(self) -> float:
        """Share of the temporal loss's gradient that reaches decoder and encoder: 0 for the first
        coupling_steps (stop-gradient), then 1, or a linear ramp over coupling_ramp_steps."""
        if self._step is None:
            return 1.0
        start = self.params.coupling_steps
        if start is None:
            start = round(0.25 * self._total)
        if self._step < start:
            return 0.0
        ramp = self.params.coupling_ramp_steps
        return 1.0 if ramp == 0 else min(1.0, (self._step - start + 1) / ramp)

    # ------------------------------------------------------------------ noise
    def view_layout(self, n_nodes: int) -> tuple[int, int, int]:
        """(P pool size, V views used per step, N' nodes per view) for batches of ``n_nodes`` nodes."""
        pool = min(self.params.top_aps, n_nodes)
        if pool < 2:  # nothing to leave out: one view of the pool
            return pool, 1, pool
        views = min(self.params.views_per_step or pool, pool)
        return pool, views, pool - 1

    def draw_noise(self, batch_size: int, n_nodes: int, generator: torch.Generator | None = None) -> AempNoise:
        """Random numbers for one step of ``batch_size`` windows (draw for the global batch)."""
        pool, views, per_view = self.view_layout(n_nodes)
        lead = (batch_size, views, per_view)
        out = {"view": torch.rand(batch_size, pool, generator=generator),
               "rollout": torch.rand(1, generator=generator).expand(batch_size).clone()}
        for s in self.cfg.modalities:
            rows, cols = s.grid
            out[f"{s.name}.span"] = torch.rand(*lead, 2 * s.n_tokens, 4, generator=generator)
            out[f"{s.name}.corrupt"] = torch.rand(*lead, s.n_tokens, generator=generator)
            out[f"{s.name}.random"] = torch.randn(*lead, s.n_tokens, s.token_dim, generator=generator)
            out[f"{s.name}.teacher"] = torch.rand(*lead, cols, generator=generator)
            out[f"{s.name}.input"] = torch.randn(*lead, cols, rows * s.token_dim, generator=generator)
        return AempNoise(out)

    # ------------------------------------------------------------------ steps
    def signal_strength(self, batch: Batch) -> torch.Tensor:
        """[B, N] mean raw token value (dB) of each node over its tokens and modalities; -inf where
        the node sent nothing in any modality (the paper ranks APs by RSSI)."""
        total = sum(batch.tokens[k].mean(dim=(2, 3)) for k in batch.modalities)
        present = torch.stack([batch.present[k] for k in batch.modalities]).any(dim=0)
        return (total / len(batch.modalities)).masked_fill(~present, float("-inf"))

    def select_views(self, batch: Batch, noise: AempNoise) -> torch.Tensor:
        """Node indices of each view [B, V, N'].

        The P strongest nodes form the pool (strongest first; absent nodes rank last, so a window
        with fewer than P present nodes has views that leave out an absent slot and keep every
        present node). View v leaves out the v-th of the pool. With views_per_step < P each window
        uses a random subset of the P views (from noise["view"])."""
        order = torch.argsort(self.signal_strength(batch), dim=1, descending=True, stable=True)
        pool, views, per_view = self.view_layout(order.shape[1])
        order = order[:, :pool]
        if pool < 2:
            return order[:, None, :]
        leave_out = torch.arange(pool, device=order.device)
        keep = torch.stack([torch.cat([leave_out[:v], leave_out[v + 1:]]) for v in range(pool)])  # [P, P-1]
        chosen = torch.argsort(noise["view"], dim=1)[:, :views]  # [B, V] view ids
        return torch.gather(order, 1, keep[chosen].reshape(len(order), -1)).reshape(len(order), views, per_view)

    def gather_views(self, batch: Batch, index: torch.Tensor) -> Batch:
        """batch [B, N, ...] and node indices [B, V, N'] -> view batch [B' = B * V, N', ...]."""
        b, v, _ = index.shape
        rows = torch.arange(b, device=index.device)[:, None, None]

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[rows, index].flatten(0, 1)

        def repeat(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(v, dim=0)

        return Batch({k: take(t) for k, t in batch.tokens.items()}, {k: take(t) for k, t in batch.present.items()},
                     take(batch.positions), take(batch.node_index), repeat(batch.label), repeat(batch.target_class),
                     repeat(batch.target_position), None if batch.node_text is None else take(batch.node_text))

    def mask(self, views: Batch, noise: AempNoise) -> dict[str, MaskResult]:
        """Span masks of every view-sample: modality -> MaskResult with masked [B', L].

        Each present node masks round(mask_ratio * m) tokens (at least one when mask_ratio > 0) of
        its (R, T) grid by ``span_mask``. BERT-style, the encoder still receives every valid token
        (keep_index is the identity, keep_valid the presence); masked ones are corrupted in embed."""
        out = {}
        for name, present in views.present.items():
            spec = self.cfg.modality(name)
            b, n = present.shape
            budget = round(self.params.mask_ratio * spec.n_tokens)
            budget = max(budget, 1) if self.params.mask_ratio > 0 else 0
            budget = present.to(torch.long) * budget  # [B', N']
            u = noise[f"{name}.span"].flatten(0, 1)
            cells = span_mask(u, *spec.grid, budget, self.params.span_p, self.params.span_max)  # [B', N', m]
            valid = present[:, :, None].expand(b, n, spec.n_tokens).reshape(b, -1)
            keep_index = torch.arange(valid.shape[1], device=valid.device).expand(b, -1)
            out[name] = MaskResult(keep_index, valid, cells.reshape(b, -1) & valid)
        return out

    def corrupt(self, tokens: torch.Tensor, masked: torch.Tensor, u: torch.Tensor,
                random: torch.Tensor) -> torch.Tensor:
        """tokens [B', N', m, D] standardised, masked [B', N', m] -> the encoder's input: masked
        tokens become 0 (prob replace_zero), N(0, 1) values (replace_random) or stay (the rest)."""
        zero = (masked & (u < self.params.replace_zero))[..., None]
        rand = (masked & (u >= self.params.replace_zero) &
                (u < self.params.replace_zero + self.params.replace_random))[..., None]
        return torch.where(zero, torch.zeros_like(tokens), torch.where(rand, random, tokens))

    def embed(self, views: Batch, positions: torch.Tensor, masks: dict[str, MaskResult],
              noise: AempNoise) -> tuple[dict[str, Embedded], dict[str, torch.Tensor]]:
        """Embeddings of the corrupted view-samples (modality -> Embedded, L = N' * m) and the clean
        standardised tokens [B', N', m, D] (the reconstruction and prediction targets)."""
        embedded, clean = {}, {}
        for name in self.encoder.modality_names:
            emb = self.encoder.embeddings[name]
            tokens = emb.normalize_tokens(views.tokens[name], views.present[name])
            b, n, m, _ = tokens.shape
            corrupted = self.corrupt(tokens, masks[name].masked.reshape(b, n, m),
                                     noise[f"{name}.corrupt"].flatten(0, 1), noise[f"{name}.random"].flatten(0, 1))
            embedded[name] = emb(corrupted, views.present[name], positions, self.encoder.structure_of(views))
            clean[name] = tokens
        return embedded, clean

    def forward_encoder(self, embedded: dict[str, Embedded]):
        """Every valid (possibly corrupted) token -> joint latents [B', sum L, d], valid, spans."""
        return self.encoder.encode({name: (e.combined, e.valid) for name, e in embedded.items()})

    def forward_decoder(self, latents: torch.Tensor, valid: torch.Tensor,
                        spans: dict[str, tuple[int, int]]) -> dict[str, Gaussian]:
        """modality -> Gaussian over every token [B', L, D]. Each token's latent is its own decoder
        query (the Decoder runs with an empty visible set), as BERT's head reads the token's state."""
        out = {}
        for name, (start, stop) in spans.items():
            z, z_valid = latents[:, start:stop], valid[:, start:stop]
            mean, logvar = self.decoders[name](z[:, :0], z_valid[:, :0], z, z_valid).chunk(2, dim=-1)
            out[name] = Gaussian(mean, logvar.clamp(self.params.logvar_min, self.params.logvar_max))
        return out

    def forward_ar(self, clean: dict[str, torch.Tensor], gaussians: dict[str, Gaussian],
                   noise: AempNoise) -> dict[str, TemporalOutput]:
        """The temporal module on every node's frame sequence (modalities with T >= 2).

        Teacher forcing (eq. 6): the input frame X_t = (1 - b_t) mu_t + b_t Y_t + noise, b_t ~
        Bernoulli(p) with p = teacher_probability(); mu is the reconstruction mean, passed through
        ``coupling()`` (detached in the stop-gradient phase), Y the clean tokens. Rollout (eq. 8):
        the first T - k true frames, then k frames from the module's own predictions."""
        p, scale, k = self.teacher_probability(), self.coupling(), self.params.rollout_steps
        out = {}
        for name, ar in self.temporal.items():
            rows, cols = self.cfg.modality(name).grid
            target = node_frames(clean[name], rows, cols)  # [B', N', T, F]
            mean = node_frames(_scale_gradient(gaussians[name].mean, scale), rows, cols)
            teach = (noise[f"{name}.teacher"].flatten(0, 1) < p).to(mean.dtype)[..., None]
            jitter = self.params.input_noise * noise[f"{name}.input"].flatten(0, 1)
            inputs = (1 - teach) * mean + teach * target + jitter
            lead = target.shape[:2]
            pred = ar.teacher_forcing(inputs.flatten(0, 1)).reshape(*lead, cols - 1, -1)
            # W of eq. (7) from the previous frame's predicted variance; detached, or the loss
            # could shrink by inflating the variance instead of predicting better.
            logvar = node_frames(gaussians[name].logvar.detach(), rows, cols)[:, :, :-1]
            weight = 1.0 / (1.0 + self.params.confidence_xi * logvar.exp())
            start = max(1, cols - k)
            rollout = ar.rollout(target[:, :, :start].flatten(0, 1), cols - start).reshape(*lead, cols - start, -1)
            out[name] = TemporalOutput(pred, target[:, :, 1:], weight, rollout, target[:, :, start:])
        return out

    def forward_loss(self, clean: dict[str, torch.Tensor], gaussians: dict[str, Gaussian],
                     masks: dict[str, MaskResult], temporal: dict[str, TemporalOutput],
                     present: dict[str, torch.Tensor], noise: AempNoise) -> AempOutput:
        """L = L_mask + lambda(t) * ((1 - eta) * L_pred + eta * r * L_pred,k) (eq. 9), r = 1 when this
        step trains the rollout (probability rollout_prob), else 0.

        Every term is each view-sample's mean (over its masked tokens, or its present nodes) and
        then the mean over view-samples: each view of a window weighs the same, and a global batch
        split over DDP ranks averages to the same number. With uncertainty_weighting the two
        temporal terms are weighted as Kendall et al., 0.5 * exp(-s_j) * L_j + 0.5 * s_j, in place
        of lambda(t) and eta (see ``combine``)."""
        device = next(iter(clean.values())).device
        nll = pred = roll = torch.zeros((), device=device)
        for name, g in gaussians.items():
            b, n, m, d = clean[name].shape
            per_token = gaussian_nll(clean[name].reshape(b, n * m, d), g.mean, g.logvar).mean(-1)
            nll = nll + masked_mean_per_sample(per_token, masks[name].masked)
        for name, t in temporal.items():
            pred_err = ((t.pred - t.target) ** 2 * t.weight).mean(dim=(2, 3))  # [B', N']
            roll_err = ((t.rollout - t.rollout_target) ** 2).mean(dim=(2, 3))
            pred = pred + masked_mean_per_sample(pred_err, present[name])
            roll = roll + masked_mean_per_sample(roll_err, present[name])
        # a tensor, not a Python bool: no device sync; the same draw on every rank (see draw_noise)
        has_temporal = nll.new_tensor(float(len(temporal) > 0))
        drawn = (noise["rollout"][0] < self.params.rollout_prob).to(nll.dtype) * has_temporal
        return AempOutput(self.combine(nll, pred, roll, has_temporal, drawn), nll, pred, roll, masks)

    def combine(self, nll: torch.Tensor, pred: torch.Tensor, roll: torch.Tensor, has_temporal: torch.Tensor,
                drawn: torch.Tensor) -> torch.Tensor:
        """The scalar trained (all arguments scalars; has_temporal, drawn are 0 or 1). The NLL stays
        unweighted: it already learns its own variance, and a Kendall weight on a term that can be
        negative has no finite optimum (s -> -inf)."""
        if self.log_vars is None:
            eta = self.params.rollout_weight
            return nll + self.ar_weight() * ((1 - eta) * pred + eta * drawn * roll)
        s = self.log_vars
        kendall = 0.5 * torch.exp(-s) * torch.stack([pred, roll]) + 0.5 * s
        # a term absent this step (rollout not drawn, no temporal axis) must not pull its s down
        return nll + (kendall * torch.stack([has_temporal, drawn])).sum()

    def forward(self, batch: Batch, noise: AempNoise | None = None) -> AempOutput:
        """One pretraining step's forward pass; ``noise`` defaults to fresh draws."""
        if noise is None:
            noise = self.draw_noise(len(batch), batch.positions.shape[1]).to(batch.positions.device)
        views = self.gather_views(batch, self.select_views(batch, noise))
        positions, _ = self.encoder.prepare_positions(views.positions)
        masks = self.mask(views, noise)
        embedded, clean = self.embed(views, positions, masks, noise)
        latents, valid, spans = self.forward_encoder(embedded)
        gaussians = self.forward_decoder(latents, valid, spans)
        temporal = self.forward_ar(clean, gaussians, noise)
        return self.forward_loss(clean, gaussians, masks, temporal, views.present, noise)


def gaussian_nll(target: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise Gaussian negative log-likelihood, eq. (5) with its constant:
    0.5 * (log sigma^2 + (x - mu)^2 / sigma^2 + log(2 pi))."""
    return 0.5 * (logvar + (target - mean) ** 2 * torch.exp(-logvar) + math.log(2 * math.pi))


def _scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x unchanged in the forward pass; its gradient multiplied by ``scale`` (0: detached)."""
    if scale <= 0.0:
        return x.detach()
    if scale >= 1.0:
        return x
    return x.detach() + scale * (x - x.detach())
