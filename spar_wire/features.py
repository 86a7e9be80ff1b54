"""Raw samples -> token image -> tokens. The one code path for training data and live nodes.

Pipeline for one node, one modality, one window::

    samples[C, S] --compute_token_image--> image[C*F, T] float32 (dB)
                  --patchify-------------> tokens[m, D]

The token image is what travels on the wire (quantized to uint8 and compressed); patching is a
pure reshape of it, so image codecs see the 2-D spectrogram and its spatial correlation.

For Wi-Fi CSI (``transform = "subcarrier_db"``) the samples are already per frequency: C = K
subcarrier amplitudes over S packets, and the image is [K, T] with no channel stacking.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import signal as sp_signal

from spar_wire.errors import WireError
from spar_wire.feature_config import FeatureConfig


def compute_token_image(samples: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Log-power time-frequency image of one window.

    Args:
        samples: [C, S] raw samples (C = cfg.channels, S = cfg.window_samples); a 1-D array
            is accepted when C == 1.
    Returns:
        [C * cfg.freq_rows, cfg.time_cols] float32 in dB, channels stacked along rows
        ([cfg.freq_rows, cfg.time_cols] for subcarrier_db, see :func:`subcarrier_db_image`).
    """
    x = _check_samples(samples, cfg)
    if cfg.transform == "subcarrier_db":
        return subcarrier_db_image(x, cfg)
    if cfg.detrend:
        x = _detrend_linear(x)
    if cfg.bandpass_hz is not None:
        x = sp_signal.sosfiltfilt(_bandpass_sos(cfg), x, axis=-1)
    power = _power_spectrogram(x, cfg)  # [C, n_fft//2+1, n_frames]
    if cfg.transform == "logmel":
        rows = _mel_filterbank(cfg) @ power  # [M, F] @ [C, F, T] -> [C, M, T]
    else:
        lo, hi = cfg.stft_bin_range
        rows = power[:, lo:hi, :]
    rows = rows[:, : cfg.freq_rows, : cfg.time_cols]
    image = 10.0 * np.log10(np.maximum(rows, 10.0 ** (cfg.power_floor_db / 10.0)))
    return image.reshape(cfg.image_shape).astype(np.float32)


def subcarrier_db_image(amplitudes: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """CSI amplitudes [K, S] (K subcarriers, S packets, linear) -> [cfg.freq_rows, cfg.time_cols]
    float32: 20 log10 of the mean magnitude |x| of each run of ``hop`` packets (CSI amplitudes are
    >= 0 already; the magnitude makes any signed input well defined).

    Averaging amplitude (not dB) before the log keeps a deep fade on one packet from dominating
    a frame; the floor ``power_floor_db`` keeps an all-zero frame finite.
    """
    rows, cols, hop = cfg.freq_rows, cfg.time_cols, cfg.hop
    frames = np.abs(amplitudes[:rows, : cols * hop]).reshape(rows, cols, hop).mean(axis=-1)
    image = 20.0 * np.log10(np.maximum(frames, 10.0 ** (cfg.power_floor_db / 20.0)))
    return image.astype(np.float32)


def patchify(image: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Cut a token image into tokens.

    Args:
        image: [C * F, T] token image (any dtype).
    Returns:
        [m, D] tokens, m = cfg.n_tokens in frequency-major order (row of patches, then column),
        D = C * patch_freq * patch_time with the channel as the slowest axis (C =
        cfg.image_channels: 1 for subcarrier_db).
    """
    if image.shape != cfg.image_shape:
        raise WireError("shape_mismatch", f"token image {image.shape} != {cfg.image_shape}")
    c, pf, pt = cfg.image_channels, cfg.patch_freq, cfg.patch_time
    gf, gt = cfg.patch_grid
    x = image.reshape(c, gf, pf, gt, pt).transpose(1, 3, 0, 2, 4)
    return x.reshape(gf * gt, c * pf * pt)


def unpatchify(tokens: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Inverse of :func:`patchify`: tokens [m, D] -> token image [C * F, T]."""
    if tokens.shape != (cfg.n_tokens, cfg.token_dim):
        raise WireError("shape_mismatch", f"tokens {tokens.shape} != {(cfg.n_tokens, cfg.token_dim)}")
    c, pf, pt = cfg.image_channels, cfg.patch_freq, cfg.patch_time
    gf, gt = cfg.patch_grid
    x = tokens.reshape(gf, gt, c, pf, pt).transpose(2, 0, 3, 1, 4)
    return x.reshape(cfg.image_shape)


def patch_positions(cfg: FeatureConfig) -> np.ndarray:
    """[m, 2] int64 (frequency patch index, time patch index) of each token, for 2-D patch
    position embeddings inside the spectrogram."""
    gf, gt = cfg.patch_grid
    f_idx, t_idx = np.meshgrid(np.arange(gf), np.arange(gt), indexing="ij")
    return np.stack([f_idx.ravel(), t_idx.ravel()], axis=1)


def extract_tokens(samples: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """samples [C, S] -> tokens [m, D] float32 (no quantization, no codec)."""
    return patchify(compute_token_image(samples, cfg), cfg)


# --------------------------------------------------------------------------- internals
def _check_samples(samples: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1 and cfg.channels == 1:
        x = x[None, :]
    expected = (cfg.channels, cfg.window_samples)
    if x.shape != expected:
        raise WireError("bad_samples", f"samples have shape {x.shape}, expected {expected}")
    if not np.all(np.isfinite(x)):
        raise WireError("bad_samples", "samples contain NaN or infinity")
    return x


def _detrend_linear(x: np.ndarray) -> np.ndarray:
    """Remove each row's least-squares line. [C, S] -> [C, S] (closed form: ~10x scipy's lstsq)."""
    t = np.arange(x.shape[-1], dtype=np.float64)
    t -= t.mean()
    centred = x - x.mean(axis=-1, keepdims=True)
    slope = centred @ t / (t @ t) if t.size > 1 else np.zeros(x.shape[0])
    return centred - slope[:, None] * t[None, :]


def _power_spectrogram(x: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """[C, S] -> [C, n_fft//2+1, n_frames] power, frames centred on hop-spaced instants."""
    pad_total = cfg.n_fft - cfg.hop
    pad_left = pad_total // 2
    # Reflect padding avoids the artificial edge a zero pad would add to the first frame.
    mode = "reflect" if x.shape[-1] > pad_total else "constant"
    padded = np.pad(x, ((0, 0), (pad_left, pad_total - pad_left)), mode=mode)
    frames = np.lib.stride_tricks.sliding_window_view(padded, cfg.n_fft, axis=-1)
    frames = frames[:, :: cfg.hop][:, : cfg.n_frames]  # [C, n_frames, n_fft]
    window = _hann(cfg.n_fft)
    spectrum = np.fft.rfft(frames * window, axis=-1)
    # Normalise so a full-scale sine's peak bin does not depend on n_fft.
    power = (np.abs(spectrum) ** 2) / (window.sum() ** 2)
    return power.transpose(0, 2, 1)


@lru_cache(maxsize=32)
def _hann(n: int) -> np.ndarray:
    return np.hanning(n + 1)[:-1]  # periodic Hann, the usual STFT choice


@lru_cache(maxsize=32)
def _bandpass_sos(cfg: FeatureConfig) -> np.ndarray:
    assert cfg.bandpass_hz is not None
    return sp_signal.butter(
        cfg.bandpass_order, cfg.bandpass_hz, btype="bandpass", fs=cfg.sample_rate_hz, output="sos"
    )


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


@lru_cache(maxsize=32)
def _mel_filterbank(cfg: FeatureConfig) -> np.ndarray:
    """[n_mels, n_fft//2+1] triangular HTK-mel filters with unit peak."""
    fmax = cfg.nyquist_hz if cfg.fmax_hz is None else cfg.fmax_hz
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(cfg.fmin_hz), _hz_to_mel(fmax), cfg.n_mels + 2))
    bins_hz = np.fft.rfftfreq(cfg.n_fft, d=1.0 / cfg.sample_rate_hz)
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bins_hz[None, :] - lower) / (centre - lower)
    falling = (upper - bins_hz[None, :]) / (upper - centre)
    bank = np.clip(np.minimum(rising, falling), 0.0, None)
    # A narrow low band can fall between FFT bins; give it its nearest bin so no row is empty.
    for row, freq in enumerate(edges_hz[1:-1]):
        if not bank[row].any():
            bank[row, int(np.argmin(np.abs(bins_hz - freq)))] = 1.0
    return bank
