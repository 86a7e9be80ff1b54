"""uint8 quantization of token images: value = code * scale + offset.

The scale and offset travel in every message header, so the per-window mode loses no absolute
level: the receiver restores dB values exactly up to the quantization step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spar_wire.errors import WireError
from spar_wire.feature_config import FeatureConfig

_MIN_SCALE = 1e-6  # a flat window still gets a valid (positive) scale


@dataclass(frozen=True)
class QuantizedImage:
    codes: np.ndarray  # [H, W] uint8
    scale: float  # dB per code step, > 0
    offset: float  # dB value of code 0


def quantize(image: np.ndarray, cfg: FeatureConfig) -> QuantizedImage:
    """Float token image [H, W] (dB) -> uint8 codes plus scale/offset per ``cfg.quant_mode``."""
    if not np.all(np.isfinite(image)):
        raise WireError("bad_image", "token image contains NaN or infinity")
    if cfg.quant_mode == "fixed":
        low, high = cfg.quant_range_db
    else:
        high = float(image.max())
        low = max(float(image.min()), high - cfg.dynamic_range_db)
    # Round to float32 first: the header carries float32, and codes must match what it says.
    scale = float(np.float32(max((high - low) / 255.0, _MIN_SCALE)))
    low = float(np.float32(low))
    codes = np.clip(np.rint((image - low) / scale), 0, 255).astype(np.uint8)
    return QuantizedImage(codes=codes, scale=scale, offset=low)


def dequantize(codes: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """uint8 codes [H, W] -> float32 values [H, W]."""
    return codes.astype(np.float32) * np.float32(scale) + np.float32(offset)
