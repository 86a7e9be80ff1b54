"""A deterministic test source: one sine per node and channel plus a little noise.

Used by the walking skeleton to prove the seams before the physics scenarios exist. Each node gets
its own frequency, so a receiver can tell from the tokens which node a window came from.
"""

from __future__ import annotations

import zlib

import numpy as np

from spar_wire.feature_config import FeatureConfig


def node_tone_hz(node_id: str, cfg: FeatureConfig) -> float:
    """A stable tone for ``node_id`` between 10 % and 40 % of the Nyquist frequency."""
    fraction = (zlib.crc32(node_id.encode()) % 1000) / 1000.0
    return cfg.nyquist_hz * (0.1 + 0.3 * fraction)


def sine_window(cfg: FeatureConfig, node_id: str, start_s: float, seed: int = 0,
                noise: float = 0.01) -> np.ndarray:
    """Samples of one window.

    Returns:
        [cfg.channels, cfg.window_samples] float64; channel c is a sine at
        node_tone_hz * (1 + c / 10), continuous across windows given ``start_s``.
    """
    t = start_s + np.arange(cfg.window_samples) / cfg.sample_rate_hz
    base = node_tone_hz(node_id, cfg)
    freqs = base * (1.0 + np.arange(cfg.channels)[:, None] / 10.0)
    rng = np.random.default_rng([seed, zlib.crc32(node_id.encode()), int(start_s * 1000)])
    return np.sin(2 * np.pi * freqs * t[None, :]) + noise * rng.standard_normal((cfg.channels, t.size))
