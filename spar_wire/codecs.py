"""Codecs for token images: one table that senders, receivers and benchmarks all read.

Float codecs (``raw32``, ``raw``) carry the dB image itself; image codecs (``png``, ``jpeg``,
``webp``) carry the uint8-quantized image through Pillow. Every decoder checks the declared size
before it inflates anything, so a small payload cannot expand into a huge image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from spar_wire.errors import WireError


@dataclass(frozen=True)
class CodecInfo:
    name: str
    wire_id: int  # the byte in the message header; never reuse a retired id
    quantized: bool  # payload is uint8 codes (True) or float values (False)
    lossy: bool  # may change values beyond the uint8 quantization step
    has_quality: bool  # accepts a quality 1..100
    pil_format: str | None  # Pillow format name, None for float codecs
    dtype: str | None = None  # numpy dtype of float payloads


CODECS: dict[str, CodecInfo] = {
    "raw32": CodecInfo("raw32", 1, quantized=False, lossy=False, has_quality=False,
                       pil_format=None, dtype="<f4"),
    "raw": CodecInfo("raw", 2, quantized=False, lossy=True, has_quality=False,
                     pil_format=None, dtype="<f2"),
    "png": CodecInfo("png", 3, quantized=True, lossy=False, has_quality=False, pil_format="PNG"),
    "jpeg": CodecInfo("jpeg", 4, quantized=True, lossy=True, has_quality=True, pil_format="JPEG"),
    "webp": CodecInfo("webp", 5, quantized=True, lossy=True, has_quality=True, pil_format="WEBP"),
}
CODECS_BY_WIRE_ID = {info.wire_id: info for info in CODECS.values()}


@dataclass(frozen=True)
class CodecSpec:
    """A codec choice: name, quality (1..100, lossy image codecs) and the WebP lossless flag."""

    name: str = "webp"
    quality: int = 85
    lossless: bool = False

    def __post_init__(self) -> None:
        info = codec_info(self.name)
        if isinstance(self.quality, bool) or not isinstance(self.quality, int):
            raise WireError("bad_codec", f"quality must be an integer, got {self.quality!r}")
        if not 1 <= self.quality <= 100:
            raise WireError("bad_codec", f"quality must be in 1..100, got {self.quality}")
        if self.lossless and info.name != "webp":
            raise WireError("bad_codec", f"lossless is a WebP option, not available for {self.name}")

    @property
    def info(self) -> CodecInfo:
        return CODECS[self.name]

    @property
    def label(self) -> str:
        """Human label such as ``jpeg-q85`` or ``webp-lossless``."""
        if self.lossless:
            return f"{self.name}-lossless"
        return f"{self.name}-q{self.quality}" if self.info.has_quality else self.name

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """Parse ``png``, ``jpeg:85``, ``webp:90``, ``webp:lossless``, ``raw``, ``raw32``."""
        name, _, option = text.strip().lower().partition(":")
        if option == "lossless":
            return cls(name=name, lossless=True)
        if not option:
            return cls(name=name)
        if not option.isdigit():
            raise WireError("bad_codec", f"bad codec option {option!r} in {text!r}: expected a "
                            "quality 1..100 or 'lossless'")
        return cls(name=name, quality=int(option))


def codec_info(name: str) -> CodecInfo:
    try:
        return CODECS[name]
    except KeyError:
        raise WireError("unknown_codec", f"unknown codec {name!r}; known: {', '.join(CODECS)}") from None


def encode_payload(values: np.ndarray, spec: CodecSpec) -> bytes:
    """Compress a token image.

    Args:
        values: [H, W]; uint8 codes for image codecs, float (dB) for float codecs.
    """
    info = spec.info
    if info.quantized:
        if values.dtype != np.uint8:
            raise WireError("bad_image", f"{info.name} needs uint8 codes, got {values.dtype}")
        return _encode_pil(values, info, spec)
    return np.ascontiguousarray(values, dtype=info.dtype).tobytes()


def decode_payload(payload: bytes, info: CodecInfo, shape: tuple[int, int]) -> np.ndarray:
    """Decompress a payload whose header declared ``shape`` (H, W).

    Returns:
        [H, W] uint8 codes for image codecs, float32 for float codecs.
    Raises:
        WireError: malformed payload, wrong format, size differing from ``shape``, non-finite
        floats.
    """
    if info.quantized:
        return _decode_pil(payload, info, shape)
    itemsize = np.dtype(info.dtype).itemsize
    if len(payload) != shape[0] * shape[1] * itemsize:
        raise WireError(
            "size_mismatch", f"{info.name} payload has {len(payload)} bytes, shape {shape} needs "
            f"{shape[0] * shape[1] * itemsize}")
    values = np.frombuffer(payload, dtype=info.dtype).reshape(shape).astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise WireError("non_finite", f"{info.name} payload contains NaN or infinity")
    return values


def _encode_pil(codes: np.ndarray, info: CodecInfo, spec: CodecSpec) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(codes), mode="L")
    if info.name == "jpeg":
        image.save(buffer, format="JPEG", quality=spec.quality, optimize=True)
    elif info.name == "webp":
        image.save(buffer, format="WEBP", quality=100 if spec.lossless else spec.quality,
                   lossless=spec.lossless, method=4)
    else:
        image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _decode_pil(payload: bytes, info: CodecInfo, shape: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(payload), formats=[info.pil_format]) as image:
            # Image.open reads only the header: check the size before inflating any pixels.
            if image.size != (shape[1], shape[0]):
                raise WireError(
                    "size_mismatch",
                    f"{info.name} image is {image.size[1]}x{image.size[0]}, header says "
                    f"{shape[0]}x{shape[1]}")
            image.load()
            if image.mode != "L":
                image = image.convert("L")
            return np.asarray(image, dtype=np.uint8).copy()
    except WireError:
        raise
    # Pillow's decoders raise a wide, undocumented set of exceptions on corrupt input
    # (OSError, SyntaxError, ValueError, struct.error, EOFError, ...); all mean "bad payload".
    except Exception as exc:  # noqa: BLE001
        raise WireError("bad_payload", f"{info.name} payload does not decode: {exc!r}") from None
