import io

import numpy as np
import pytest
from PIL import Image

from spar_wire.codecs import CODECS, CodecSpec, codec_info, decode_payload, encode_payload
from spar_wire.errors import WireError
from spar_wire.feature_config import PRESETS
from spar_wire.features import compute_token_image
from spar_wire.message import decode_message, encode_message, make_message, measure_roundtrip

CODEC_SPECS = ["raw32", "raw", "png", "jpeg:95", "jpeg:75", "jpeg:50", "webp:95", "webp:75",
               "webp:50", "webp:lossless"]


def sample_image(cfg, seed=0):
    t = np.arange(cfg.window_samples) / cfg.sample_rate_hz
    rng = np.random.default_rng(seed)
    chirp = np.sin(2 * np.pi * (0.05 * cfg.nyquist_hz + 0.1 * cfg.nyquist_hz * t / t[-1]) * t)
    x = np.tile(chirp, (cfg.channels, 1)) + 0.05 * rng.standard_normal((cfg.channels, t.size))
    return compute_token_image(x, cfg)


def decoded_image(image, cfg, spec) -> np.ndarray:
    """``image`` after a trip through a framed message, as the aggregator decodes it."""
    msg = make_message(image, cfg, spec, site="s", node="n", modality="m", window_start_ns=0, seq=0)
    return decode_message(encode_message(msg)).image()


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("text", CODEC_SPECS)
def test_round_trip_every_codec_and_feature_config(preset, text):
    cfg, spec = PRESETS[preset], CodecSpec.parse(text)
    image = sample_image(cfg)
    result = measure_roundtrip(image, cfg, spec)
    step = (image.max() - max(image.min(), image.max() - cfg.dynamic_range_db)) / 255
    if spec.name == "raw32":
        assert result.max_abs_error == 0.0
    elif spec.name == "raw":  # float16 keeps ~3 decimal digits
        assert result.max_abs_error <= np.abs(image).max() * 2**-10
    elif not spec.info.lossy or spec.lossless:
        # exact up to half a uint8 step, once values below the window's dynamic range are raised to
        # its floor (the clipping is the feature config's, not the codec's)
        expected = np.maximum(image, image.max() - cfg.dynamic_range_db)
        assert np.abs(decoded_image(image, cfg, spec) - expected).max() <= step / 2 + 1e-3
    else:  # lossy: bounded, and better quality never much worse
        assert result.rmse < 8 * step + 3.0
    assert result.frame_bytes > result.payload_bytes > 0


def test_quality_trades_bytes_for_error():
    cfg = PRESETS["parking_lot_microphone"]
    image = sample_image(cfg)
    for name in ("jpeg", "webp"):
        hi = measure_roundtrip(image, cfg, CodecSpec(name, 95))
        lo = measure_roundtrip(image, cfg, CodecSpec(name, 50))
        assert lo.payload_bytes < hi.payload_bytes
        assert lo.rmse > hi.rmse


def test_compressed_codecs_are_smaller_than_float():
    cfg = PRESETS["parking_lot_microphone"]
    image = sample_image(cfg)
    raw = measure_roundtrip(image, cfg, CodecSpec("raw32")).frame_bytes
    assert measure_roundtrip(image, cfg, CodecSpec("webp", 75)).frame_bytes < 0.15 * raw


@pytest.mark.parametrize("text, error", [
    ("gif", "unknown codec"), ("jpeg:0", "quality"), ("jpeg:101", "quality"),
    ("jpeg:abc", "option"), ("png:lossless", "lossless"),
])
def test_bad_codec_specs(text, error):
    with pytest.raises(WireError, match=error):
        CodecSpec.parse(text)


def test_labels():
    assert CodecSpec.parse("jpeg:85").label == "jpeg-q85"
    assert CodecSpec.parse("webp:lossless").label == "webp-lossless"
    assert CodecSpec.parse("png").label == "png"


def test_wire_ids_are_unique():
    assert len({info.wire_id for info in CODECS.values()}) == len(CODECS)


def test_decompression_bomb_is_refused_before_inflating():
    # 8000 x 8000 of zeros compresses to a few KB but inflates to 64 MB.
    buffer = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buffer, format="PNG", optimize=True)
    bomb = buffer.getvalue()
    assert len(bomb) < 100_000
    with pytest.raises(WireError) as info:
        decode_payload(bomb, codec_info("png"), (64, 64))
    assert info.value.reason == "size_mismatch"


def test_format_must_match_codec():
    codes = np.zeros((8, 8), dtype=np.uint8)
    png = encode_payload(codes, CodecSpec("png"))
    with pytest.raises(WireError) as info:
        decode_payload(png, codec_info("jpeg"), (8, 8))
    assert info.value.reason == "bad_payload"


def test_float_payload_checks():
    with pytest.raises(WireError, match="bytes"):
        decode_payload(b"\x00" * 10, codec_info("raw32"), (2, 2))
    nan = np.full((2, 2), np.nan, dtype="<f2").tobytes()
    with pytest.raises(WireError) as info:
        decode_payload(nan, codec_info("raw"), (2, 2))
    assert info.value.reason == "non_finite"


def test_image_codecs_need_uint8():
    with pytest.raises(WireError):
        encode_payload(np.zeros((4, 4), dtype=np.float32), CodecSpec("png"))


@pytest.mark.parametrize("text", ["png", "webp:lossless"])
def test_lossless_codecs_raise_values_below_the_dynamic_range_to_its_floor(text):
    """A deep fade (40 dB below the window's range) arrives at the floor of the range, and every other
    value within half a uint8 step: the clip is the only loss."""
    cfg, spec = PRESETS["parking_lot_microphone"], CodecSpec.parse(text)
    image = sample_image(cfg)
    floor = image.max() - cfg.dynamic_range_db
    image[:3, :5] = floor - 40.0
    decoded = decoded_image(image, cfg, spec)
    step = cfg.dynamic_range_db / 255
    np.testing.assert_allclose(decoded[:3, :5], floor, atol=step / 2 + 1e-3)
    assert np.abs(decoded - np.maximum(image, floor)).max() <= step / 2 + 1e-3
