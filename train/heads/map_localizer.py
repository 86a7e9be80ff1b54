"""Map-aware localization head (AEMP section 3.7 and appendix A.1): a position regressor whose loss
adds a distance penalty and a floor-plan legality penalty to the MSE.

The floor plan is a legal-position grid: ``grid[i][j]`` is 1 where a device may be, row ``i``
covering y in [y0 + i c, y0 + (i + 1) c), column ``j`` covering x in [x0 + j c, x0 + (j + 1) c)
(``origin`` (x0, y0), ``cell_m`` c metres). Penalties are in metres: the floor plan is.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from train.heads.blocks import first_target, masked_mse
from train.heads.localizer import PooledRegressor


class MapAwareLocalizer(PooledRegressor):
    """Transformer block(s) + masked mean + Linear (as ``TransformerLocalizer``) -> [B, out_dims]
    positions in the per-sample normalised frame; ``predict`` gives metres (frame.denormalize).

    loss = loc_weight * MSE (normalised units, as TransformerLocalizer)
         + dist_weight * mean max(0, e - dist_threshold_m), e the Euclidean error in metres (eq. 15)
         + map_weight * mean map penalty of the prediction in metres (eqs. 11-13, ``map_penalty``)

    legal_grid: None (no map term) or the JSON-able ``{"grid": [[0/1, ...], ...], "origin": [x0, y0],
    "cell_m": c}``, kept as given so a checkpoint can rebuild the head from its kwargs; the tables
    derived from it are buffers. The map penalty reads the first two output dimensions as (x, y).
    """

    task = "localize"

    def __init__(self, d: int, out_dims: int = 2, legal_grid: dict | None = None, heads: int = 4, layers: int = 1,
                 mlp_ratio: float = 4.0, loc_weight: float = 1.0, dist_weight: float = 0.1,
                 dist_threshold_m: float = 1.0, map_weight: float = 0.1, map_alpha: float = 1.0,
                 out_of_map_penalty: float = 10.0):
        super().__init__(d, out_dims, heads=heads, layers=layers, mlp_ratio=mlp_ratio)
        if legal_grid is not None and out_dims < 2:
            raise ValueError("a floor-plan legality loss needs at least 2 output dimensions")
        self.legal_grid = legal_grid
        self.loc_weight, self.dist_weight, self.map_weight = loc_weight, dist_weight, map_weight
        self.dist_threshold_m, self.map_alpha, self.out_of_map_penalty = dist_threshold_m, map_alpha, out_of_map_penalty
        if legal_grid is not None:
            distance, origin, cell = legal_tables(legal_grid)
            self.register_buffer("distance", distance)  # [2H + 1, 2W + 1] metres to the legal area
            self.register_buffer("origin", origin)  # [2] metres (x0, y0)
            self.register_buffer("cell_m", cell)  # [] metres

    def loss(self, outputs: torch.Tensor, batch, frame) -> torch.Tensor:
        """outputs [B, out_dims] normalised -> weighted sum of the three terms over the windows
        whose first target slot is set; 0 with a gradient path when none is."""
        target_m = first_target(batch, self.out_dims).to(outputs.device)  # [B, out_dims] metres
        loc = masked_mse(outputs, frame.normalize(target_m))
        keep = torch.isfinite(target_m).all(dim=-1)  # [B]
        pred_m = frame.denormalize(outputs)
        safe = torch.where(keep[:, None], target_m, pred_m.detach())  # no NaN into the graph
        # sqrt'(0) is infinite: a tiny epsilon keeps an exact hit's gradient finite
        error = torch.sqrt(((pred_m - safe) ** 2).sum(-1) + 1e-12)
        dist = _mean_over(torch.relu(error - self.dist_threshold_m), keep)
        total = self.loc_weight * loc + self.dist_weight * dist
        if self.legal_grid is not None:
            total = total + self.map_weight * _mean_over(self.map_penalty(pred_m[:, :2]), keep)
        return total

    def map_penalty(self, points: torch.Tensor) -> torch.Tensor:
        """points [..., 2] metres (x, y) -> penalty [...] (eqs. 11-13 of appendix A.1, made smooth).

        dist = distance to the nearest legal cell, bilinearly interpolated from the half-cell
        lattice table (``legal_tables``): exactly 0 anywhere in a legal cell, exact at lattice
        points, piecewise bilinear between them, so its gradient points away from the legal area
        and descending it walks back in. Then:

        * legal: 0 (eq. 12);
        * illegal, inside the map: exp(alpha * dist) - 1 (eq. 13); beyond the distance where it
          reaches out_of_map_penalty it continues along its tangent (no overflow, still a gradient);
        * outside the map: out_of_map_penalty (P_max, eq. 11) plus the same function of (dist at
          the nearest map point + distance to the map): a constant alone gives no way back.
        """
        rows, cols = self.distance.shape
        half = 0.5 * self.cell_m
        lattice = (points - self.origin) / half  # continuous (col, row) lattice coordinates
        size = torch.tensor([cols - 1, rows - 1], dtype=points.dtype, device=points.device)
        inside = torch.minimum(lattice.clamp_min(0.0), size)
        outside = (lattice != inside).any(-1)
        beyond_m = torch.linalg.vector_norm(lattice - inside, dim=-1) * half
        dist = _bilinear(self.distance, inside) + beyond_m
        penalty = _capped_exp(self.map_alpha * dist, self.out_of_map_penalty)
        return penalty + self.out_of_map_penalty * outside.to(points.dtype)


def legal_tables(legal_grid: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The JSON floor plan -> (distance [2H + 1, 2W + 1] metres, origin [2], cell_m []).

    The table samples the distance to the legal area (the union of the legal cells, closed) on
    the lattice of cell corners, edge midpoints and centres (spacing c / 2). A lattice point is
    legal when it lies on a legal cell; the Euclidean distance transform over the lattice is then
    exact, because the nearest point of an axis-aligned union of cells (a corner, or the foot of
    a perpendicular on an edge) is itself a lattice point. A wall one cell thick still gets a
    positive penalty in its middle, which a table at cell centres or corners alone would miss."""
    unknown = sorted(set(legal_grid) - {"grid", "origin", "cell_m"})
    if unknown:
        raise ValueError(f"unknown legal_grid keys: {', '.join(unknown)}")
    legal = np.asarray(legal_grid["grid"], dtype=bool)
    cell = float(legal_grid["cell_m"])
    origin = np.asarray(legal_grid["origin"], dtype=np.float32)
    if legal.ndim != 2 or not legal.any():
        raise ValueError("legal_grid['grid'] must be a 2-D grid with at least one legal (1) cell")
    if cell <= 0 or origin.shape != (2,):
        raise ValueError("legal_grid needs cell_m > 0 and origin [x0, y0]")
    rows, cols = legal.shape
    on_legal = np.zeros((2 * rows + 1, 2 * cols + 1), dtype=bool)
    for dr in range(3):  # cell (r, c) owns lattice rows 2r..2r+2 and columns 2c..2c+2
        for dc in range(3):
            on_legal[dr:dr + 2 * rows:2, dc:dc + 2 * cols:2] |= legal
    distance = ndimage.distance_transform_edt(~on_legal) * (0.5 * cell)
    return (torch.from_numpy(distance.astype(np.float32)), torch.from_numpy(origin),
            torch.tensor(cell, dtype=torch.float32))


def _bilinear(table: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """table [H, W] sampled at continuous (col, row) xy [..., 2] (index units, clamped to the
    table) -> [...], differentiable in xy."""
    height, width = table.shape
    x = xy[..., 0].clamp(0.0, width - 1.0)
    y = xy[..., 1].clamp(0.0, height - 1.0)
    x0 = x.floor().clamp(max=max(width - 2, 0)).long()
    y0 = y.floor().clamp(max=max(height - 2, 0)).long()
    x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)
    fx, fy = x - x0.to(x.dtype), y - y0.to(y.dtype)
    top = table[y0, x0] * (1 - fx) + table[y0, x1] * fx
    bottom = table[y1, x0] * (1 - fx) + table[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _capped_exp(z: torch.Tensor, cap: float) -> torch.Tensor:
    """exp(z) - 1 up to where it reaches ``cap``, then its tangent line (value and slope continuous)."""
    knee = math.log1p(cap)
    return torch.where(z <= knee, torch.expm1(z.clamp(max=knee)), cap + (1.0 + cap) * (z - knee))


def _mean_over(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of values [B] over keep [B] bool; 0 (still attached) when nothing is kept."""
    weight = keep.to(values.dtype)
    return (torch.where(keep, values, torch.zeros_like(values)) * weight).sum() / weight.sum().clamp_min(1.0)
