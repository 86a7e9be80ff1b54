"""Earthquake hypocentre head (SPAR appendix E.3: a two-layer transformer trained with MSE)."""

from __future__ import annotations

from train.heads.localizer import PooledRegressor


class QuakeLocalizer(PooledRegressor):
    """Two transformer blocks, masked mean-pool, Linear -> [B, 3] = (x, y, depth) normalised.

    ``PositionFrame`` shifts only the layout's own dims (x, y for a 2-D station layout) and merely
    scales depth, so the depth output is depth / layout scale; ``predict`` returns metres (or
    whatever unit the layout was given in, e.g. km for Ridgecrest).
    """

    task = "quake"

    def __init__(self, d: int, out_dims: int = 3, layers: int = 2, heads: int = 4, **kwargs):
        super().__init__(d, out_dims, heads=heads, layers=layers, **kwargs)
