"""Per-sample normalisation of node positions, and the geometric augmentation of pretraining.

SPAR normalises each sample's layout to zero mean and unit variance. We use one isotropic scale
(the RMS distance of the nodes from their centroid) instead of a per-axis variance: a per-axis
scale would stretch the layout and break the relative geometry that localization relies on.
Targets (vehicle positions, hypocentres) are expressed in the same frame, so heads predict in
normalised units and ``PositionFrame.denormalize`` brings them back to metres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PositionFrame:
    """The affine map metres -> normalised units of each sample.

    mean:  [B, d_S] centroid of the layout (metres)
    scale: [B] RMS distance of the nodes from the centroid (metres, > 0)
    """

    mean: torch.Tensor
    scale: torch.Tensor

    def normalize(self, points: torch.Tensor) -> torch.Tensor:
        """[B, ..., d] metres -> normalised units. Dimensions beyond d_S (e.g. depth under a 2-D
        layout) are scaled but not shifted."""
        return (points - self._mean_for(points)) / self._scale_for(points)

    def denormalize(self, points: torch.Tensor) -> torch.Tensor:
        """Inverse of ``normalize``: [B, ..., d] normalised units -> metres."""
        return points * self._scale_for(points) + self._mean_for(points)

    def _mean_for(self, points: torch.Tensor) -> torch.Tensor:
        d, d_s = points.shape[-1], self.mean.shape[-1]
        mean = self.mean[..., :d] if d <= d_s else torch.nn.functional.pad(self.mean, (0, d - d_s))
        return mean.reshape(mean.shape[0], *([1] * (points.dim() - 2)), d)

    def _scale_for(self, points: torch.Tensor) -> torch.Tensor:
        return self.scale.reshape(-1, *([1] * (points.dim() - 1)))


def normalize_positions(positions: torch.Tensor, node_valid: torch.Tensor | None = None,
                        eps: float = 1e-6) -> tuple[torch.Tensor, PositionFrame]:
    """Zero-mean, unit-RMS-radius positions per sample.

    Args:
        positions: [B, N, d_S] metres.
        node_valid: [B, N] bool, nodes that belong to the layout (padding rows excluded);
            all nodes when None. Nodes that merely sent nothing still count: their place is known.
    Returns:
        ([B, N, d_S] normalised positions, the PositionFrame of each sample)
    """
    if node_valid is None:
        node_valid = torch.ones(positions.shape[:2], dtype=torch.bool, device=positions.device)
    weight = node_valid.to(positions.dtype).unsqueeze(-1)  # [B, N, 1]
    count = weight.sum(dim=1).clamp_min(1.0)  # [B, 1]
    mean = (positions * weight).sum(dim=1) / count  # [B, d_S]
    centred = (positions - mean.unsqueeze(1)) * weight
    scale = torch.sqrt((centred ** 2).sum(dim=(1, 2)) / count.squeeze(-1)).clamp_min(eps)  # [B]
    frame = PositionFrame(mean, scale)
    return frame.normalize(positions) * weight, frame


def random_rigid_motion(batch_size: int, dims: int, *, max_translation: float = 0.5,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotations (about the vertical axis for 3-D layouts) and translations.

    Returns:
        rotation: [B, dims, dims] orthonormal, det +1
        translation: [B, dims], uniform in [-max_translation, max_translation] (normalised units;
            the vertical component stays 0 for 3-D layouts)
    """
    angle = torch.rand(batch_size, generator=generator) * (2 * math.pi)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.eye(dims).repeat(batch_size, 1, 1)
    if dims >= 2:
        rotation[:, 0, 0], rotation[:, 0, 1] = cos, -sin
        rotation[:, 1, 0], rotation[:, 1, 1] = sin, cos
    translation = (torch.rand(batch_size, dims, generator=generator) * 2 - 1) * max_translation
    if dims >= 3:
        translation[:, 2:] = 0.0
    return rotation, translation


def apply_rigid_motion(points: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """[B, ..., d] points -> R p + t (d <= rotation size; extra target dims pass through rotated
    only when they belong to the layout's axes)."""
    d = points.shape[-1]
    r = rotation[:, :d, :d]
    flat = points.reshape(points.shape[0], -1, d)
    moved = torch.einsum("bij,bnj->bni", r, flat) + translation[:, None, :d]
    return moved.reshape(points.shape)
