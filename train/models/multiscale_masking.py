"""RobustHAR's multi-scale spatial-temporal masks (segment-, channel- and sensor-wise) on SPAR tokens.

The paper (Sec. 3.2, Eq. 2) arranges a window as X in R^{T x C x N} (time x sensor channel x body
position) and masks whole slices of it at three scales. Our tokens are patches of a per-node
spectrogram: modality k holds, per node, m = rows x cols tokens on a (frequency row, time column)
grid, row-major (``ModalitySpec.grid``), and the sensor axes sit inside each token's D values. A
token is the smallest unit the encoder can be denied, so every scale hides whole tokens:

* ``segment``: per present node, one contiguous span of ``round(ratio * cols)`` time columns, over
  every frequency row of every modality of that node (one uniform per node places the span;
  modalities with other column counts get the span at the same relative time). At least one column
  stays visible, so a segment mask never becomes a sensor mask.
* ``channel``: per present node, ``round(ratio * groups)`` of its channel groups. The paper's
  channels are sensor axes, which are mixed inside a token; the nearest token-level unit is a
  group of them: ``channel_group="modality"`` hides one sensor (all tokens of, e.g., the forearm's
  gyroscope: its other sensors stay visible), ``"band"`` hides one frequency row of one sensor (all
  of its time columns). At least one group of each present node stays visible.
* ``sensor``: per window, ``round(ratio * present nodes)`` whole nodes, every modality (the whole
  body position), at least one node visible.

Spans and groups are chosen per node (not one choice shared by all nodes as a literal reading of
Eq. 2 would give) because that is how data goes missing on a body network, and it lets the model
fill a gap from the other positions at the same time: the spatial correlation the paper is after.

Absent tokens (node sent nothing) are never hidden nor reconstructed. Every random number comes
from ``MultiScaleNoise`` (drawn for the global batch, sliced per DDP rank), so masks are a pure
function of (valid, noise). Each scale returns modality -> ``MaskResult`` with visible tokens kept
in sequence order.

Shapes: B windows, N nodes, per modality m tokens on a (rows, cols) grid, L = N * m, G groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.models.masking import MaskResult

SCALES = ("segment", "channel", "sensor")
CHANNEL_GROUPS = ("modality", "band")


@dataclass
class MultiScaleNoise:
    """All randomness of one RobustHAR step, drawn for a whole (global) batch.

    segment [B, N] uniform (span start of each node), channel: modality -> [B, N, G_k] uniform (one
    per channel group), sensor [B, N] uniform (node ranking).
    """

    segment: torch.Tensor
    channel: dict[str, torch.Tensor]
    sensor: torch.Tensor

    def slice(self, start: int, stop: int) -> MultiScaleNoise:
        return MultiScaleNoise(self.segment[start:stop], {k: v[start:stop] for k, v in self.channel.items()},
                               self.sensor[start:stop])

    def to(self, device: torch.device | str) -> MultiScaleNoise:
        return MultiScaleNoise(self.segment.to(device), {k: v.to(device) for k, v in self.channel.items()},
                               self.sensor.to(device))


def groups_per_node(grid: tuple[int, int], channel_group: str) -> int:
    """G_k: channel groups one node has in a modality with token grid (rows, cols)."""
    if channel_group not in CHANNEL_GROUPS:
        raise ValueError(f"channel_group must be one of {', '.join(CHANNEL_GROUPS)}, got {channel_group!r}")
    return grid[0] if channel_group == "band" else 1


def draw_multiscale_noise(batch_size: int, n_nodes: int, groups: dict[str, int],
                          generator: torch.Generator | None = None) -> MultiScaleNoise:
    """Uniform noise for every scale; groups: modality -> G_k (draw order is fixed, so a scale's
    masks do not depend on which other scales are switched on)."""
    segment = torch.rand(batch_size, n_nodes, generator=generator)
    channel = {name: torch.rand(batch_size, n_nodes, g, generator=generator) for name, g in groups.items()}
    sensor = torch.rand(batch_size, n_nodes, generator=generator)
    return MultiScaleNoise(segment, channel, sensor)


def segment_masks(valid: dict[str, torch.Tensor], grids: dict[str, tuple[int, int]], ratio: float,
                  span_noise: torch.Tensor) -> dict[str, MaskResult]:
    """valid: modality -> [B, L] bool; span_noise [B, N] -> modality -> MaskResult."""
    out = {}
    for name, v in valid.items():
        rows, cols = grids[name]
        width = min(round(ratio * cols), cols - 1)  # keep one column: else it is a sensor mask
        start = torch.floor(span_noise * (cols - width + 1)).clamp_max(cols - width)  # [B, N]
        col = torch.arange(cols, device=v.device, dtype=start.dtype)
        hidden = (col >= start[..., None]) & (col < start[..., None] + width)  # [B, N, cols]
        hidden = hidden[:, :, None, :].expand(-1, -1, rows, -1).reshape(v.shape)
        out[name] = to_mask_result(v, hidden)
    return out


def channel_masks(valid: dict[str, torch.Tensor], grids: dict[str, tuple[int, int]], ratio: float,
                  channel_group: str, group_noise: dict[str, torch.Tensor]) -> dict[str, MaskResult]:
    """Hide ``round(ratio * present groups)`` channel groups of each node (see module docstring).

    valid: modality -> [B, L]; group_noise: modality -> [B, N, G_k] -> modality -> MaskResult."""
    names = list(valid)
    sizes = [groups_per_node(grids[k], channel_group) for k in names]
    present = [_node_present(valid[k], grids[k])[..., None].expand(-1, -1, g)
               for k, g in zip(names, sizes, strict=True)]  # [B, N, G_k] each
    hidden = choose_units(torch.cat(present, dim=-1), torch.cat([group_noise[k] for k in names], dim=-1), ratio)
    out = {}
    for name, group_hidden in zip(names, torch.split(hidden, sizes, dim=-1), strict=True):
        rows, cols = grids[name]
        per_token = rows * cols // group_hidden.shape[-1]  # a group spans whole rows, node-major
        out[name] = to_mask_result(valid[name], group_hidden.repeat_interleave(per_token, dim=-1).flatten(1))
    return out


def sensor_masks(valid: dict[str, torch.Tensor], grids: dict[str, tuple[int, int]], ratio: float,
                 node_noise: torch.Tensor) -> dict[str, MaskResult]:
    """Hide ``round(ratio * present nodes)`` whole nodes, every modality; node_noise [B, N]."""
    present = torch.stack([_node_present(v, grids[k]) for k, v in valid.items()]).any(dim=0)  # [B, N]
    hidden = choose_units(present, node_noise, ratio)
    return {name: to_mask_result(v, hidden.repeat_interleave(grids[name][0] * grids[name][1], dim=1))
            for name, v in valid.items()}


def choose_units(present: torch.Tensor, noise: torch.Tensor, ratio: float) -> torch.Tensor:
    """Hide the ``round(ratio * present)`` lowest-noise present units along the last axis, leaving
    at least one present unit visible. present [..., U] bool, noise [..., U] -> hidden [..., U]."""
    count = present.sum(dim=-1, keepdim=True)
    n_hide = torch.round(ratio * count.to(torch.float64)).to(torch.long).minimum((count - 1).clamp_min(0))
    rank = torch.argsort(torch.argsort(noise.masked_fill(~present, 2.0), dim=-1), dim=-1)  # noise is in [0, 1)
    return (rank < n_hide) & present


def to_mask_result(valid: torch.Tensor, hidden: torch.Tensor) -> MaskResult:
    """valid, hidden [B, L] bool -> MaskResult keeping the valid, unhidden tokens in sequence order."""
    visible = valid & ~hidden
    order = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)  # visible first, in order
    n_keep = visible.sum(dim=1)
    k = max(int(n_keep.max()), 1)
    keep_valid = torch.arange(k, device=valid.device)[None, :] < n_keep[:, None]
    return MaskResult(order[:, :k], keep_valid, hidden & valid)


def stack_views(views: list[dict[str, MaskResult]]) -> dict[str, MaskResult]:
    """V views of the same B windows -> one MaskResult per modality over [V * B] rows (view-major),
    keep_index padded (keep_valid False) to the longest view, so all views encode in one pass."""
    out = {}
    for name in views[0]:
        parts = [view[name] for view in views]
        k = max(p.keep_index.shape[1] for p in parts)
        index = torch.cat([_pad(p.keep_index, k, 0) for p in parts])
        keep_valid = torch.cat([_pad(p.keep_valid, k, False) for p in parts])
        out[name] = MaskResult(index, keep_valid, torch.cat([p.masked for p in parts]))
    return out


def _pad(x: torch.Tensor, k: int, value) -> torch.Tensor:
    """[B, K'] -> [B, k] filled with ``value`` on the right."""
    return torch.nn.functional.pad(x, (0, k - x.shape[1]), value=value)


def _node_present(valid: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, N * m] token validity -> [B, N] node presence."""
    return valid.reshape(valid.shape[0], -1, grid[0] * grid[1]).any(dim=-1)
