"""Feature configuration per modality: how raw samples become a token image.

A ``FeatureConfig`` fixes everything between raw samples and tokens: window length, the
time-frequency transform (linear STFT or log-mel), band-pass, frequency selection, patching
into m tokens of dimension D, and the uint8 quantization rule. Its ``hash`` is stable across
processes and machines; messages and model manifests carry it so a model never sees features
computed differently from the ones it was trained on.

Wi-Fi CSI is already a frequency axis: ``transform = "subcarrier_db"`` takes samples [K, S] (the
amplitude of K subcarriers, "channels", over S packets) and makes the image [K, T] of 20 log10 of
the mean amplitude over each ``hop`` packets. Its channels fold into the image rows (subcarrier =
row), so the token grid is (subcarrier groups) x (time patches) and D = patch_freq * patch_time;
``n_fft``, ``n_mels``, ``fmin_hz`` and ``fmax_hz`` play no part.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from spar_wire.errors import WireError
from spar_wire.numbers import is_finite_vector

TRANSFORMS = ("stft", "logmel", "subcarrier_db")
QUANT_MODES = ("window", "fixed")


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate_hz: float  # samples per second of every channel
    channels: int  # channels per node for this modality (1 mic, 3 for a 3-axis sensor)
    window_s: float  # window length; window_s * sample_rate_hz must be a whole number
    transform: str = "stft"  # "stft" (linear bins), "logmel" (mel filterbank) or "subcarrier_db" (CSI)
    n_fft: int = 256  # FFT size in samples (Hann window of the same length)
    hop: int = 128  # hop between frames in samples (packets for CSI); frames per window = samples // hop
    n_mels: int = 64  # mel bands (logmel only)
    fmin_hz: float = 0.0  # lowest frequency kept (STFT bins / lowest mel edge)
    fmax_hz: float | None = None  # highest frequency (exclusive for STFT bins); None = Nyquist
    bandpass_hz: tuple[float, float] | None = None  # zero-phase Butterworth band-pass first
    bandpass_order: int = 4
    detrend: bool = True  # remove the linear trend of each channel before filtering
    # Power below this is clipped before the log: keeps digital silence finite. Low enough for
    # any sensor unit (a geophone's ground noise in m/s sits near -170 dB re 1 (m/s)^2).
    power_floor_db: float = -200.0
    patch_freq: int = 8  # patch height in frequency rows
    patch_time: int = 8  # patch width in frames
    quant_mode: str = "window"  # "window": range from each window; "fixed": quant_range_db
    dynamic_range_db: float = 80.0  # window mode: values below max - this are clipped
    quant_range_db: tuple[float, float] = (-120.0, 20.0)  # fixed mode: dB mapped to 0..255

    def __post_init__(self) -> None:
        for name in ("bandpass_hz", "quant_range_db"):
            value = getattr(self, name)
            if isinstance(value, list):  # TOML gives lists; keep the dataclass hashable
                object.__setattr__(self, name, tuple(value))
        _validate(self)

    # ----------------------------------------------------------------- derived sizes
    @property
    def window_samples(self) -> int:
        """Samples per channel in one window."""
        return int(round(self.window_s * self.sample_rate_hz))

    @property
    def n_frames(self) -> int:
        """Frames the transform produces per window (before cropping to whole patches)."""
        return self.window_samples // self.hop

    @property
    def n_freq(self) -> int:
        """Frequency rows per channel before cropping to whole patches."""
        if self.transform == "logmel":
            return self.n_mels
        if self.transform == "subcarrier_db":
            return self.channels
        lo, hi = self.stft_bin_range
        return hi - lo

    @property
    def stft_bin_range(self) -> tuple[int, int]:
        """[lo, hi) indices of the rfft bins kept by fmin_hz/fmax_hz (STFT transform)."""
        resolution = self.sample_rate_hz / self.n_fft
        fmax = self.nyquist_hz if self.fmax_hz is None else self.fmax_hz
        lo = math.ceil(self.fmin_hz / resolution - 1e-9)
        hi = min(math.ceil(fmax / resolution - 1e-9), self.n_fft // 2 + 1)
        return lo, hi

    @property
    def nyquist_hz(self) -> float:
        return self.sample_rate_hz / 2.0

    @property
    def freq_rows(self) -> int:
        """Frequency rows per channel in the token image (whole patches only)."""
        return (self.n_freq // self.patch_freq) * self.patch_freq

    @property
    def time_cols(self) -> int:
        """Frames in the token image (whole patches only)."""
        return (self.n_frames // self.patch_time) * self.patch_time

    @property
    def image_channels(self) -> int:
        """Channel blocks stacked along the image rows: ``channels``, except 1 for subcarrier_db
        (there the channels are the frequency rows themselves)."""
        return 1 if self.transform == "subcarrier_db" else self.channels

    @property
    def image_shape(self) -> tuple[int, int]:
        """Shape (H, W) of the token image: channels stacked along frequency, frames along W."""
        return self.image_channels * self.freq_rows, self.time_cols

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patches along (frequency, time)."""
        return self.freq_rows // self.patch_freq, self.time_cols // self.patch_time

    @property
    def n_tokens(self) -> int:
        """m: tokens per node and window."""
        rows, cols = self.patch_grid
        return rows * cols

    @property
    def token_dim(self) -> int:
        """D: values per token (all channels of one patch)."""
        return self.image_channels * self.patch_freq * self.patch_time

    # ----------------------------------------------------------------- identity
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (tuples as lists)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "feature config") -> FeatureConfig:
        """Build from a dict, rejecting unknown keys with a message naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise WireError(
                "bad_feature_config",
                f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
            )
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise WireError("bad_feature_config", f"{where}: missing field(s) {', '.join(missing)}")
        return cls(**data)

    @property
    def hash(self) -> str:
        """Stable 16-hex-digit identity of this config (first 8 bytes of a SHA-256)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def replace(self, **changes: Any) -> FeatureConfig:
        return dataclasses.replace(self, **changes)


def _fail(field: str, message: str) -> WireError:
    return WireError("bad_feature_config", f"field '{field}': {message}")


def _check_type(cfg: FeatureConfig, name: str, kinds: tuple[type, ...]) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) and bool not in kinds:
        raise _fail(name, f"expected a number, got {value!r}")
    if not isinstance(value, kinds):
        raise _fail(name, f"expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")


def _validate(cfg: FeatureConfig) -> None:
    for name in ("sample_rate_hz", "window_s", "fmin_hz", "dynamic_range_db", "power_floor_db"):
        _check_type(cfg, name, (int, float))
        if not math.isfinite(getattr(cfg, name)):
            raise _fail(name, "must be finite")
    for name in ("channels", "n_fft", "hop", "n_mels", "patch_freq", "patch_time", "bandpass_order"):
        _check_type(cfg, name, (int,))
        if getattr(cfg, name) < 1:
            raise _fail(name, f"must be >= 1, got {getattr(cfg, name)}")
    _check_type(cfg, "detrend", (bool,))
    if cfg.sample_rate_hz <= 0:
        raise _fail("sample_rate_hz", f"must be > 0, got {cfg.sample_rate_hz}")
    if cfg.window_s <= 0:
        raise _fail("window_s", f"must be > 0, got {cfg.window_s}")
    if cfg.window_s * cfg.sample_rate_hz > 1e8:
        raise _fail("window_s", "more than 1e8 samples per window")
    if abs(cfg.window_s * cfg.sample_rate_hz - cfg.window_samples) > 1e-6:
        raise _fail("window_s", "window_s * sample_rate_hz must be a whole number of samples")
    if cfg.transform not in TRANSFORMS:
        raise _fail("transform", f"must be one of {TRANSFORMS}, got {cfg.transform!r}")
    if cfg.transform == "subcarrier_db":
        _validate_subcarrier_db(cfg)
    else:
        if cfg.hop > cfg.n_fft:
            raise _fail("hop", f"must be <= n_fft ({cfg.n_fft}), got {cfg.hop}")
        if cfg.n_fft > cfg.window_samples:
            raise _fail("n_fft", f"must be <= samples per window ({cfg.window_samples})")
    _validate_frequencies(cfg)
    _validate_quantization(cfg)
    if cfg.freq_rows == 0:
        raise _fail("patch_freq", f"{cfg.patch_freq} is larger than the {cfg.n_freq} frequency rows")
    if cfg.time_cols == 0:
        raise _fail("patch_time", f"{cfg.patch_time} is larger than the {cfg.n_frames} frames")
    if max(cfg.image_shape) > 65535:
        raise _fail("n_fft", f"token image {cfg.image_shape} exceeds 65535 on a side")


def _validate_subcarrier_db(cfg: FeatureConfig) -> None:
    # The mean amplitude level is the information (path loss, walls): a detrend or a band-pass
    # across packets would remove it.
    if cfg.detrend:
        raise _fail("detrend", "must be false for subcarrier_db (it would remove the amplitude level)")
    if cfg.bandpass_hz is not None:
        raise _fail("bandpass_hz", "must be unset for subcarrier_db (amplitudes are averaged, not filtered)")
    if cfg.hop > cfg.window_samples:
        raise _fail("hop", f"must be <= packets per window ({cfg.window_samples}), got {cfg.hop}")


def _validate_frequencies(cfg: FeatureConfig) -> None:
    if cfg.fmin_hz < 0:
        raise _fail("fmin_hz", f"must be >= 0, got {cfg.fmin_hz}")
    if cfg.fmax_hz is not None:
        _check_type(cfg, "fmax_hz", (int, float))
        if not (cfg.fmin_hz < cfg.fmax_hz <= cfg.nyquist_hz):
            raise _fail("fmax_hz", f"must lie in (fmin_hz, Nyquist={cfg.nyquist_hz}], got {cfg.fmax_hz}")
    if cfg.bandpass_hz is not None:
        band = cfg.bandpass_hz
        if not isinstance(band, tuple) or not is_finite_vector(band, (2,)):
            raise _fail("bandpass_hz", f"must be [low, high] in Hz, got {band!r}")
        if not (0 < band[0] < band[1] < cfg.nyquist_hz):
            raise _fail("bandpass_hz", f"need 0 < low < high < Nyquist={cfg.nyquist_hz}, got {band!r}")
    if cfg.transform == "stft":
        lo, hi = cfg.stft_bin_range
        if hi <= lo:
            raise _fail("fmin_hz", "no STFT bin lies between fmin_hz and fmax_hz")


def _validate_quantization(cfg: FeatureConfig) -> None:
    if cfg.quant_mode not in QUANT_MODES:
        raise _fail("quant_mode", f"must be one of {QUANT_MODES}, got {cfg.quant_mode!r}")
    if cfg.dynamic_range_db <= 0:
        raise _fail("dynamic_range_db", f"must be > 0, got {cfg.dynamic_range_db}")
    lo_hi = cfg.quant_range_db
    if not isinstance(lo_hi, tuple) or not is_finite_vector(lo_hi, (2,)):
        raise _fail("quant_range_db", f"must be [low_db, high_db], got {lo_hi!r}")
    if lo_hi[0] >= lo_hi[1]:
        raise _fail("quant_range_db", f"low must be < high, got {lo_hi!r}")


# Defaults follow the papers: 2 s windows in the parking lot (log-mel audio, STFT geophone),
# 30.72 s STFT with a 2-35 Hz band-pass for regional seismic, 4 s at 50 Hz for body IMUs,
# 2 s of 50 packets/s for indoor Wi-Fi CSI (AEMP-like: low packet rates of an ISAC platform).
PRESETS: dict[str, FeatureConfig] = {
    # 16 kHz, 2 s -> 64 mel x 64 frames -> 32 tokens of 8x16 (D=128)
    "parking_lot_microphone": FeatureConfig(
        sample_rate_hz=16000, channels=1, window_s=2.0, transform="logmel", n_fft=1024,
        hop=500, n_mels=64, fmin_hz=20.0, fmax_hz=8000.0, bandpass_hz=None,
        patch_freq=8, patch_time=16,
    ),
    # 200 Hz, 2 s -> 32 bins (0-96.9 Hz) x 16 frames -> 16 tokens of 8x4 (D=32)
    "parking_lot_geophone": FeatureConfig(
        sample_rate_hz=200, channels=1, window_s=2.0, transform="stft", n_fft=64, hop=25,
        fmin_hz=0.0, fmax_hz=100.0, bandpass_hz=None, patch_freq=8, patch_time=4,
    ),
    # 100 Hz, 3 components, 30.72 s, 2-35 Hz -> 40 bins x 48 frames -> 30 tokens (D=192)
    "ridgecrest_seismic": FeatureConfig(
        sample_rate_hz=100, channels=3, window_s=30.72, transform="stft", n_fft=128, hop=64,
        fmin_hz=2.0, fmax_hz=35.0, bandpass_hz=(2.0, 35.0), patch_freq=8, patch_time=8,
    ),
    # 50 Hz, 3 axes, 4 s -> 16 bins x 20 frames -> 16 tokens of 4x5 (D=60)
    "har_imu": FeatureConfig(
        sample_rate_hz=50, channels=3, window_s=4.0, transform="stft", n_fft=32, hop=10,
        fmin_hz=0.0, fmax_hz=25.0, bandpass_hz=None, detrend=False, patch_freq=4, patch_time=5,
    ),
    # Wi-Fi CSI: 50 packets/s, 32 subcarriers, 2 s -> 32 subcarriers x 25 frames of 4 packets
    # -> 20 tokens of 8x5 (grid 4 x 5, D=40). 60 dB per window keeps deep fades above the floor.
    "indoor_csi": FeatureConfig(
        sample_rate_hz=50, channels=32, window_s=2.0, transform="subcarrier_db", n_fft=4, hop=4,
        detrend=False, patch_freq=8, patch_time=5, dynamic_range_db=60.0,
    ),
}


def feature_preset(name: str) -> FeatureConfig:
    """The named preset; ``WireError`` listing the known names when it does not exist."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise WireError(
            "bad_feature_config", f"unknown feature preset {name!r}; known: {', '.join(PRESETS)}"
        ) from None
