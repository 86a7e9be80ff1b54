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


# --------------------------------------------------------------------------- subcarrier_db (Wi-Fi CSI)
def test_subcarrier_db_preset_shape_and_token_grid():
    cfg = PRESETS["indoor_csi"]
    assert cfg.transform == "subcarrier_db" and cfg.channels == 32 and cfg.window_samples == 100
    # channels are the frequency rows: no stacking, D = patch_freq * patch_time
    assert cfg.image_channels == 1 and cfg.freq_rows == 32 and cfg.image_shape == (32, 25)
    assert cfg.patch_grid == (4, 5) and (cfg.n_tokens, cfg.token_dim) == (20, 40)
    image = compute_token_image(np.full((32, 100), 0.01), cfg)
    assert image.shape == (32, 25) and image.dtype == np.float32
    np.testing.assert_allclose(image, -40.0, atol=1e-4)  # 20 log10(0.01)


def test_subcarrier_db_averages_amplitude_over_hop_packets():
    cfg = PRESETS["indoor_csi"]  # hop = 4 packets per frame
    x = np.ones((32, 100))
    x[5, :4] = [1.0, 3.0, 1.0, 3.0]  # mean amplitude 2 -> 6.02 dB (the mean of dB would be 4.77)
    x[7] = 10.0 ** (np.repeat(np.arange(25), 4) / 20.0)  # frame j at exactly j dB
    x[9, 8:12] = 0.0  # a silent frame hits the floor instead of -inf
    image = compute_token_image(x, cfg)
    assert image[5, 0] == pytest.approx(20 * np.log10(2.0), abs=1e-5)
    np.testing.assert_allclose(image[7], np.arange(25), atol=1e-4)
    assert image[9, 2] == pytest.approx(cfg.power_floor_db)
    assert np.count_nonzero(image) == 1 + 24 + 1  # everything else is 0 dB
    np.testing.assert_array_equal(compute_token_image(-x, cfg), image)  # magnitude of signed input


def test_subcarrier_db_tokens_are_subcarrier_group_by_time_patches():
    cfg = PRESETS["indoor_csi"]
    image = np.arange(32 * 25, dtype=np.float32).reshape(32, 25)
    tokens = patchify(image, cfg)
    assert tokens.shape == (20, 40)
    np.testing.assert_array_equal(tokens[0], image[0:8, 0:5].ravel())
    np.testing.assert_array_equal(tokens[1], image[0:8, 5:10].ravel())  # frequency-major order
    np.testing.assert_array_equal(tokens[5], image[8:16, 0:5].ravel())
    np.testing.assert_array_equal(unpatchify(tokens, cfg), image)
    assert patch_positions(cfg)[7].tolist() == [1, 2]


def test_subcarrier_db_crops_subcarriers_to_whole_patches():
    cfg = PRESETS["indoor_csi"].replace(channels=30)  # Intel 5300-style 30 groups: 3 patches of 8
    assert cfg.image_shape == (24, 25) and cfg.patch_grid == (3, 5)
    x = np.ones((30, 100))
    x[24:] = 0.5  # the cropped subcarriers do not reach the image
    np.testing.assert_allclose(compute_token_image(x, cfg), 0.0, atol=1e-6)


@pytest.mark.parametrize("changes, field", [
    ({"detrend": True}, "detrend"),
    ({"bandpass_hz": (1.0, 10.0)}, "bandpass_hz"),
    ({"hop": 101}, "hop"),
    ({"patch_freq": 33}, "patch_freq"),
])
def test_subcarrier_db_rejects_settings_that_lose_the_level_or_the_grid(changes, field):
    with pytest.raises(WireError, match=field):
        PRESETS["indoor_csi"].replace(**changes)


def test_subcarrier_db_ignores_the_fft_size():
    cfg = PRESETS["indoor_csi"]
    assert cfg.replace(n_fft=1024).image_shape == cfg.image_shape  # no STFT: n_fft plays no part


@pytest.mark.parametrize("codec", ["png", "jpeg:90", "jpeg:50", "webp:90", "webp:lossless"])
def test_csi_token_images_survive_quantization_and_the_image_codecs(codec):
    from spar_wire.codecs import CodecSpec
    from spar_wire.message import measure_roundtrip

    cfg = PRESETS["indoor_csi"]
    rng = np.random.default_rng(0)
    # a smooth frequency-selective profile that fades over time, -60..-80 dB
    k, t = np.arange(32)[:, None], np.arange(100)[None, :]
    amplitude = 10 ** ((-70 + 6 * np.sin(k / 4 + t / 20) + rng.normal(0, 0.5, (32, 100))) / 20)
    image = compute_token_image(amplitude, cfg)
    result = measure_roundtrip(image, cfg, CodecSpec.parse(codec))
    if codec in ("png", "webp:lossless"):  # exact up to the uint8 step
        assert result.max_abs_error <= (image.max() - image.min()) / 255 / 2 + 1e-3
    else:  # lossy, but within a dB or so on a 20 dB range
        assert result.rmse <= 1.5
    assert result.payload_bytes < image.size  # compressed below one byte per value


# Pinned before subcarrier_db existed: adding the transform must not move any existing preset.
_PRE_CSI_PRESETS = {  # name: (hash, image_shape, n_tokens, token_dim)
    "parking_lot_microphone": ("dace08dddfa4ecdf", (64, 64), 32, 128),
    "parking_lot_geophone": ("b1614c8eca678997", (32, 16), 16, 32),
    "ridgecrest_seismic": ("a372d492084a2c0f", (120, 48), 30, 192),
    "har_imu": ("971fab294e997d3d", (48, 20), 16, 60),
}


@pytest.mark.parametrize("name", sorted(_PRE_CSI_PRESETS))
def test_existing_presets_keep_hash_and_shapes(name):
    cfg = PRESETS[name]
    digest, shape, m, d = _PRE_CSI_PRESETS[name]
    assert (cfg.hash, cfg.image_shape, cfg.n_tokens, cfg.token_dim) == (digest, shape, m, d)
    assert cfg.image_channels == cfg.channels
