import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spar_wire.codecs import CodecSpec
from spar_wire.errors import WireError
from spar_wire.feature_config import PRESETS
from spar_wire.features import compute_token_image
from spar_wire.message import (
    HEADER_SIZE,
    TokenMessage,
    WireLimits,
    decode_message,
    encode_message,
    make_message,
)

CFG = PRESETS["parking_lot_geophone"]


def window_image(seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(CFG.window_samples) / CFG.sample_rate_hz
    return compute_token_image(np.sin(2 * np.pi * 30 * t)[None] + 0.1 * rng.standard_normal((1, t.size)), CFG)


def valid_frame(codec="webp:80", **overrides):
    fields = dict(site="parking_lot", node="n01", modality="geophone",
                  window_start_ns=1_700_000_000_000_000_000, seq=42)
    fields.update(overrides)
    return encode_message(make_message(window_image(), CFG, CodecSpec.parse(codec), **fields))


def resign(frame: bytes) -> bytes:
    """Recompute the CRC so a mutation reaches the checks behind it."""
    body = frame[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def patch_header(frame: bytes, offset: int, fmt: str, value) -> bytes:
    data = bytearray(frame)
    struct.pack_into(fmt, data, offset, value)
    return resign(bytes(data))


@pytest.mark.parametrize("codec", ["raw32", "raw", "png", "jpeg:85", "webp:85", "webp:lossless"])
def test_round_trip_keeps_every_field(codec):
    frame = valid_frame(codec)
    msg = decode_message(frame)
    assert (msg.site, msg.node, msg.modality, msg.seq) == ("parking_lot", "n01", "geophone", 42)
    assert msg.window_start_ns == 1_700_000_000_000_000_000
    assert msg.feature_hash == CFG.hash
    assert msg.shape == CFG.image_shape
    assert msg.codec == CodecSpec.parse(codec).name
    assert msg.lossless == (codec == "webp:lossless")
    assert msg.key == ("n01", "geophone", 1_700_000_000_000_000_000, 42)
    assert encode_message(msg) == frame  # decode -> encode is the identity


def test_header_is_48_bytes():
    assert HEADER_SIZE == 48


def expect(reason, frame, limits=WireLimits()):
    with pytest.raises(WireError) as info:
        decode_message(frame, limits)
    assert info.value.reason == reason, str(info.value)


def test_rejections_have_precise_reasons():
    frame = valid_frame()
    expect("truncated", frame[:20])
    expect("truncated", frame[:-1])
    expect("trailing_bytes", frame + b"\x00")
    expect("bad_magic", b"XXXX" + frame[4:])
    expect("bad_version", patch_header(frame, 4, "<B", 9))
    expect("bad_crc", frame[:-1] + bytes([frame[-1] ^ 1]))
    expect("oversize", frame, WireLimits(max_message_bytes=len(frame) - 1))
    expect("unknown_codec", patch_header(frame, 5, "<B", 200))
    expect("bad_field", patch_header(frame, 7, "<B", 0x80))
    expect("bad_field", patch_header(frame, 8, "<q", -5))
    expect("non_finite", patch_header(frame, 32, "<f", float("nan")))
    expect("non_finite", patch_header(frame, 36, "<f", float("inf")))
    expect("bad_field", patch_header(frame, 32, "<f", 0.0))
    # Finite but huge: dequantized values would overflow the model's float32 into inf/NaN (found by the fuzzer).
    expect("non_finite", patch_header(frame, 32, "<f", 3.0e38))
    expect("non_finite", patch_header(patch_header(frame, 32, "<f", 1e38), 36, "<f", 3e38))
    expect("non_finite", patch_header(frame, 36, "<f", -2e6))
    expect("bad_shape", patch_header(frame, 28, "<H", 0))
    expect("too_many_pixels", patch_header(patch_header(frame, 28, "<H", 60000), 30, "<H", 60000))
    expect("size_mismatch", patch_header(frame, 28, "<H", CFG.image_shape[0] + 1))
    expect("bad_type", "not bytes")


def test_lossless_flag_only_on_webp():
    frame = valid_frame("jpeg:85")
    expect("bad_field", patch_header(frame, 7, "<B", 0x01))


def test_bad_ids_are_rejected():
    frame = bytearray(valid_frame())
    frame[HEADER_SIZE] = ord("/")  # first byte of the site id
    expect("bad_id", resign(bytes(frame)))
    frame[HEADER_SIZE] = 0xC3  # not ASCII
    expect("bad_id", resign(bytes(frame)))


def test_pixel_limit_applies_before_decoding():
    frame = valid_frame()
    expect("too_many_pixels", frame, WireLimits(max_pixels=CFG.image_shape[0] * CFG.image_shape[1] - 1))


def test_decode_without_image_skips_the_payload():
    frame = bytearray(valid_frame())
    frame[HEADER_SIZE + 30] ^= 0xFF  # inside the payload
    corrupt = resign(bytes(frame))
    msg = decode_message(corrupt, decode_image=False)
    assert msg.node == "n01"


@pytest.mark.parametrize("field, value", [
    ("seq", -1), ("seq", 2**32), ("window_start_ns", -1), ("feature_hash", "zz"),
    ("feature_hash", "00"), ("node", "a/b"), ("node", ""), ("site", "x" * 65), ("codec", "gif"),
    ("scale", float("nan")), ("shape", (0, 4)), ("quality", 101),
])
def test_encode_refuses_fields_the_format_cannot_carry(field, value):
    msg = decode_message(valid_frame())
    fields = {f: getattr(msg, f) for f in TokenMessage.__dataclass_fields__}
    fields[field] = value
    with pytest.raises(WireError):
        encode_message(TokenMessage(**fields))


def test_float_codec_values_beyond_the_limit_are_rejected_on_decode():
    """raw32 carries values without a header bound: the receiver checks them (1e30 squares to inf)."""
    image = window_image()
    image[0, 0] = 1e30
    msg = decode_message(encode_message(make_message(image, CFG, CodecSpec("raw32"), site="s", node="n",
                                                     modality="m", window_start_ns=0, seq=0)))
    with pytest.raises(WireError) as info:
        msg.image()
    assert info.value.reason == "non_finite"


def test_make_message_checks_the_image():
    with pytest.raises(WireError):
        make_message(np.zeros((3, 3), np.float32), CFG, CodecSpec("png"), site="s", node="n",
                     modality="m", window_start_ns=0, seq=0)
    bad = window_image()
    bad[0, 0] = np.nan
    for codec in ("png", "raw"):
        with pytest.raises(WireError):
            make_message(bad, CFG, CodecSpec(codec), site="s", node="n", modality="m",
                         window_start_ns=0, seq=0)


# ----------------------------------------------------------------- property-based fuzzing
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FRAMES = {codec: valid_frame(codec) for codec in ("raw", "png", "jpeg:60", "webp:60", "webp:lossless")}


def only_wire_errors(frame):
    try:
        msg = decode_message(frame, WireLimits(max_message_bytes=1 << 16, max_pixels=1 << 16))
    except WireError as exc:
        assert exc.reason and isinstance(exc.reason, str)
        return None
    assert msg.image().shape == msg.shape  # anything accepted decodes to what it claims
    return msg


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_wire_error(data):
    only_wire_errors(data)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_behind_a_valid_magic_raise_only_wire_error(data):
    only_wire_errors(b"SPAR\x01" + data)


@FUZZ
@given(codec=st.sampled_from(sorted(FRAMES)), data=st.data(), resign_crc=st.booleans())
def test_mutated_messages_raise_only_wire_error(codec, data, resign_crc):
    frame = bytearray(FRAMES[codec])
    for _ in range(data.draw(st.integers(1, 8))):
        if not frame:
            break
        kind = data.draw(st.sampled_from(["flip", "set", "truncate", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(frame) - 1)))
        if kind == "flip":
            frame[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set":
            frame[pos] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del frame[pos:]
        else:
            frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    mutated = bytes(frame)
    only_wire_errors(resign(mutated) if resign_crc and len(mutated) > 4 else mutated)


@FUZZ
@given(codec_id=st.integers(0, 255), quality=st.integers(0, 255), flags=st.integers(0, 255),
       start=st.integers(-(2**63), 2**63 - 1), height=st.integers(0, 65535),
       width=st.integers(0, 65535), scale=st.floats(width=32), offset=st.floats(width=32),
       payload=st.binary(max_size=256), codec=st.sampled_from(sorted(FRAMES)))
def test_arbitrary_header_fields_raise_only_wire_error(codec_id, quality, flags, start, height,
                                                       width, scale, offset, payload, codec):
    """Every header field set to anything, with a valid CRC, so each check is reached."""
    original = FRAMES[codec]
    ids = original[HEADER_SIZE:HEADER_SIZE + 24]  # "parking_lot" + "n01" + "geophone"
    header = struct.pack("<4sBBBBqI8sHHffBBBBI", b"SPAR", 1, codec_id, quality, flags, start, 7,
                         b"\x00" * 8, height, width, scale, offset, 11, 3, 8, 0, len(payload))
    only_wire_errors(resign(header + ids + payload + b"\x00\x00\x00\x00"))


@settings(max_examples=60, deadline=None)
@given(site=st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True),
       node=st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True),
       seq=st.integers(0, 2**32 - 1), start=st.integers(0, 2**63 - 1),
       codec=st.sampled_from(["raw", "png", "jpeg:70", "webp:70"]))
def test_valid_messages_round_trip(site, node, seq, start, codec):
    msg = make_message(window_image(), CFG, CodecSpec.parse(codec), site=site, node=node,
                       modality="geophone", window_start_ns=start, seq=seq)
    back = decode_message(encode_message(msg))
    assert (back.site, back.node, back.seq, back.window_start_ns) == (site, node, seq, start)
