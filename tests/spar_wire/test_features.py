import numpy as np
import pytest

from spar_wire.errors import WireError
from spar_wire.feature_config import PRESETS
from spar_wire.features import (
    compute_token_image,
    extract_tokens,
    patch_positions,
    patchify,
    unpatchify,
)


def tone(cfg, freq_hz, amplitude=1.0, seed=0, noise=1e-4):
    t = np.arange(cfg.window_samples) / cfg.sample_rate_hz
    rng = np.random.default_rng(seed)
    x = amplitude * np.sin(2 * np.pi * freq_hz * t)
    return np.tile(x, (cfg.channels, 1)) + noise * rng.standard_normal((cfg.channels, t.size))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_tokens_have_the_configured_shape(name):
    cfg = PRESETS[name]
    tokens = extract_tokens(tone(cfg, cfg.nyquist_hz / 4), cfg)
    assert tokens.shape == (cfg.n_tokens, cfg.token_dim)
    assert tokens.dtype == np.float32 and np.all(np.isfinite(tokens))


@pytest.mark.parametrize("freq_hz", [12.5, 40.0, 75.0])
def test_stft_peak_lies_in_the_tone_bin(freq_hz):
    cfg = PRESETS["parking_lot_geophone"]
    image = compute_token_image(tone(cfg, freq_hz), cfg)
    lo, _ = cfg.stft_bin_range
    peak_row = int(image.mean(axis=1).argmax())
    resolution = cfg.sample_rate_hz / cfg.n_fft
    assert abs((peak_row + lo) * resolution - freq_hz) <= resolution / 2


def test_mel_peak_moves_up_with_frequency():
    cfg = PRESETS["parking_lot_microphone"]
    rows = [int(compute_token_image(tone(cfg, f), cfg).mean(axis=1).argmax()) for f in (200, 1000, 4000)]
    assert rows[0] < rows[1] < rows[2]


def test_doubling_amplitude_adds_six_db():
    cfg = PRESETS["parking_lot_geophone"]
    quiet = compute_token_image(tone(cfg, 40.0, 1.0), cfg).max()
    loud = compute_token_image(tone(cfg, 40.0, 2.0), cfg).max()
    assert loud - quiet == pytest.approx(20 * np.log10(2), abs=0.05)


def test_bandpass_suppresses_out_of_band_energy():
    # 2-35 Hz band-pass; keep rows up to 50 Hz uncropped to look at 45 Hz.
    cfg = PRESETS["ridgecrest_seismic"].replace(fmax_hz=50.0, patch_freq=1)
    no_filter = cfg.replace(bandpass_hz=None)
    row = int(round(45.0 / (cfg.sample_rate_hz / cfg.n_fft))) - cfg.stft_bin_range[0]
    out_of_band = tone(cfg, 45.0, noise=0.0)
    drop = (compute_token_image(out_of_band, no_filter)[row].mean()
            - compute_token_image(out_of_band, cfg)[row].mean())
    assert drop > 20.0
    in_band = tone(cfg, 10.0, noise=0.0)
    row10 = int(round(10.0 / (cfg.sample_rate_hz / cfg.n_fft))) - cfg.stft_bin_range[0]
    kept = (compute_token_image(in_band, no_filter)[row10].mean()
            - compute_token_image(in_band, cfg)[row10].mean())
    assert abs(kept) < 1.0


def test_detrend_removes_an_offset():
    cfg = PRESETS["parking_lot_geophone"]
    base = compute_token_image(tone(cfg, 40.0), cfg)
    shifted = compute_token_image(tone(cfg, 40.0) + 5.0, cfg)
    np.testing.assert_allclose(base, shifted, atol=1e-3)


def test_channels_are_stacked_along_rows():
    cfg = PRESETS["har_imu"]
    x = tone(cfg, 5.0)
    x[1] *= 0.0  # silence channel 1
    image = compute_token_image(x, cfg)
    rows = cfg.freq_rows
    assert image[rows:2 * rows].max() < image[:rows].max() - 40


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_patchify_round_trip_and_positions(name):
    cfg = PRESETS[name]
    image = np.arange(np.prod(cfg.image_shape), dtype=np.float32).reshape(cfg.image_shape)
    tokens = patchify(image, cfg)
    np.testing.assert_array_equal(unpatchify(tokens, cfg), image)
    positions = patch_positions(cfg)
    assert positions.shape == (cfg.n_tokens, 2)
    # Token 0 is the top-left patch of channel 0: its first value is image[0, 0].
    assert tokens[0, 0] == image[0, 0]
    # Token 1 is the next patch in time: it starts at column patch_time.
    assert tokens[1, 0] == image[0, cfg.patch_time]
    assert tuple(positions[1]) == (0, 1)


def test_bad_samples_raise_wire_error():
    cfg = PRESETS["har_imu"]
    with pytest.raises(WireError, match="shape"):
        compute_token_image(np.zeros((3, 10)), cfg)
    bad = tone(cfg, 5.0)
    bad[0, 3] = np.nan
    with pytest.raises(WireError, match="NaN"):
        compute_token_image(bad, cfg)
    with pytest.raises(WireError):
        patchify(np.zeros((3, 3)), cfg)


def test_one_dimensional_input_for_single_channel():
    cfg = PRESETS["parking_lot_geophone"]
    x = tone(cfg, 30.0)
    np.testing.assert_array_equal(compute_token_image(x[0], cfg), compute_token_image(x, cfg))


def test_digital_silence_is_finite():
    cfg = PRESETS["parking_lot_microphone"]
    image = compute_token_image(np.zeros((1, cfg.window_samples)), cfg)
    assert np.all(np.isfinite(image))


def test_detrend_matches_scipy():
    from scipy import signal

    from spar_wire.features import _detrend_linear

    x = np.random.default_rng(3).standard_normal((3, 500)) + np.linspace(0, 7, 500)
    np.testing.assert_allclose(_detrend_linear(x), signal.detrend(x, axis=-1), atol=1e-10)
