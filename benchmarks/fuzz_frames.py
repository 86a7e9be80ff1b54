"""Raw token frames and hostile image payloads for ``spar-bench fuzz``.

``spar_wire.message`` refuses to encode an out-of-range header; the fuzzer needs exactly those
frames, so :class:`RawFrame` packs the same layout with no checks. The payload builders make images
whose headers lie about their size (decompression bombs) without allocating what they claim.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from spar_wire.codecs import CODECS
from spar_wire.message import MAGIC, TokenMessage

_HEADER = struct.Struct("<4sBBBBqI8sHHffBBBBI")  # the layout of spar_wire.message, packed without checks


@dataclass(frozen=True)
class RawFrame:
    """A token frame as raw header values: any of them may be out of range (nothing is checked)."""

    codec_id: int
    quality: int
    flags: int
    start_ns: int
    seq: int
    hash_bytes: bytes
    height: int
    width: int
    scale: float
    offset: float
    site: bytes
    node: bytes
    modality: bytes
    payload: bytes
    magic: bytes = MAGIC
    version: int = 1
    reserved: int = 0

    @classmethod
    def of(cls, msg: TokenMessage) -> RawFrame:
        """The raw fields of a valid message."""
        return cls(CODECS[msg.codec].wire_id, msg.quality, int(msg.lossless), msg.window_start_ns, msg.seq,
                   bytes.fromhex(msg.feature_hash), msg.shape[0], msg.shape[1], msg.scale, msg.offset,
                   msg.site.encode(), msg.node.encode(), msg.modality.encode(), msg.payload)

    def pack(self, crc_xor: int = 0) -> bytes:
        """Frame it; ``crc_xor`` != 0 corrupts the CRC."""
        header = _HEADER.pack(self.magic, self.version, self.codec_id, self.quality, self.flags, self.start_ns,
                              self.seq, self.hash_bytes, self.height, self.width, self.scale, self.offset,
                              len(self.site), len(self.node), len(self.modality), self.reserved, len(self.payload))
        body = header + self.site + self.node + self.modality + self.payload
        return body + struct.pack("<I", zlib.crc32(body) ^ crc_xor)


def png(width: int, height: int, idat: bytes) -> bytes:
    """An 8-bit grey PNG that declares a ``width`` x ``height`` canvas, with ``idat`` as its only image data
    (whatever it inflates to: the header and the data need not agree)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def webp_canvas(width: int, height: int) -> bytes:
    """A lossless WebP header that declares a ``width`` x ``height`` canvas, followed by junk."""
    bits = (width - 1) | (height - 1) << 14
    vp8l = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 32
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(vp8l)) + b"WEBP" + b"VP8L" + struct.pack("<I", len(vp8l)) + vp8l


def deflate_repeated(byte: int, size: int) -> bytes:
    """zlib stream of ``size`` copies of ``byte``, compressed in 1 MiB steps (a ~1000:1 bomb)."""
    compressor, block = zlib.compressobj(9), bytes([byte]) * (1 << 20)
    parts = [compressor.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + compressor.flush()
