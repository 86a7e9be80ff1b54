"""TokenMessage: one node, one modality, one window, framed for the wire.

Layout (little-endian), 48-byte fixed header, then ids, payload and a CRC32::

    off size field
      0   4  magic b"SPAR"
      4   1  format version (1)
      5   1  codec wire id (see codecs.CODECS)
      6   1  quality (1..100; 0 for codecs without one)
      7   1  flags (bit 0: WebP lossless; other bits must be 0)
      8   8  window start, int64 ns since the Unix epoch (node clock)
     16   4  sequence number, uint32
     20   8  feature-config hash (8 bytes = 16 hex digits)
     28   2  image height H, uint16
     30   2  image width W, uint16
     32   4  quantization scale, float32 (1.0 for float codecs)
     36   4  quantization offset, float32 (0.0 for float codecs)
     40   1  site id length      41 1 node id length      42 1 modality length   43 1 reserved (0)
     44   4  payload length, uint32
     48   .  site id, node id, modality (ASCII, topic-safe), payload
    end-4 4  CRC32 of every byte before it

Ids use the topic-level alphabet of :mod:`spar_wire.topics`, so any id in a message can also
appear in a topic.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from spar_wire.codecs import (
    CODECS_BY_WIRE_ID,
    CodecInfo,
    CodecSpec,
    codec_info,
    decode_payload,
    encode_payload,
)
from spar_wire.errors import WireError
from spar_wire.feature_config import FeatureConfig
from spar_wire.quantization import dequantize, quantize
from spar_wire.topics import check_id

MAGIC = b"SPAR"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBBBqI8sHHffBBBBI")
HEADER_SIZE = _HEADER.size  # 48
_CRC_SIZE = 4
_FLAG_LOSSLESS = 0x01


@dataclass(frozen=True)
class WireLimits:
    """Bounds a receiver enforces before doing any work on a message."""

    max_message_bytes: int = 1 << 20  # whole framed message
    max_pixels: int = 1 << 20  # H * W of the token image, checked before decompression
    # Largest |value| a token image may hold. Token images are in dB; a finite but huge value (a
    # forged scale of 3e38) would still overflow the model's float32 arithmetic into inf and NaN
    # and poison the whole window's result.
    max_abs_value: float = 1e6


@dataclass(frozen=True)
class TokenMessage:
    """A framed token image. ``payload`` is the codec output; ``image()`` decodes it."""

    site: str
    node: str
    modality: str
    window_start_ns: int
    seq: int
    feature_hash: str  # 16 hex digits
    codec: str
    quality: int
    lossless: bool
    shape: tuple[int, int]  # (H, W) of the token image
    scale: float
    offset: float
    payload: bytes = field(repr=False)
    # Decoded payload kept by decode_message, so validating it is not paid for twice.
    decoded: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> tuple[str, str, int, int]:
        """De-duplication key: (node, modality, window start, seq)."""
        return self.node, self.modality, self.window_start_ns, self.seq

    def values(self, limits: WireLimits = WireLimits()) -> np.ndarray:
        """Decompress only: [H, W] uint8 codes (image codecs) or float32 dB (float codecs)."""
        if self.decoded is not None:
            return self.decoded.copy()
        _check_pixels(self.shape, limits)
        return decode_payload(self.payload, codec_info(self.codec), self.shape)

    def image(self, limits: WireLimits = WireLimits()) -> np.ndarray:
        """Decompress and dequantize. Returns the token image [H, W] float32 (dB).

        WireError("non_finite") when a float codec carries NaN, infinity or a value beyond
        ``limits.max_abs_value`` (quantized codecs are bounded by their header, checked on decode).
        """
        values = self.values(limits)
        if values.dtype == np.uint8:
            return dequantize(values, self.scale, self.offset)
        if not np.all(np.abs(values) <= limits.max_abs_value):  # NaN fails this comparison too
            raise WireError("non_finite", f"token values beyond +-{limits.max_abs_value:g} or not finite")
        return values


def window_start_of(frame: bytes) -> int | None:
    """The window start (ns) a framed message claims, read from its header alone, unchecked (no CRC):
    for cheap triage before decoding. None when the bytes do not even look like a message."""
    if len(frame) < HEADER_SIZE or frame[:4] != MAGIC:
        return None
    return struct.unpack_from("<q", frame, 8)[0]


def make_message(
    image: np.ndarray,
    cfg: FeatureConfig,
    codec: CodecSpec,
    *,
    site: str,
    node: str,
    modality: str,
    window_start_ns: int,
    seq: int,
) -> TokenMessage:
    """Quantize (image codecs) and compress a token image [H, W] float (dB) into a message."""
    if image.shape != cfg.image_shape:
        raise WireError("shape_mismatch", f"token image {image.shape} != {cfg.image_shape}")
    info = codec.info
    if info.quantized:
        q = quantize(image, cfg)
        payload, scale, offset = encode_payload(q.codes, codec), q.scale, q.offset
    else:
        if not np.all(np.isfinite(image)):
            raise WireError("bad_image", "token image contains NaN or infinity")
        payload, scale, offset = encode_payload(image, codec), 1.0, 0.0
    return TokenMessage(
        site=site, node=node, modality=modality, window_start_ns=int(window_start_ns),
        seq=int(seq), feature_hash=cfg.hash, codec=info.name,
        quality=codec.quality if info.has_quality and not codec.lossless else 0,
        lossless=codec.lossless, shape=tuple(image.shape), scale=scale, offset=offset,
        payload=payload,
    )


def encode_message(msg: TokenMessage) -> bytes:
    """Frame a message. Raises WireError for fields the format cannot carry."""
    info = codec_info(msg.codec)
    ids = [check_id(msg.site, "site"), check_id(msg.node, "node"), check_id(msg.modality, "modality")]
    id_bytes = [i.encode("ascii") for i in ids]
    try:
        hash_bytes = bytes.fromhex(msg.feature_hash)
    except ValueError:
        raise WireError("bad_field", f"feature hash {msg.feature_hash!r} is not hex") from None
    _check_range("feature hash bytes", len(hash_bytes), 8, 8)
    _check_range("seq", msg.seq, 0, 2**32 - 1)
    _check_range("window_start_ns", msg.window_start_ns, 0, 2**63 - 1)
    _check_range("quality", msg.quality, 0, 100)
    for side in msg.shape:
        _check_range("shape", side, 1, 65535)
    if not (math.isfinite(msg.scale) and math.isfinite(msg.offset) and msg.scale > 0):
        raise WireError("bad_field", f"scale/offset must be finite with scale > 0: {msg.scale}, {msg.offset}")
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, info.wire_id, msg.quality, _FLAG_LOSSLESS if msg.lossless else 0,
        msg.window_start_ns, msg.seq, hash_bytes, msg.shape[0], msg.shape[1], msg.scale,
        msg.offset, len(id_bytes[0]), len(id_bytes[1]), len(id_bytes[2]), 0, len(msg.payload),
    )
    body = header + b"".join(id_bytes) + msg.payload
    return body + struct.pack("<I", zlib.crc32(body))


def decode_message(data: bytes, limits: WireLimits = WireLimits(), *, decode_image: bool = True
                   ) -> TokenMessage:
    """Parse and validate a framed message.

    Checks, in order of cost: size bounds, magic, version, CRC, header fields, ids, payload
    length, then (``decode_image=True``) the payload itself, so nothing expensive runs on a
    message that a cheap check already refuses.

    Raises:
        WireError: with ``reason`` naming the first problem found.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("bad_type", f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limits.max_message_bytes:
        raise WireError("oversize", f"{len(data)} bytes > limit {limits.max_message_bytes}")
    if len(data) < HEADER_SIZE + _CRC_SIZE:
        raise WireError("truncated", f"{len(data)} bytes is shorter than the header")
    fields = _HEADER.unpack_from(data)
    (magic, version, codec_id, quality, flags, start_ns, seq, hash_bytes, height, width, scale,
     offset, site_len, node_len, mod_len, reserved, payload_len) = fields
    if magic != MAGIC:
        raise WireError("bad_magic", f"magic {magic!r} != {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise WireError("bad_version", f"format version {version}, this decoder reads {FORMAT_VERSION}")
    expected_len = HEADER_SIZE + site_len + node_len + mod_len + payload_len + _CRC_SIZE
    if len(data) != expected_len:
        reason = "truncated" if len(data) < expected_len else "trailing_bytes"
        raise WireError(reason, f"message has {len(data)} bytes, header says {expected_len}")
    (crc,) = struct.unpack_from("<I", data, len(data) - _CRC_SIZE)
    if zlib.crc32(data[:-_CRC_SIZE]) != crc:
        raise WireError("bad_crc", "CRC32 does not match")
    info = CODECS_BY_WIRE_ID.get(codec_id)
    if info is None:
        raise WireError("unknown_codec", f"codec id {codec_id}")
    _check_header_fields(info, quality, flags, reserved, start_ns, (height, width), scale, offset, limits)
    site, node, modality = _read_ids(data, (site_len, node_len, mod_len))
    payload_start = HEADER_SIZE + site_len + node_len + mod_len
    payload = data[payload_start:payload_start + payload_len]
    decoded = decode_payload(payload, info, (height, width)) if decode_image else None
    return TokenMessage(
        site=site, node=node, modality=modality, window_start_ns=start_ns, seq=seq,
        feature_hash=hash_bytes.hex(), codec=info.name, quality=quality,
        lossless=bool(flags & _FLAG_LOSSLESS), shape=(height, width), scale=scale, offset=offset,
        payload=payload, decoded=decoded,
    )


# --------------------------------------------------------------------------- internals
def _check_range(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise WireError("bad_field", f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_pixels(shape: tuple[int, int], limits: WireLimits) -> None:
    if shape[0] < 1 or shape[1] < 1:
        raise WireError("bad_shape", f"image shape {shape} has an empty side")
    if shape[0] * shape[1] > limits.max_pixels:
        raise WireError("too_many_pixels", f"image {shape[0]}x{shape[1]} > limit {limits.max_pixels} pixels")


def _check_header_fields(info: CodecInfo, quality: int, flags: int, reserved: int, start_ns: int,
                         shape: tuple[int, int], scale: float, offset: float,
                         limits: WireLimits) -> None:
    if flags & ~_FLAG_LOSSLESS or reserved:
        raise WireError("bad_field", f"unknown flag bits {flags:#x} / reserved byte {reserved}")
    if flags & _FLAG_LOSSLESS and info.name != "webp":
        raise WireError("bad_field", f"lossless flag set on codec {info.name}")
    if quality > 100:
        raise WireError("bad_field", f"quality {quality} > 100")
    if start_ns < 0:
        raise WireError("bad_field", f"negative window start {start_ns}")
    _check_pixels(shape, limits)
    if not (math.isfinite(scale) and math.isfinite(offset)):
        raise WireError("non_finite", f"scale {scale} / offset {offset} not finite")
    if scale <= 0:
        raise WireError("bad_field", f"scale {scale} must be > 0")
    # Codes 0..255 decode to offset .. offset + 255 * scale: both ends bound every value.
    if max(abs(offset), abs(offset + 255.0 * scale)) > limits.max_abs_value:
        raise WireError("non_finite", f"scale {scale:g} / offset {offset:g} decode beyond +-{limits.max_abs_value:g}")


def _read_ids(data: bytes, lengths: tuple[int, int, int]) -> tuple[str, str, str]:
    out = []
    pos = HEADER_SIZE
    for name, length in zip(("site", "node", "modality"), lengths, strict=True):
        raw = data[pos:pos + length]
        pos += length
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise WireError("bad_id", f"{name} id is not ASCII") from None
        out.append(check_id(text, name))
    return out[0], out[1], out[2]


@dataclass(frozen=True)
class RoundTrip:
    codec: str  # CodecSpec label, e.g. "jpeg-q85"
    frame_bytes: int  # whole framed message (MQTT payload)
    payload_bytes: int  # codec output only
    max_abs_error: float  # same unit as the image (dB)
    rmse: float


def measure_roundtrip(image: np.ndarray, cfg: FeatureConfig, codec: CodecSpec) -> RoundTrip:
    """Encode, frame, decode and compare one token image [H, W] with one codec."""
    msg = make_message(image, cfg, codec, site="roundtrip", node="n", modality="m",
                       window_start_ns=0, seq=0)
    frame = encode_message(msg)
    error = decode_message(frame).image() - image
    return RoundTrip(codec.label, len(frame), len(msg.payload), float(np.abs(error).max()),
                     float(np.sqrt(np.mean(error.astype(np.float64) ** 2))))
