"""``spar-bench fuzz``: hostile input against a running aggregator (GitHub issue 9, part 3).

A seeded generator turns the site's valid traffic (births and token frames of its real nodes, made
by the node firmware) into hostile messages of named classes: truncated, bit-flipped, wrong CRC,
huge shape headers, decompression bombs, non-finite quantization, wrong feature hash, spoofed node
ids, unicode and malformed topics, random bytes, empty payloads, malformed birth/state JSON,
corrupt header fields and oversize payloads; and what a field site really sees (issue 19): window
starts far in the future or the past with a valid CRC (a node that booted without NTP or a GPS fix),
births with huge but finite positions or a position 50 km away, and a stream of births with
distinct 500-character descriptions. A small, known share of valid traffic ("valid") runs
alongside, so the run also shows the aggregator still accepting real nodes and producing results.

Valid traffic is stamped with this machine's clock (the window grid follows it, one window per valid
block at least), as real nodes stamp theirs: the aggregator refuses starts far from its own clock and
from the other nodes'. The wrong clocks come from a minority of the nodes (``clock_nodes``): a site
where most nodes disagree with one correct node is not "one node with a wrong clock".

The runner starts a private Mosquitto and the real aggregator as a subprocess (``spar-aggregator
run`` with the shipped parking-lot model), publishes everything at QoS 1 with a bounded number in
flight, and attributes outcomes to classes by sending in single-class blocks: after each block it
waits until the aggregator's /metrics has counted every message the broker delivered, so each
block's counter delta belongs to its class. Delivered means PUBACK "success"; Mosquitto answers
"no matching subscribers" for topics outside the aggregator's filters. Topics paho will not send
are counted as refused by the client; topics and sizes Mosquitto answers with a disconnect go
through a throwaway connection each and are counted as refused by the broker.

It checks: the aggregator never exits (zero crashes), logs no traceback and counts nothing as
``internal_error``; every delivered message is counted under exactly one outcome (unaccounted 0);
no hostile message is accepted (description churn excepted: those births are valid, the class is
about what accepting them costs); resident memory (VmRSS) after warm-up grows by a bounded amount;
SIGTERM ends the process with exit code 0; and valid traffic keeps producing results during the
fuzz: every valid window sent after the first hostile message has a stored result (read from the
aggregator's SQLite database after its shutdown), and no stored result holds NaN or infinity. The
valid window after a huge-position block sends its data before its births, so a poisoned position
that was accepted would reach a stored result.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import math
import random
import re
import sqlite3
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.aggregator_process import AggregatorProcess
from benchmarks.errors import BenchError
from benchmarks.local_broker import BrokerSettings, LocalBroker
from benchmarks.machine import describe_machine
from node_firmware_sim.firmware import FirmwareConfig, NodeFirmware
from node_firmware_sim.mqtt_publisher import FIRMWARE_VERSION
from node_firmware_sim.sine_source import sine_window
from spar_wire.codecs import CODECS, CodecSpec
from spar_wire.errors import WireError
from spar_wire.lifecycle import MAX_LIFECYCLE_BYTES, BirthMessage, ModalityInfo, StateMessage
from spar_wire.message import HEADER_SIZE, MAGIC, TokenMessage, WireLimits, decode_message, encode_message
from spar_wire.site_layout import SiteLayout, load_site_layout
from spar_wire.topics import birth_topic, data_topic, site_filter, state_topic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SITE = REPO / "configs" / "sites" / "parking_lot.toml"
DEFAULT_MODEL = REPO / "models" / "parking_lot" / "manifest.json"
BROKER_MESSAGE_LIMIT = 2 << 20  # Mosquitto message_size_limit: above the wire limit, so both are exercised
BASE_EPOCH_NS = 1_700_000_000 * 10**9  # node clock of the valid windows: fixed, so runs are reproducible
VALID_BD_SEQ = 7  # bdSeq of the valid births; stale states use less
RSS_BOUND_MIB = 50.0  # growth after warm-up that counts as a problem

# =========================================================================== classes
VALID = "valid"
HOSTILE_WEIGHTS: dict[str, float] = {
    "truncated": 8, "bitflip": 10, "wrong_crc": 6, "huge_shape": 6, "decompression_bomb": 5,
    "non_finite_scale": 6, "wrong_feature_hash": 6, "spoofed_node": 8, "unicode_topic": 8,
    "random_bytes": 8, "empty_payload": 4, "malformed_lifecycle": 10, "header_field": 8, "oversize": 1,
    "far_future": 4, "far_past": 4, "huge_position": 4, "description_churn": 3,
}
CLASSES = (VALID, *HOSTILE_WEIGHTS)
# Classes whose messages are valid on the wire and meant to be accepted: what they test is what
# accepting them costs (memory, disk), not that they are refused.
ACCEPTED_CLASSES = frozenset({VALID, "description_churn"})
# Birth classes after which a valid block follows: malformed births refuse their node (the valid
# births re-admit it), and after huge positions the valid data (sent before its births) shows whether
# a poisoned position reached the model.
FOLLOWED_BY_VALID = ("malformed_lifecycle", "huge_position")
CHURN_DESCRIPTION_CHARS = 500  # under the wire's 512-character cap: accepted, and each one new
YEAR_S = 365.25 * 86_400
VALID_SHARE = 0.02  # of all messages
OVERSIZE_MAX = 100  # oversize messages are up to 2 MiB each: a few are enough
ACCEPTED = frozenset({"accepted", "birth", "state"})
SHED = "shed"  # dropped unread by the aggregator's overload policy (its message queue was full)
_R = "rejected."
# Outcomes (the aggregator's counter keys) each class may end in. "refused_node": a hostile birth
# in an earlier block refused that node, so its data is refused before the check aimed at.
EXPECTED: dict[str, frozenset[str]] = {
    VALID: ACCEPTED,
    "truncated": frozenset({_R + "truncated", _R + "trailing_bytes", _R + "bad_birth", _R + "bad_state"}),
    "bitflip": frozenset({_R + r for r in ("bad_crc", "truncated", "trailing_bytes", "bad_magic", "bad_version")}),
    "wrong_crc": frozenset({_R + "bad_crc"}),
    "huge_shape": frozenset({_R + r for r in ("too_many_pixels", "bad_shape", "shape_mismatch", "refused_node")}),
    "decompression_bomb": frozenset({_R + r for r in ("too_many_pixels", "size_mismatch", "bad_payload",
                                                      "shape_mismatch", "refused_node")}),
    "non_finite_scale": frozenset({_R + "non_finite", _R + "bad_field", _R + "refused_node"}),
    "wrong_feature_hash": frozenset({_R + "feature_hash_mismatch", _R + "refused_node"}),
    "spoofed_node": frozenset({_R + r for r in ("topic_mismatch", "unknown_node", "unknown_modality", "bad_topic",
                                                "refused_node")} | {"refused.too_many_nodes",
                                                                    "ignored.state_unknown_node"}),
    "unicode_topic": frozenset({_R + "bad_topic", _R + "topic_mismatch", "ignored.aggregator"}),
    "random_bytes": frozenset({_R + r for r in ("truncated", "trailing_bytes", "bad_magic", "bad_version",
                                                "bad_crc", "bad_birth", "bad_state")}),
    "empty_payload": frozenset({_R + "truncated", _R + "bad_birth", _R + "bad_state"}),
    "malformed_lifecycle": frozenset({_R + "bad_birth", _R + "bad_state", "ignored.stale_state",
                                      "ignored.state_unknown_node", "refused.position_dim", "refused.modalities",
                                      "refused.feature_hash_mismatch", "refused.wrong_site"}),
    "header_field": frozenset({_R + r for r in ("unknown_codec", "bad_field", "bad_version", "bad_magic", "bad_id",
                                                "size_mismatch", "bad_payload", "non_finite", "refused_node")}),
    "oversize": frozenset({_R + r for r in ("oversize", "bad_payload", "bad_birth", "bad_state", "refused_node")}),
    # The clock guard compares a start with the other nodes' recent starts (clock_skew), or with
    # this box's clock when too few were heard (clock_ahead / clock_behind); clock_absurd: beyond
    # any clock (after 2116, or not positive).
    "far_future": frozenset({_R + r for r in ("clock_skew", "clock_ahead", "clock_absurd", "refused_node")}),
    "far_past": frozenset({_R + r for r in ("clock_skew", "clock_behind", "clock_absurd", "refused_node")}),
    # Not finite in float32: the wire parser may refuse it (bad_birth); else the registry's site bound.
    "huge_position": frozenset({_R + "bad_birth", "refused.position_out_of_site"}),
    "description_churn": frozenset({"birth"}),
}
# At least one of these per class shows the check the class aims at was reached.
PRIMARY: dict[str, frozenset[str]] = {
    VALID: frozenset({"accepted", "birth"}),
    "truncated": frozenset({_R + "truncated"}),
    "bitflip": frozenset({_R + "bad_crc"}),
    "wrong_crc": frozenset({_R + "bad_crc"}),
    "huge_shape": frozenset({_R + "too_many_pixels"}),
    "decompression_bomb": frozenset({_R + "bad_payload", _R + "size_mismatch"}),
    "non_finite_scale": frozenset({_R + "non_finite"}),
    "wrong_feature_hash": frozenset({_R + "feature_hash_mismatch"}),
    "spoofed_node": frozenset({_R + "topic_mismatch"}),
    "unicode_topic": frozenset({_R + "bad_topic"}),
    "random_bytes": frozenset({_R + "bad_magic"}),
    "empty_payload": frozenset({_R + "truncated"}),
    "malformed_lifecycle": frozenset({_R + "bad_birth"}),
    "header_field": frozenset({_R + "unknown_codec", _R + "bad_field"}),
    "oversize": frozenset({_R + "oversize"}),
    "far_future": frozenset({_R + "clock_skew", _R + "clock_ahead"}),
    "far_past": frozenset({_R + "clock_skew", _R + "clock_behind"}),
    "huge_position": frozenset({"refused.position_out_of_site"}),
    "description_churn": frozenset({"birth"}),
}


def is_rejection(outcome: str) -> bool:
    """True for counter keys that drop a message: ``rejected.*``, ``refused.*``, ``ignored.*``, and
    ``shed`` (dropped unread by the overload policy when the fuzzer outpaces decoding)."""
    return outcome == SHED or outcome.split(".", 1)[0] in ("rejected", "refused", "ignored")


@dataclass(frozen=True)
class FuzzMessage:
    """One message to publish, with the class and variant that made it."""

    cls: str
    variant: str
    topic: str
    payload: bytes = field(repr=False)


# =========================================================================== raw frames
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


def _png(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _webp_canvas(width: int, height: int) -> bytes:
    """A lossless WebP header that declares a ``width`` x ``height`` canvas, followed by junk."""
    bits = (width - 1) | (height - 1) << 14
    vp8l = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 32
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(vp8l)) + b"WEBP" + b"VP8L" + struct.pack("<I", len(vp8l)) + vp8l


def _deflate_repeated(byte: int, size: int) -> bytes:
    """zlib stream of ``size`` copies of ``byte``, compressed in 1 MiB steps (a ~1000:1 bomb)."""
    compressor, block = zlib.compressobj(9), bytes([byte]) * (1 << 20)
    parts = [compressor.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + compressor.flush()


# =========================================================================== generator
class FuzzGenerator:
    """Seeded hostile messages for one site, derived from its real nodes' valid traffic.

    Deterministic for a seed: :meth:`plan` and the messages of each block depend only on the seed
    and the order blocks are asked for (always the plan's order). Time: without ``clock_ns`` the
    windows start at ``BASE_EPOCH_NS`` and advance one window per valid block (deterministic, for
    tests of the generator; ``epoch_ns`` moves that start); with ``clock_ns`` (a run: ``time.time_ns``)
    they start at that clock's window and keep up with it, so the aggregator's clock checks see nodes
    whose clocks are right.
    Token messages of the hostile classes are stamped "now" too, so each is refused for the defect it
    carries, not for its age.
    """

    def __init__(self, layout: SiteLayout, seed: int = 0, limits: WireLimits = WireLimits(),
                 clock_ns: Callable[[], int] | None = None, epoch_ns: int = BASE_EPOCH_NS):
        self.layout = layout
        self.site = layout.site_id
        self.seed = seed
        self.limits = limits
        self.rng = random.Random(seed)
        self.nodes = list(layout.node_ids)
        self.pairs = [(n, m) for n in self.nodes for m in layout.node(n).modalities]
        self.window = 0  # next valid window index
        self.window_ns = int(round(max(s.features.window_s for s in layout.modalities.values()) * 1e9))
        self.clock_ns = clock_ns
        # On the window grid of the clock: the aggregator's grid is set by the first valid window.
        self.epoch_ns = epoch_ns if clock_ns is None else clock_ns() // self.window_ns * self.window_ns
        self.valid_starts: list[int] = []  # window start of every valid block so far, in order
        # Wrong clocks come from fewer than half of the nodes (see the module docstring).
        self.clock_nodes = self.nodes[:max(1, (len(self.nodes) - 1) // 3)]
        self.clock_pairs = [(n, m) for n, m in self.pairs if n in self.clock_nodes]
        self._churned = 0  # description churn births made, numbered so every description is new
        self._last_block = ""
        # A malformed birth block may have refused layout nodes, until a valid block's births
        # re-admit them: a valid block then sends its births first, or its data would be refused.
        self._maybe_refused = False
        self.births = {n: self._birth(n).to_json() for n in self.nodes}
        self.frames = self._seed_frames()
        self.valid_pairs = self._valid_pairs()
        # Built once: ~30 KB that inflates to 32 MiB, and ~8 KB for a 30000 x 30000 canvas.
        self.bomb_idat = _deflate_repeated(0x07, 32 << 20)  # filter type 7 does not exist
        self.zero_idat = _deflate_repeated(0x00, 8 << 20)
        self._makers: dict[str, Callable[[], FuzzMessage]] = {
            name: getattr(self, f"_make_{name}") for name in HOSTILE_WEIGHTS}

    # ---------------------------------------------------------------- seeds
    def _birth(self, node_id: str, **changes: Any) -> BirthMessage:
        """The valid birth of ``node_id``, with ``changes`` (any BirthMessage field)."""
        spec = self.layout.node(node_id)
        infos = {m: ModalityInfo(self.layout.modalities[m].features.hash, self.layout.modalities[m].sample_rate_hz,
                                 self.layout.modalities[m].channels) for m in spec.modalities}
        birth = BirthMessage(site=self.site, node=node_id, bd_seq=VALID_BD_SEQ, position=spec.position,
                             modalities=infos, description=spec.description, firmware=FIRMWARE_VERSION)
        return dataclasses.replace(birth, **changes)

    def _seed_frames(self) -> dict[tuple[str, str, str], TokenMessage]:
        """(node, modality, codec) -> a valid decoded frame, in the nodes' codec and two others."""
        frames = {}
        for codec in ("webp:85", "png", "raw"):
            for node in self.nodes:
                firmware = NodeFirmware(self.layout, node, FirmwareConfig(codec=CodecSpec.parse(codec)))
                for modality in self.layout.node(node).modalities:
                    cfg = self.layout.modalities[modality].features
                    frame = firmware.encode(modality, sine_window(cfg, node, 0.0, seed=self.seed), self.epoch_ns)
                    frames[node, modality, codec] = decode_message(frame.frame, decode_image=False)
        return frames

    def _valid_pairs(self) -> set[tuple[str, bytes]]:
        pairs = {(birth_topic(self.site, n), b) for n, b in self.births.items()}
        pairs |= {(data_topic(self.site, n, m), encode_message(msg)) for (n, m, _), msg in self.frames.items()}
        return pairs

    def is_valid_seed(self, message: FuzzMessage) -> bool:
        """Whether (topic, payload) is one of the unmodified seed messages."""
        return (message.topic, message.payload) in self.valid_pairs

    def _pick(self, codec: str | None = None) -> TokenMessage:
        """A valid frame of a random (node, modality) in ``codec`` (default: a random one), stamped now."""
        node, modality = self.rng.choice(self.pairs)
        frame = self.frames[node, modality, codec or self.rng.choice(("webp:85", "webp:85", "png", "raw"))]
        return dataclasses.replace(frame, window_start_ns=self.now_ns())

    def now_ns(self) -> int:
        """Start of the current valid window: the next one a valid block sends (at least)."""
        if self.clock_ns is not None:
            self.window = max(self.window, (self.clock_ns() - self.epoch_ns) // self.window_ns)
        return self.epoch_ns + self.window * self.window_ns

    def _data(self, msg: TokenMessage, variant: str, cls: str, payload: bytes | None = None) -> FuzzMessage:
        """A message on ``msg``'s own data topic."""
        payload = encode_message(msg) if payload is None else payload
        return FuzzMessage(cls, variant, data_topic(self.site, msg.node, msg.modality), payload)

    # ---------------------------------------------------------------- plan
    def plan(self, total: int, block_size: int = 250, warmup_block: int = 20) -> list[tuple[str, int]]:
        """Blocks of (class, message count), ``total`` messages in all (a little more when tiny).

        First a warm-up round (one small block of every class, valid first), then the rest in rounds
        of blocks of at most ``block_size``, classes in a seeded order per round. A valid block
        follows every malformed_lifecycle and huge_position block while valid messages are left: its
        births re-admit the nodes that hostile births refused, so the next data classes reach the
        checks behind the registry instead of stopping at ``refused_node``. The last block is valid
        (when the quota has two blocks or more): the aggregator must still produce results after
        everything else.
        """
        quotas = self._quotas(total)
        self._last_block, self._maybe_refused = "", False
        plan_rng = random.Random(self.seed ^ 0x5EED)
        blocks: list[tuple[str, int]] = []
        self._add_block(blocks, quotas, VALID, self.valid_block_size)
        final = quotas[VALID] >= self.valid_block_size
        quotas[VALID] -= self.valid_block_size if final else 0
        for cls in HOSTILE_WEIGHTS:
            self._add_block(blocks, quotas, cls, warmup_block)
        while any(q > 0 for q in quotas.values()):
            order = [c for c in CLASSES if quotas[c] > 0]
            plan_rng.shuffle(order)
            for cls in order:
                self._add_block(blocks, quotas, cls, block_size)
        if final:
            blocks.append((VALID, self.valid_block_size))
        return blocks

    def _add_block(self, blocks: list[tuple[str, int]], quotas: dict[str, int], cls: str, size: int) -> None:
        if quotas[cls] <= 0:
            return
        n = self.valid_block_size if cls == VALID else min(size, quotas[cls])
        blocks.append((cls, n))
        quotas[cls] -= n
        if cls in FOLLOWED_BY_VALID:
            self._add_block(blocks, quotas, VALID, self.valid_block_size)

    @property
    def valid_block_size(self) -> int:
        """Births of every node, then one full window of data."""
        return len(self.nodes) + len(self.pairs)

    def _quotas(self, total: int) -> dict[str, int]:
        n_valid = max(1, round(total * VALID_SHARE / self.valid_block_size)) * self.valid_block_size
        hostile = max(len(HOSTILE_WEIGHTS), total - n_valid)
        weight = sum(HOSTILE_WEIGHTS.values())
        quotas = {c: max(1, round(hostile * w / weight)) for c, w in HOSTILE_WEIGHTS.items()}
        quotas["oversize"] = min(quotas["oversize"], OVERSIZE_MAX)
        # Rounding: the largest class takes the difference, so the plan sums to ``total``.
        quotas["bitflip"] += hostile - sum(quotas.values())
        return {VALID: n_valid, **quotas}

    def block(self, cls: str, count: int) -> list[FuzzMessage]:
        """``count`` messages of ``cls`` (a valid block is always a full set of births + one window)."""
        after, self._last_block = self._last_block, cls
        if cls == VALID:
            births_first = after != "huge_position" or self._maybe_refused
            self._maybe_refused &= not births_first
            return self._valid_block(births_first)
        self._maybe_refused |= cls == "malformed_lifecycle"
        make = self._makers[cls]
        return [make() for _ in range(count)]

    def messages(self, total: int, block_size: int = 250) -> Iterator[tuple[int, FuzzMessage]]:
        """Every message of the plan with its block index, in order."""
        for index, (cls, count) in enumerate(self.plan(total, block_size)):
            for message in self.block(cls, count):
                yield index, message

    def _valid_block(self, births_first: bool = True) -> list[FuzzMessage]:
        """Births of every node and one full window of data, in that order unless ``births_first`` is
        False: then the data goes first, and its window closes under whatever positions the
        registry holds after the previous (hostile) block."""
        births = [FuzzMessage(VALID, "birth", birth_topic(self.site, n), b) for n, b in self.births.items()]
        start = self.now_ns()
        window = []
        for node, modality in self.pairs:
            msg = dataclasses.replace(self.frames[node, modality, "webp:85"], window_start_ns=start,
                                      seq=self.window)
            window.append(self._data(msg, "window", VALID))
        self.valid_starts.append(start)
        self.window += 1
        return births + window if births_first else window + births

    def _variant(self, table: dict[str, float]) -> str:
        names = list(table)
        return self.rng.choices(names, weights=[table[n] for n in names])[0]

    # ---------------------------------------------------------------- wire-level classes
    def _make_truncated(self) -> FuzzMessage:
        variant = self._variant({"cut_header": 1, "cut_body": 3, "trailing": 1, "cut_birth": 1})
        if variant == "cut_birth":
            node = self.rng.choice(self.nodes)
            payload = self.births[node]
            return FuzzMessage("truncated", variant, birth_topic(self.site, node),
                               payload[:self.rng.randrange(1, len(payload))])
        msg = self._pick()
        frame = encode_message(msg)
        if variant == "trailing":
            return self._data(msg, variant, "truncated", frame + self.rng.randbytes(self.rng.randint(1, 64)))
        cut = self.rng.randrange(1, HEADER_SIZE + 4) if variant == "cut_header" else \
            self.rng.randrange(HEADER_SIZE + 4, len(frame))
        return self._data(msg, variant, "truncated", frame[:cut])

    def _make_bitflip(self) -> FuzzMessage:
        msg = self._pick()
        frame = bytearray(encode_message(msg))
        flips = self.rng.sample(range(len(frame) * 8), self.rng.choice((1, 1, 2, 3, 8, 32)))
        for bit in flips:
            frame[bit >> 3] ^= 1 << (bit & 7)
        return self._data(msg, f"{len(flips)}_bits", "bitflip", bytes(frame))

    def _make_wrong_crc(self) -> FuzzMessage:
        msg = self._pick()
        return self._data(msg, "crc_xor", "wrong_crc", RawFrame.of(msg).pack(crc_xor=self.rng.randrange(1, 2**32)))

    def _make_huge_shape(self) -> FuzzMessage:
        shapes = {"max": (65535, 65535), "just_over": (1025, 1024), "tall": (65535, 17), "zero_side": (0, 64),
                  "plausible_wrong": (1000, 1000)}
        variant = self._variant({"max": 2, "just_over": 2, "tall": 1, "zero_side": 1, "plausible_wrong": 1})
        msg = self._pick()
        height, width = shapes[variant]
        return self._data(msg, variant, "huge_shape",
                          dataclasses.replace(RawFrame.of(msg), height=height, width=width).pack())

    def _make_decompression_bomb(self) -> FuzzMessage:
        variant = self._variant({"png_canvas_30000": 2, "png_idat_32mib": 2, "webp_canvas_16384": 2,
                                 "claims_65535": 1, "png_at_limit": 1, "raw32_zlib": 1})
        msg = self._pick("png")
        raw = RawFrame.of(msg)
        h, w = msg.shape
        changes: dict[str, Any] = {
            "png_canvas_30000": {"payload": _png(30000, 30000, self.zero_idat)},
            "png_idat_32mib": {"payload": _png(w, h, self.bomb_idat)},
            "webp_canvas_16384": {"payload": _webp_canvas(16384, 16384), "codec_id": CODECS["webp"].wire_id},
            "claims_65535": {"payload": _png(w, h, self.bomb_idat), "height": 65535, "width": 65535},
            "png_at_limit": {"payload": _png(1024, 1024, self.zero_idat), "height": 1024, "width": 1024},
            "raw32_zlib": {"payload": self.zero_idat, "codec_id": CODECS["raw32"].wire_id, "scale": 1.0,
                           "offset": 0.0},
        }[variant]
        return self._data(msg, variant, "decompression_bomb", dataclasses.replace(raw, **changes).pack())

    def _make_non_finite_scale(self) -> FuzzMessage:
        nan, inf = float("nan"), float("inf")
        values = {"scale_nan": (nan, None), "scale_inf": (inf, None), "scale_neg_inf": (-inf, None),
                  "offset_nan": (None, nan), "offset_inf": (None, inf), "both_nan": (nan, nan),
                  "scale_zero": (0.0, None), "scale_negative": (-1.0, None),
                  # Finite, but 255 codes times it overflow float32: the dequantized image is +-inf.
                  "scale_overflow": (3.0e38, None), "offset_overflow": (1.0e38, 3.0e38)}
        variant = self._variant({name: 1 for name in values})
        msg = self._pick(self.rng.choice(("webp:85", "png")))
        scale, offset = values[variant]
        raw = RawFrame.of(msg)
        raw = dataclasses.replace(raw, scale=raw.scale if scale is None else scale,
                                  offset=raw.offset if offset is None else offset)
        return self._data(msg, variant, "non_finite_scale", raw.pack())

    def _make_wrong_feature_hash(self) -> FuzzMessage:
        variant = self._variant({"random": 2, "other_modality": 1, "zeros": 1})
        msg = self._pick()
        other = next(m for m in self.layout.modalities if m != msg.modality)
        digest = {"random": self.rng.randbytes(8).hex(), "zeros": "0" * 16,
                  "other_modality": self.layout.modalities[other].features.hash}[variant]
        return self._data(msg, variant, "wrong_feature_hash",
                          encode_message(dataclasses.replace(msg, feature_hash=digest)))

    def _make_header_field(self) -> FuzzMessage:
        table = {"codec_0": {"codec_id": 0}, "codec_255": {"codec_id": 255}, "flags": {"flags": 0x80},
                 "lossless_on_png": {"flags": 1, "codec_id": CODECS["png"].wire_id}, "reserved": {"reserved": 1},
                 "quality_200": {"quality": 200}, "negative_start": {"start_ns": -1}, "version_2": {"version": 2},
                 "magic": {"magic": b"SPAZ"}, "node_non_ascii": {"node": "nö".encode()},
                 "node_slash": {"node": b"n0/1"}, "empty_node": {"node": b""}, "site_plus": {"site": b"park+lot"},
                 "codec_swapped": {"codec_id": CODECS["raw32"].wire_id}}
        variant = self._variant({name: 1 for name in table})
        msg = self._pick("webp:85")
        return self._data(msg, variant, "header_field", dataclasses.replace(RawFrame.of(msg), **table[variant]).pack())

    def _make_random_bytes(self) -> FuzzMessage:
        variant = self._variant({"data": 3, "data_magic_prefix": 2, "birth": 1, "state": 1})
        node, modality = self.rng.choice(self.pairs)
        payload = self.rng.randbytes(self.rng.randint(1, 4096))
        if variant == "data_magic_prefix":
            payload = MAGIC + bytes([self.rng.choice((1, 1, 2))]) + payload
        topic = {"birth": birth_topic(self.site, node), "state": state_topic(self.site, node)}.get(
            variant, data_topic(self.site, node, modality))
        return FuzzMessage("random_bytes", variant, topic, payload)

    def _make_empty_payload(self) -> FuzzMessage:
        variant = self._variant({"data": 2, "birth": 1, "state": 1})
        node, modality = self.rng.choice(self.pairs)
        topic = {"birth": birth_topic(self.site, node), "state": state_topic(self.site, node)}.get(
            variant, data_topic(self.site, node, modality))
        return FuzzMessage("empty_payload", variant, topic, b"")

    def _make_oversize(self) -> FuzzMessage:
        variant = self._variant({"over_wire_limit": 3, "near_wire_limit": 2, "birth_over_16k": 3,
                                 "state_over_16k": 1, "over_broker_limit": 1})
        msg = self._pick("webp:85")
        if variant in ("birth_over_16k", "state_over_16k"):
            pad = "x" * (MAX_LIFECYCLE_BYTES + self.rng.randint(1, 4096))
            node = msg.node
            if variant == "state_over_16k":
                body = json.dumps({"state": "offline", "bdSeq": VALID_BD_SEQ + 1, "pad": pad}).encode()
                return FuzzMessage("oversize", variant, state_topic(self.site, node), body)
            body = json.loads(self.births[node])
            body["firmware"] = pad
            return FuzzMessage("oversize", variant, birth_topic(self.site, node), json.dumps(body).encode())
        # A valid frame structure (CRC included) around random bytes: not an image (an image followed by
        # junk decodes, as Pillow stops at the image's end).
        target = {"over_wire_limit": self.limits.max_message_bytes + self.rng.randint(1, 256),
                  "near_wire_limit": self.limits.max_message_bytes - self.rng.randint(0, 256),
                  "over_broker_limit": BROKER_MESSAGE_LIMIT + self.rng.randint(1, 256)}[variant]
        raw = RawFrame.of(msg)
        overhead = len(raw.pack()) - len(raw.payload)
        payload = self.rng.randbytes(64) * ((target - overhead) // 64 + 1)
        frame = dataclasses.replace(raw, payload=payload[:target - overhead]).pack()
        return self._data(msg, variant, "oversize", frame)

    # ---------------------------------------------------------------- wrong clocks, poisoned births
    def _make_far_future(self) -> FuzzMessage:
        offsets = {"plus_10min": 600.0, "plus_1h": 3600.0, "plus_1d": 86_400.0, "plus_10y": 10 * YEAR_S}
        variant = self._variant({"plus_10min": 1, "plus_1h": 3, "plus_1d": 1, "plus_10y": 2, "after_2116": 1,
                                 "int64_max": 1})
        now = self.now_ns()
        start = {"after_2116": 2**62 + self.rng.randrange(1, 10**18), "int64_max": 2**63 - 1}.get(variant)
        if start is None:
            start = now + int(offsets[variant] * 1e9)
        return self._clock_message("far_future", variant, start)

    def _make_far_past(self) -> FuzzMessage:
        offsets = {"minus_10min": 600.0, "minus_1h": 3600.0, "minus_3d": 3 * 86_400.0, "minus_10y": 10 * YEAR_S}
        variant = self._variant({"minus_10min": 1, "minus_1h": 3, "minus_3d": 1, "minus_10y": 2, "epoch_zero": 1,
                                 "epoch_1s": 1})
        start = {"epoch_zero": 0, "epoch_1s": 10**9}.get(variant)
        if start is None:
            start = self.now_ns() - int(offsets[variant] * 1e9)
        return self._clock_message("far_past", variant, start)

    def _clock_message(self, cls: str, variant: str, start_ns: int) -> FuzzMessage:
        """A valid frame (CRC and all) from one of ``clock_nodes``, stamped ``start_ns``."""
        node, modality = self.rng.choice(self.clock_pairs)
        frame = self.frames[node, modality, self.rng.choice(("webp:85", "png"))]
        return self._data(dataclasses.replace(frame, window_start_ns=start_ns), variant, cls)

    def _make_huge_position(self) -> FuzzMessage:
        node = self.rng.choice(self.nodes)
        x, y = self.layout.node(node).position[:2]
        positions = {"x_1e39": (1e39, y),  # finite in JSON and float64, inf in float32
                     "y_minus_3e38": (x, -3e38),  # finite in float32; squared distances are not
                     "both_1e30": (1e30, 1e30), "float32_max": (3.4e38, 3.4e38),
                     "km_50": (x + 50_000.0, y), "km_50_diagonal": (x - 35_400.0, y + 35_400.0)}
        variant = self._variant({name: 1 for name in positions})
        position = positions[variant] + tuple(self.layout.node(node).position[2:])
        return FuzzMessage("huge_position", variant, birth_topic(self.site, node),
                           self._birth(node, position=position).to_json())

    def _make_description_churn(self) -> FuzzMessage:
        node = self.rng.choice(self.nodes)
        self._churned += 1
        head = f"churn {self._churned:07d}: "
        words = []
        while sum(len(w) + 1 for w in words) < CHURN_DESCRIPTION_CHARS:
            words.append("".join(self.rng.choices("abcdefghijklmnopqrstuvwxyz", k=self.rng.randint(2, 9))))
        text = (head + " ".join(words))[:CHURN_DESCRIPTION_CHARS]
        return FuzzMessage("description_churn", "distinct_500_chars", birth_topic(self.site, node),
                           self._birth(node, description=text).to_json())

    # ---------------------------------------------------------------- identity and topics
    def _make_spoofed_node(self) -> FuzzMessage:
        variant = self._variant({"other_node_payload": 3, "other_modality_payload": 1, "other_site_payload": 1,
                                 "unknown_node": 2, "max_length_node": 1, "unknown_modality": 1,
                                 "aggregator_data": 1, "birth_other_node": 2, "birth_unknown_node": 1,
                                 "state_unknown_node": 1})
        msg = self._pick()
        return self._spoof(variant, msg)

    def _spoof(self, variant: str, msg: TokenMessage) -> FuzzMessage:
        cls, site = "spoofed_node", self.site
        other_node = self.rng.choice([n for n in self.nodes if n != msg.node])
        stranger = self.rng.choice(("n99", "n00", "N01", "n1", "n01-spoof"))
        if variant == "other_node_payload":
            return FuzzMessage(cls, variant, data_topic(site, other_node, msg.modality), encode_message(msg))
        if variant == "other_modality_payload":
            other = next(m for m in self.layout.modalities if m != msg.modality)
            return FuzzMessage(cls, variant, data_topic(site, msg.node, other), encode_message(msg))
        if variant == "other_site_payload":
            spoof = dataclasses.replace(msg, site="other_site")
            return FuzzMessage(cls, variant, data_topic(site, msg.node, msg.modality), encode_message(spoof))
        if variant in ("unknown_node", "max_length_node"):
            node = stranger if variant == "unknown_node" else "n" * 64
            return self._data(dataclasses.replace(msg, node=node), variant, cls)
        if variant == "unknown_modality":
            return self._data(dataclasses.replace(msg, modality="lidar"), variant, cls)
        if variant == "aggregator_data":
            return FuzzMessage(cls, variant, f"spar/v1/{site}/aggregator/data/{msg.modality}", encode_message(msg))
        if variant == "birth_other_node":
            return FuzzMessage(cls, variant, birth_topic(site, other_node), self.births[msg.node])
        if variant == "birth_unknown_node":
            body = self._birth(msg.node, node=stranger, position=(20.0, 15.0)).to_json()
            return FuzzMessage(cls, variant, birth_topic(site, stranger), body)
        return FuzzMessage(cls, variant, state_topic(site, stranger), StateMessage("offline", 99).to_json())

    def _make_unicode_topic(self) -> FuzzMessage:
        variant = self._variant({**{name: 1.0 for name in _TOPIC_VARIANTS}, **_RARE_TOPIC_VARIANTS})
        msg = self._pick("webp:85")
        birth = variant.endswith("_birth")
        payload = self.births[msg.node] if birth else encode_message(msg)
        topic = _TOPIC_VARIANTS_ALL[variant](self.site, msg.node, msg.modality)
        return FuzzMessage("unicode_topic", variant, topic, payload)

    # ---------------------------------------------------------------- lifecycle JSON
    def _make_malformed_lifecycle(self) -> FuzzMessage:
        node = self.rng.choice(self.nodes)
        if self.rng.random() < 0.3:
            variant = self._variant({name: 1 for name in _STATE_VARIANTS})
            topic_node = "n99" if variant == "state_unknown_node" else node
            return FuzzMessage("malformed_lifecycle", variant, state_topic(self.site, topic_node),
                               _STATE_VARIANTS[variant]())
        variant = self._variant({name: 1 for name in _BIRTH_VARIANTS})
        body = json.loads(self.births[node])
        return FuzzMessage("malformed_lifecycle", variant, birth_topic(self.site, node),
                           _BIRTH_VARIANTS[variant](body))


# --------------------------------------------------------------------------- topic variants
_FULLWIDTH = str.maketrans("0123456789n", "０１２３４５６７８９ｎ")
# name -> (site, node, modality) -> topic; every one matches an aggregator filter unless it says so.
_TOPIC_VARIANTS: dict[str, Callable[[str, str, str], str]] = {
    "non_ascii_node": lambda s, n, m: f"spar/v1/{s}/{n}ö/data/{m}",
    "non_ascii_modality": lambda s, n, m: f"spar/v1/{s}/{n}/data/{m}é",
    "emoji_node": lambda s, n, m: f"spar/v1/{s}/\U0001f697/data/{m}",
    "fullwidth_node": lambda s, n, m: f"spar/v1/{s}/{n.translate(_FULLWIDTH)}/data/{m}",
    "zero_width_node": lambda s, n, m: f"spar/v1/{s}/{n}\u200b/data/{m}",
    "combining_node": lambda s, n, m: f"spar/v1/{s}/{n}\u0301/data/{m}",
    "rtl_override_birth": lambda s, n, m: f"spar/v1/{s}/\u202e{n}/birth",
    "arabic_digit_birth": lambda s, n, m: f"spar/v1/{s}/n0\u0661/birth",
    "empty_node": lambda s, n, m: f"spar/v1/{s}//data/{m}",
    "empty_modality": lambda s, n, m: f"spar/v1/{s}/{n}/data/",
    "empty_node_birth": lambda s, n, m: f"spar/v1/{s}//birth",
    "space_in_node": lambda s, n, m: f"spar/v1/{s}/{n} /data/{m}",
    "long_node": lambda s, n, m: f"spar/v1/{s}/{'n' * 5000}/data/{m}",
    "lookalike_id": lambda s, n, m: f"spar/v1/{s}/{n}./data/{m}",
    "aggregator_state_birth": lambda s, n, m: f"spar/v1/{s}/aggregator/state",
    "aggregator_birth": lambda s, n, m: f"spar/v1/{s}/aggregator/birth",
    # Outside the aggregator's filters: the broker delivers them to nobody.
    "extra_level": lambda s, n, m: f"spar/v1/{s}/{n}/data/{m}/extra",
    "wrong_version": lambda s, n, m: f"spar/v2/{s}/{n}/data/{m}",
    "upper_prefix": lambda s, n, m: f"SPAR/v1/{s}/{n}/data/{m}",
    "leading_slash": lambda s, n, m: f"/spar/v1/{s}/{n}/data/{m}",
    "other_site": lambda s, n, m: f"spar/v1/other_site/{n}/data/{m}",
    "unicode_site_birth": lambda s, n, m: f"spar/v1/{s}é/{n}/birth",
}
# Topics one side refuses: paho (wildcards, lone surrogates, > 65535 bytes) or Mosquitto, which drops
# the connection on control characters, NUL and Unicode noncharacters. Rare: each costs a connection.
_RARE = {
    "wildcard_plus": lambda s, n, m: f"spar/v1/{s}/+/data/{m}",
    "wildcard_hash": lambda s, n, m: f"spar/v1/{s}/{n}/#",
    "lone_surrogate": lambda s, n, m: f"spar/v1/{s}/\ud800/data/{m}",
    "too_long": lambda s, n, m: f"spar/v1/{s}/{'n' * 70000}/data/{m}",
    "control_char_birth": lambda s, n, m: f"spar/v1/{s}/{n}\x01/birth",
    "nul_birth": lambda s, n, m: f"spar/v1/{s}/{n}\x00/birth",
    "noncharacter": lambda s, n, m: f"spar/v1/{s}/{n}\uffff/data/{m}",
    "c1_control": lambda s, n, m: f"spar/v1/{s}/{n}\x85/data/{m}",
}
_TOPIC_VARIANTS_ALL = {**_TOPIC_VARIANTS, **_RARE}
_RARE_TOPIC_VARIANTS = {name: 0.15 for name in _RARE}


# --------------------------------------------------------------------------- lifecycle variants
def _dumps(body: Any) -> bytes:
    return json.dumps(body).encode()


def _with(body: dict[str, Any], path: tuple[str, ...], value: Any) -> bytes:
    """``body`` with the value at ``path`` replaced, as JSON."""
    body = json.loads(json.dumps(body))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return _dumps(body)


def _literal(body: dict[str, Any], key: str, text: str) -> bytes:
    """``body`` with ``key`` set to a JSON literal json.dumps cannot write (NaN, 1e999, huge ints)."""
    marker = "__FUZZ_LITERAL__"
    return _with(body, (key,), marker).replace(f'"{marker}"'.encode(), text.encode())


def _modality_field(body: dict[str, Any], key: str, value: Any) -> bytes:
    first = next(iter(body["modalities"]))
    return _with(body, ("modalities", first, key), value)


_BIRTH_VARIANTS: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "not_json": lambda b: b"{site: parking_lot, node:",
    "invalid_utf8": lambda b: b'{"site": "\xff\xfe"}',
    "utf8_bom": lambda b: b"\xef\xbb\xbf" + _dumps(b),
    "top_level_array": lambda b: _dumps([b]),
    "top_level_null": lambda b: b"null",
    "top_level_string": lambda b: b'"birth"',
    "deep_array": lambda b: b"[" * 8000 + b"]" * 8000,
    "deep_object": lambda b: b'{"a":' * 2500 + b"1" + b"}" * 2500,
    "deep_position": lambda b: _with(b, ("position",), json.loads("[" * 900 + "]" * 900)),
    "bdseq_4000_digits": lambda b: _literal(b, "bdSeq", "9" * 4000),
    "bdseq_5000_digits": lambda b: _literal(b, "bdSeq", "9" * 5000),  # over Python's int parsing limit
    "position_huge_int": lambda b: _literal(b, "position", f"[1{'0' * 400}, 1]"),  # overflows float()
    "bdseq_huge_float": lambda b: _literal(b, "bdSeq", "1e999"),
    "bdseq_string": lambda b: _with(b, ("bdSeq",), "7"),
    "bdseq_bool": lambda b: _with(b, ("bdSeq",), True),
    "bdseq_float": lambda b: _with(b, ("bdSeq",), 7.0),
    "bdseq_negative": lambda b: _with(b, ("bdSeq",), -1),
    "bdseq_2_pow_31": lambda b: _with(b, ("bdSeq",), 2**31),
    "position_nan": lambda b: _literal(b, "position", "[NaN, 1.0]"),
    "position_inf": lambda b: _literal(b, "position", "[1e999, 1.0]"),
    "position_strings": lambda b: _with(b, ("position",), ["1", "2"]),
    "position_4d": lambda b: _with(b, ("position",), [1, 2, 3, 4]),
    "position_dict": lambda b: _with(b, ("position",), {"x": 1, "y": 2}),
    "position_3d": lambda b: _with(b, ("position",), [1.0, 2.0, 3.0]),
    "modalities_list": lambda b: _with(b, ("modalities",), ["microphone"]),
    "modalities_empty": lambda b: _with(b, ("modalities",), {}),
    "modalities_unknown_only": lambda b: _with(b, ("modalities",), {
        "lidar": {"feature_hash": "0" * 16, "sample_rate_hz": 10.0, "channels": 1}}),
    "modality_name_unicode": lambda b: _with(b, ("modalities",), {
        "micrófono": next(iter(b["modalities"].values()))}),
    "feature_hash_upper": lambda b: _modality_field(b, "feature_hash", "ABCDEF0123456789"),
    "feature_hash_short": lambda b: _modality_field(b, "feature_hash", "abc"),
    "feature_hash_other": lambda b: _modality_field(b, "feature_hash", "0123456789abcdef"),
    "channels_zero": lambda b: _modality_field(b, "channels", 0),
    "channels_huge": lambda b: _modality_field(b, "channels", 10**12),
    "sample_rate_negative": lambda b: _modality_field(b, "sample_rate_hz", -16000),
    "sample_rate_string": lambda b: _modality_field(b, "sample_rate_hz", "16k"),
    "site_number": lambda b: _with(b, ("site",), 5),
    "site_other": lambda b: _with(b, ("site",), "other_site"),
    "node_unicode": lambda b: _with(b, ("node",), "nö1"),
    "description_5000": lambda b: _with(b, ("description",), "d" * 5000),
    "firmware_object": lambda b: _with(b, ("firmware",), {"v": 1}),
    "duplicate_key": lambda b: _dumps(b)[:-1] + b', "bdSeq": "x"}',
    "missing_node": lambda b: _dumps({k: v for k, v in b.items() if k != "node"}),
}

_STATE_VARIANTS: dict[str, Callable[[], bytes]] = {
    "state_not_json": lambda: b"online",
    "state_upper": lambda: _dumps({"state": "ONLINE", "bdSeq": VALID_BD_SEQ}),
    "state_missing_bdseq": lambda: _dumps({"state": "offline"}),
    "state_negative_bdseq": lambda: _dumps({"state": "offline", "bdSeq": -5}),
    "state_bdseq_2_pow_31": lambda: _dumps({"state": "offline", "bdSeq": 2**31}),
    "state_bdseq_4000_digits": lambda: b'{"state": "offline", "bdSeq": ' + b"9" * 4000 + b"}",
    "state_bdseq_5000_digits": lambda: b'{"state": "offline", "bdSeq": ' + b"9" * 5000 + b"}",
    "state_array": lambda: _dumps(["offline", VALID_BD_SEQ]),
    "state_deep": lambda: b'{"state":' * 3000 + b'"x"' + b"}" * 3000,
    "state_null": lambda: b"null",
    "state_stale": lambda: _dumps({"state": "offline", "bdSeq": VALID_BD_SEQ - 3}),
    "state_unknown_node": lambda: _dumps({"state": "offline", "bdSeq": 1}),
}


# =========================================================================== the aggregator process
_METRIC_LINE = re.compile(r'^(spar_messages_total|spar_messages_rejected_total)\{(?:outcome|reason)="([^"]*)"\} (\S+)$')


def parse_counts(text: str) -> Counter[str]:
    """The aggregator's message counters from /metrics text, keyed like its own Counter."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if match:
            family, label, value = match.groups()
            key = f"rejected.{label}" if family == "spar_messages_rejected_total" else label
            counts[key] += int(float(value))
    return counts


def rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` (VmRSS) in MiB; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def start_aggregator(workdir: Path, site: Path, model: Path, broker_port: int) -> AggregatorProcess:
    """The aggregator under test, as a child process with its own config, log and (fresh) database."""
    for old in ("results.sqlite3", "results.sqlite3-wal", "results.sqlite3-shm"):  # a previous run's
        (workdir / old).unlink(missing_ok=True)
    config = workdir / "aggregator.toml"
    config.write_text(
        f'[aggregator]\nsite = "{site.resolve()}"\nmodel = "{model.resolve()}"\n'
        f'database = "{(workdir / "results.sqlite3").resolve()}"\nmetrics_port = 0\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\n')
    (workdir / "aggregator.log").unlink(missing_ok=True)
    aggregator = AggregatorProcess(config, workdir / "aggregator.log")
    aggregator.start()
    return aggregator


def aggregator_counts(aggregator: AggregatorProcess) -> Counter[str] | None:
    """Message counters from its /metrics; None if the endpoint does not answer."""
    text = aggregator.metrics_text()
    return None if text is None else parse_counts(text)


# =========================================================================== the publisher
def broker_refuses_topic(topic: str) -> bool:
    """Whether Mosquitto drops a connection that publishes to ``topic`` (its UTF-8 rules, MQTT 5 1.5.4)."""
    return any(code <= 0x1F or 0x7F <= code <= 0x9F or 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE
               for code in map(ord, topic))


class FuzzPublisher:
    """One MQTT 5 session publishing at QoS 1 with at most ``max_inflight`` unacknowledged messages.

    Counts PUBACK reason codes: "Success" means the broker delivered to a subscriber (the
    aggregator is the only one), "No matching subscribers" that the topic reaches nobody.
    """

    def __init__(self, host: str, port: int, max_inflight: int = 100):
        import paho.mqtt.client as mqtt

        self.host, self.port = host, port
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="spar-fuzzer", protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.slots = threading.BoundedSemaphore(max_inflight)
        self.lock = threading.Condition()
        self.codes: Counter[int] = Counter()  # PUBACK reason code value -> count
        self.sent = 0
        self.acked = 0
        self.disconnects = 0
        self.connected = threading.Event()

    def start(self, timeout_s: float = 10.0) -> FuzzPublisher:
        """Connect (clean session) and wait for the CONNACK."""
        self.client.connect(self.host, self.port, keepalive=60)
        self.client.loop_start()
        if not self.connected.wait(timeout_s):
            raise BenchError(f"fuzz publisher: no CONNACK from 127.0.0.1:{self.port} in {timeout_s:.0f} s")
        return self

    def stop(self) -> None:
        """Disconnect and end paho's network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self.lock:
            self.disconnects += 1
        self.connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self.lock:
            self.codes[int(getattr(reason_code, "value", reason_code))] += 1
            self.acked += 1
            self.lock.notify_all()
        self.slots.release()

    def publish(self, topic: str, payload: bytes, timeout_s: float = 30.0) -> bool:
        """Publish at QoS 1; False if paho refuses the topic (ValueError, e.g. wildcards)."""
        if not self.slots.acquire(timeout=timeout_s):
            raise BenchError(f"no PUBACK for {timeout_s:.0f} s with the in-flight window full")
        try:
            self.client.publish(topic, payload, qos=1)
        except ValueError:  # UnicodeEncodeError included: lone surrogates
            self.slots.release()
            return False
        with self.lock:
            self.sent += 1
        return True

    def wait_acked(self, timeout_s: float = 30.0) -> bool:
        """Until every message sent so far has its PUBACK."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while self.acked < self.sent:
                left = deadline - time.monotonic()
                if left <= 0 or not self.lock.wait(left):
                    return self.acked >= self.sent
        return True

    def snapshot(self) -> Counter[int]:
        """PUBACK reason codes so far (code value -> count)."""
        with self.lock:
            return Counter(self.codes)


def publish_once(host: str, port: int, topic: str, payload: bytes, timeout_s: float = 5.0) -> int | None:
    """Publish one message on a throwaway connection: the PUBACK reason code, or None if the broker
    dropped the connection (or nothing came back in time)."""
    import paho.mqtt.client as mqtt

    outcome: dict[str, int | None] = {}
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_publish(c, u, mid, reason_code, properties) -> None:
        outcome["code"] = int(getattr(reason_code, "value", reason_code))
        done.set()

    client.on_publish = on_publish
    client.on_disconnect = lambda *args: done.set()
    # Looped by hand, not by loop_start: paho's network thread would wait out a reconnect back-off
    # (a second or more) after the broker dropped us.
    client.connect(host, port, keepalive=10)
    try:
        client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + timeout_s
        while not done.is_set() and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != 0:  # connection gone
                break
    finally:
        client.disconnect()
    return outcome.get("code")


# =========================================================================== report
SUCCESS, NO_SUBSCRIBERS = 0x00, 0x10


@dataclass
class ClassTally:
    """What happened to one class's messages."""

    sent: int = 0
    client_refused: int = 0  # paho would not send the topic
    broker_refused: int = 0  # Mosquitto dropped the connection or answered a failure code
    acked: int = 0  # PUBACK received
    no_subscribers: int = 0  # acknowledged, delivered to nobody (topic outside the aggregator's filters)
    delivered: int = 0  # acknowledged with Success: the aggregator got it
    matched: int = 0  # accepted by the broker, topic matching the aggregator's filters (must equal delivered)
    outcomes: Counter[str] = field(default_factory=Counter)  # aggregator counter deltas
    variants: Counter[str] = field(default_factory=Counter)

    @property
    def counted(self) -> int:
        """Messages the aggregator counted for this class, whatever the outcome."""
        return sum(self.outcomes.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k not in ("outcomes", "variants")},
                "counted": self.counted, "outcomes": dict(sorted(self.outcomes.items())),
                "variants": dict(sorted(self.variants.items()))}


@dataclass
class FuzzReport:
    """One fuzz run: per-class tallies, totals, memory, process health."""

    seed: int
    messages: int  # planned
    machine: str
    classes: dict[str, ClassTally]
    duration_s: float = 0.0  # first publish -> last block counted
    rss_idle_mib: float | None = None  # after start-up, before any message
    rss_start_mib: float | None = None  # after the warm-up round (every class once)
    rss_peak_mib: float | None = None
    rss_end_mib: float | None = None
    rss_samples: list[tuple[int, float]] = field(default_factory=list)  # (messages sent, MiB)
    crashes: int = 0  # the aggregator exited before SIGTERM
    exit_code: int | None = None  # after SIGTERM; None = had to be killed
    log_problems: list[str] = field(default_factory=list)  # ERROR lines, and what each traceback raised
    reproducers: list[dict[str, Any]] = field(default_factory=list)  # see triage()
    overcounted: int = 0  # counted beyond what was delivered (a message counted twice)
    publisher_disconnects: int = 0  # the main session lost: would resend, so counts become unreliable
    baseline: dict[str, int] = field(default_factory=dict)  # counters before the first fuzz message
    final_counts: dict[str, int] = field(default_factory=dict)  # the aggregator's own, printed at exit
    aborted: str = ""  # why the run stopped early, if it did
    epoch_ns: int = BASE_EPOCH_NS  # the generator's first window start (triage regenerates from it)
    # One per valid block: block index, messages sent before it, its window start, whether a result
    # for that window was stored (filled from the database after shutdown).
    valid_windows: list[dict[str, Any]] = field(default_factory=list)
    first_hostile_block: int | None = None
    results_stored: int = 0  # rows in the aggregator's result database after shutdown
    results_non_finite: int = 0  # of those, with NaN or +-inf anywhere in the payload
    results_unmatched: int = 0  # of those, for a window no valid block sent
    results_error: str = ""  # why the database could not be read

    # ---------------------------------------------------------------- totals
    def total(self, name: str) -> int:
        """A ClassTally field summed over the classes."""
        return sum(getattr(t, name) for t in self.classes.values())

    @property
    def counted(self) -> int:
        """Messages the aggregator counted, all classes."""
        return sum(t.counted for t in self.classes.values())

    @property
    def unaccounted(self) -> int:
        """Delivered but not counted (negative: counted more than delivered)."""
        return self.total("delivered") - self.counted

    @property
    def by_reason(self) -> Counter[str]:
        """Counted messages by outcome, all classes."""
        out: Counter[str] = Counter()
        for tally in self.classes.values():
            out.update(tally.outcomes)
        return out

    @property
    def exit_counted(self) -> int | None:
        """Messages the aggregator's exit line counted beyond the baseline (None: no exit line)."""
        if not self.final_counts:
            return None
        return sum(self.final_counts.values()) - sum(self.baseline.values())

    @property
    def rss_growth_mib(self) -> float | None:
        """VmRSS at the end minus after warm-up; None if either is missing."""
        if self.rss_start_mib is None or self.rss_end_mib is None:
            return None
        return self.rss_end_mib - self.rss_start_mib

    @property
    def messages_per_s(self) -> float:
        """Messages sent per second of fuzzing, waits for the aggregator to count them included."""
        return self.total("sent") / self.duration_s if self.duration_s > 0 else 0.0

    def hostile_accepted(self) -> dict[str, int]:
        """Hostile messages the aggregator accepted, per class (should be none; classes of valid
        messages, ACCEPTED_CLASSES, are not counted)."""
        out = {c: sum(n for o, n in t.outcomes.items() if not is_rejection(o))
               for c, t in self.classes.items() if c not in ACCEPTED_CLASSES}
        return {c: n for c, n in out.items() if n}

    @property
    def valid_during_fuzz(self) -> list[dict[str, Any]]:
        """Valid windows sent after the first hostile block."""
        first = self.first_hostile_block
        return [] if first is None else [w for w in self.valid_windows if w["block"] > first]

    @property
    def valid_missing(self) -> list[dict[str, Any]]:
        """Valid windows sent during the fuzz with no stored result (should be none)."""
        return [w for w in self.valid_during_fuzz if not w["stored"]]

    def _missing_text(self) -> str:
        missing = self.valid_missing
        if not missing:
            return ""
        return (f"{len(missing)} of {len(self.valid_during_fuzz)} valid windows sent during the fuzz have no "
                f"stored result (first missing: block {missing[0]['block']}, after {missing[0]['sent_before']:,} "
                "messages)")

    def unexpected(self) -> dict[str, dict[str, int]]:
        """Outcomes outside each class's expected set (``shed``, the overload policy's, fits any class)."""
        out = {c: {o: n for o, n in t.outcomes.items() if o not in EXPECTED[c] and o != SHED}
               for c, t in self.classes.items()}
        return {c: o for c, o in out.items() if o}

    def problems(self, rss_bound_mib: float = RSS_BOUND_MIB) -> list[str]:
        """Every way this run failed the issue's bar; empty when it passed."""
        checks = [
            (bool(self.aborted), f"run aborted: {self.aborted}"),
            (self.crashes > 0, f"the aggregator crashed ({self.crashes})"),
            (self.exit_code != 0, f"exit code after SIGTERM: {self.exit_code}"),
            (self.unaccounted != 0, f"{self.unaccounted} delivered message(s) not counted"),
            (self.overcounted != 0, f"{self.overcounted} message(s) counted beyond delivery"),
            (self.exit_counted != self.total("delivered"),
             f"the aggregator's exit line counts {self.exit_counted}, {self.total('delivered')} were delivered"),
            (self.by_reason.get("rejected.internal_error", 0) > 0,
             f"{self.by_reason.get('rejected.internal_error', 0)} internal_error(s)"),
            (bool(self.log_problems), f"{len(self.log_problems)} error/traceback log line(s)"),
            (bool(self.hostile_accepted()), f"hostile messages accepted: {self.hostile_accepted()}"),
            (self.total("matched") != self.total("delivered"),
             f"the broker delivered {self.total('delivered')}, the aggregator's filters match {self.total('matched')}"),
            (self.publisher_disconnects > 0, f"publisher lost its session {self.publisher_disconnects} time(s)"),
            (self.rss_growth_mib is None or self.rss_growth_mib > rss_bound_mib,
             f"RSS growth {_mib(self.rss_growth_mib)} MiB (bound {rss_bound_mib:g})"),
            (bool(self.results_error), f"result database not readable: {self.results_error}"),
            (bool(self.valid_missing), self._missing_text()),
            (self.results_non_finite > 0, f"{self.results_non_finite} stored result(s) hold NaN or infinity"),
        ]
        return [text for failed, text in checks if failed]

    # ---------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (fuzz.json)."""
        return {
            "seed": self.seed, "messages": self.messages, "machine": self.machine,
            "totals": {name: self.total(name) for name in ("sent", "client_refused", "broker_refused", "acked",
                                                             "no_subscribers", "delivered", "matched")}
            | {"counted": self.counted, "unaccounted": self.unaccounted, "overcounted": self.overcounted},
            "by_reason": dict(sorted(self.by_reason.items())),
            "classes": {c: t.to_dict() for c, t in self.classes.items()},
            "duration_s": round(self.duration_s, 2), "messages_per_s": round(self.messages_per_s, 1),
            "rss_mib": {"idle": self.rss_idle_mib, "start": self.rss_start_mib, "peak": self.rss_peak_mib,
                        "end": self.rss_end_mib, "growth": self.rss_growth_mib},
            "rss_samples": self.rss_samples, "crashes": self.crashes, "exit_code": self.exit_code,
            "log_problems": self.log_problems, "reproducers": self.reproducers,
            "publisher_disconnects": self.publisher_disconnects,
            "baseline": self.baseline, "final_counts": self.final_counts, "exit_counted": self.exit_counted,
            "hostile_accepted": self.hostile_accepted(),
            "unexpected": self.unexpected(), "aborted": self.aborted, "problems": self.problems(),
            "epoch_ns": self.epoch_ns, "valid_windows": self.valid_windows,
            "first_hostile_block": self.first_hostile_block,
            "results": {"stored": self.results_stored, "non_finite": self.results_non_finite,
                        "unmatched": self.results_unmatched, "error": self.results_error,
                        "valid_during_fuzz": len(self.valid_during_fuzz),
                        "valid_during_fuzz_stored": len(self.valid_during_fuzz) - len(self.valid_missing)},
        }

    def to_json(self) -> str:
        """fuzz.json."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_markdown(self) -> str:
        """fuzz.md: verdict, totals, one row per class, counts by outcome, reproducers."""
        problems = self.problems()
        lines = [
            "# Hostile-input fuzzing of the aggregator (`spar-bench fuzz`)", "",
            f"{self.machine} · seed {self.seed} · {self.total('sent'):,} messages sent · "
            f"aggregator `spar-aggregator run` (subprocess, shipped parking-lot model) · private Mosquitto",
            "", f"**{'PASS' if not problems else 'FAIL'}**" + ("" if not problems else ": " + "; ".join(problems)),
            "", *self._summary_table(), "", *self._class_table(), "", *self._reason_table(), "",
            *self._problem_lines(),
            "Delivered: PUBACK *Success* (the aggregator is the only subscriber); *no subscribers*: the topic is "
            "outside its filters. Client-refused: paho will not send the topic; broker-refused: Mosquitto drops the "
            "connection (control characters, noncharacters, over its message_size_limit). Outcomes are the "
            "aggregator's own counters (/metrics), attributed to a class by sending one class per block and "
            "waiting until every delivered message of the block is counted.",
        ]
        return "\n".join(lines) + "\n"

    def _summary_table(self) -> list[str]:
        t = self.total
        rss = " / ".join(_mib(v) for v in (self.rss_idle_mib, self.rss_start_mib, self.rss_peak_mib, self.rss_end_mib))
        rows = [("sent", f"{t('sent'):,}"), ("refused by the client (paho)", f"{t('client_refused'):,}"),
                ("refused by the broker", f"{t('broker_refused'):,}"), ("acknowledged (PUBACK)", f"{t('acked'):,}"),
                ("no matching subscribers", f"{t('no_subscribers'):,}"),
                ("delivered to the aggregator", f"{t('delivered'):,}"),
                ("of those, topics matching its filters (check)", f"{t('matched'):,}"),
                ("counted by the aggregator", f"{self.counted:,}"),
                ("unaccounted (delivered - counted)", f"{self.unaccounted:,}"),
                ("counted beyond delivery", f"{self.overcounted:,}"),
                ("counted, by the aggregator's exit line", f"{self.exit_counted}"), ("crashes", str(self.crashes)),
                ("internal errors", str(self.by_reason.get("rejected.internal_error", 0))),
                ("error / traceback log lines", str(len(self.log_problems))),
                ("exit code after SIGTERM", str(self.exit_code)),
                ("RSS idle / after warm-up / peak / end (MiB)", rss),
                ("RSS growth after warm-up (MiB)", _mib(self.rss_growth_mib)),
                ("valid windows sent during the fuzz / with a stored result",
                 f"{len(self.valid_during_fuzz)} / {len(self.valid_during_fuzz) - len(self.valid_missing)}"),
                ("stored results / with NaN or inf / for no valid window",
                 f"{self.results_stored} / {self.results_non_finite} / {self.results_unmatched}"),
                ("duration (s)", f"{self.duration_s:.1f}"), ("messages/s", f"{self.messages_per_s:,.0f}")]
        return ["| | |", "|---|---:|", *[f"| {k} | {v} |" for k, v in rows]]

    def _class_table(self) -> list[str]:
        lines = ["| class | sent | client-refused | broker-refused | no subscribers | delivered | counted | "
                 "outcomes |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, t in self.classes.items():
            outcomes = ", ".join(f"{o} {n:,}" for o, n in t.outcomes.most_common())
            lines.append(f"| {name} | {t.sent:,} | {t.client_refused:,} | {t.broker_refused:,} | {t.no_subscribers:,} "
                         f"| {t.delivered:,} | {t.counted:,} | {outcomes} |")
        return lines

    def _problem_lines(self) -> list[str]:
        lines = []
        if self.reproducers:
            lines += ["Reproducers (the same message replayed through the wire parsers in-process):", "",
                      "| class | variant | problem | topic | bytes | file |", "|---|---|---|---|---:|---|"]
            lines += [f"| {r['class']} | {r['variant']} | {r['problem']} | `{r['topic'][:80]}` | "
                      f"{r['payload_bytes']:,} | {r['file']} |" for r in self.reproducers]
            lines.append("")
        if self.log_problems:
            lines += ["Aggregator log (errors, and what each traceback raised; first 10):", "", "```",
                      *self.log_problems[:10], "```", ""]
        return lines

    def _reason_table(self) -> list[str]:
        lines = ["| outcome (aggregator counter) | messages |", "|---|---:|"]
        return lines + [f"| {o} | {n:,} |" for o, n in sorted(self.by_reason.items())]


def _mib(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.1f}"


# =========================================================================== the run
@dataclass(frozen=True)
class FuzzConfig:
    """What ``spar-bench fuzz`` runs: how many messages, which seed, site and model, and its bounds."""

    messages: int = 10_000
    seed: int = 0
    site: Path = DEFAULT_SITE
    model: Path = DEFAULT_MODEL
    block_size: int = 250  # one class per block; outcomes are read between blocks
    max_inflight: int = 100  # unacknowledged QoS 1 messages
    budget_s: float = 1800.0  # of fuzzing (after start-up); the run stops there and fails
    drain_timeout_s: float = 30.0  # a block whose messages are not all counted by then is given up
    progress: bool = True  # tqdm bar over the messages


class _Run:
    """State of one run: the broker, the aggregator, the publisher, the tallies."""

    def __init__(self, config: FuzzConfig, generator: FuzzGenerator, broker: LocalBroker,
                 aggregator: AggregatorProcess, publisher: FuzzPublisher, workdir: Path):
        self.config, self.generator, self.broker = config, generator, broker
        self.workdir = workdir
        self.aggregator, self.publisher = aggregator, publisher
        # The aggregator's subscriptions: what they match is what the broker must deliver.
        self.filters = [site_filter(generator.site, kind) for kind in ("birth", "state", "data")]
        self.report = FuzzReport(config.seed, config.messages, describe_machine(),
                                 {c: ClassTally() for c in CLASSES}, epoch_ns=generator.epoch_ns)
        self.baseline: Counter[str] = Counter()
        self.delivered_total = 0
        self.deadline = time.monotonic() + config.budget_s

    def send_block(self, messages: list[FuzzMessage], bar: Any) -> None:
        """Publish one block, then wait for every PUBACK (BenchError if they stop coming)."""
        before = self.publisher.snapshot()
        for message in messages:
            tally = self.report.classes[message.cls]
            tally.sent += 1
            tally.variants[message.variant] += 1
            self._send(message, tally)
            bar.update(1)
        if not self.publisher.wait_acked(self.config.drain_timeout_s):
            raise BenchError(f"PUBACKs stopped: {self.publisher.sent - self.publisher.acked} outstanding")
        codes = self.publisher.snapshot() - before
        tally = self.report.classes[messages[0].cls]
        self._add_codes(tally, codes)

    def _send(self, message: FuzzMessage, tally: ClassTally) -> None:
        too_big = len(message.payload) > BROKER_MESSAGE_LIMIT
        if not too_big and not broker_refuses_topic(message.topic):
            if self.publisher.publish(message.topic, message.payload, self.config.drain_timeout_s):
                tally.matched += self._matches(message.topic)
            else:
                tally.client_refused += 1
            return
        try:
            code = publish_once(self.broker.host, self.broker.port, message.topic, message.payload)
        except ValueError:
            tally.client_refused += 1
            return
        if code is None or code >= 0x80:
            tally.broker_refused += 1
        else:  # the prediction was wrong: the broker took it
            self._add_codes(tally, Counter({code: 1}))
            tally.matched += self._matches(message.topic)

    def _matches(self, topic: str) -> bool:
        from paho.mqtt.client import topic_matches_sub

        return any(topic_matches_sub(f, topic) for f in self.filters)

    def _add_codes(self, tally: ClassTally, codes: Counter[int]) -> None:
        tally.acked += sum(codes.values())
        tally.delivered += codes.get(SUCCESS, 0)
        tally.no_subscribers += codes.get(NO_SUBSCRIBERS, 0)
        tally.broker_refused += sum(n for code, n in codes.items() if code >= 0x80)
        self.delivered_total += codes.get(SUCCESS, 0)

    def drain(self) -> Counter[str]:
        """Wait until the aggregator has counted everything delivered so far; its counters then."""
        deadline = min(self.deadline, time.monotonic() + self.config.drain_timeout_s)
        counts: Counter[str] = Counter()
        while time.monotonic() < deadline:
            got = aggregator_counts(self.aggregator)
            if got is not None:
                counts = got
                if sum((counts - self.baseline).values()) >= self.delivered_total:
                    return counts
            if not self.aggregator.alive:
                break
            time.sleep(0.01)
        return counts

    def settle_baseline(self, timeout_s: float = 10.0) -> None:
        """Counters before any fuzz message (the aggregator's own retained state is one of them)."""
        deadline = time.monotonic() + timeout_s
        previous = None
        while time.monotonic() < deadline:
            counts = aggregator_counts(self.aggregator)
            if counts is not None and counts == previous:
                self.baseline = counts
                self.report.baseline = dict(counts)
                return
            previous = counts
            time.sleep(0.3)
        self.baseline = previous or Counter()
        self.report.baseline = dict(self.baseline)

    def check_block(self, index: int, cls: str, counts: Counter[str]) -> str:
        """Why the run cannot go on after this block ("" if it can)."""
        if not self.aggregator.alive:
            self.report.crashes += 1
            return f"the aggregator exited with {self.aggregator.proc.returncode} in block {index} ({cls})"
        if sum((counts - self.baseline).values()) < self.delivered_total:
            return f"block {index} ({cls}) not fully counted in {self.config.drain_timeout_s:.0f} s"
        return ""

    def sample_rss(self, sent: int) -> float | None:
        """VmRSS now, kept as a sample and in the peak."""
        value = rss_mib(self.aggregator.pid)
        if value is not None:
            self.report.rss_samples.append((sent, round(value, 2)))
            self.report.rss_peak_mib = max(value, self.report.rss_peak_mib or 0.0)
        return value


def run_fuzz(config: FuzzConfig, workdir: Path, progress: Callable[[str], None] = lambda text: None) -> FuzzReport:
    """Fuzz a fresh aggregator subprocess with ``config.messages`` messages; see the module docstring."""
    if config.messages < len(CLASSES) * 2:
        raise BenchError(f"--messages must be at least {len(CLASSES) * 2}")
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        layout = load_site_layout(config.site)
    except WireError as exc:
        raise BenchError(str(exc)) from None
    progress("building seed messages from the site's nodes")
    generator = FuzzGenerator(layout, config.seed, clock_ns=time.time_ns)
    settings = BrokerSettings(persistence=False, message_size_limit=BROKER_MESSAGE_LIMIT)
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(LocalBroker(settings, workdir=workdir / "broker"))
        progress(f"mosquitto on 127.0.0.1:{broker.port}; starting spar-aggregator")
        aggregator = start_aggregator(workdir, config.site, config.model, broker.port)
        stack.callback(aggregator.kill)
        publisher = FuzzPublisher(broker.host, broker.port, config.max_inflight).start()
        stack.callback(publisher.stop)
        run = _Run(config, generator, broker, aggregator, publisher, workdir)
        run.settle_baseline()
        run.report.rss_idle_mib = run.sample_rss(0)
        _fuzz(run, progress)
        _finish(run)
    return run.report


def _fuzz(run: _Run, progress: Callable[[str], None]) -> None:
    from tqdm import tqdm

    plan = run.generator.plan(run.config.messages, run.config.block_size)
    warmup_blocks = _warmup_length(plan)
    total = sum(n for _, n in plan)
    progress(f"{total:,} messages in {len(plan)} single-class blocks")
    previous = Counter(run.baseline)
    started = time.monotonic()
    with tqdm(total=total, unit="msg", desc="fuzz", disable=not run.config.progress, file=sys.stderr) as bar:
        for index, (cls, count) in enumerate(plan):
            if time.monotonic() > run.deadline:
                run.report.aborted = f"time budget of {run.config.budget_s:.0f} s spent after {index} blocks"
                break
            sent_before = run.report.total("sent")
            messages = run.generator.block(cls, count)
            if cls == VALID:
                run.report.valid_windows.append({"block": index, "sent_before": sent_before,
                                                 "window_start_ns": run.generator.valid_starts[-1], "stored": False})
            elif run.report.first_hostile_block is None:
                run.report.first_hostile_block = index
            try:
                run.send_block(messages, bar)
            except (BenchError, OSError) as exc:  # PUBACKs stopped, or the broker is gone
                run.report.aborted = f"block {index} ({cls}): {exc}"
                break
            counts = run.drain()
            run.report.classes[cls].outcomes.update(counts - previous)
            previous = counts
            run.sample_rss(run.report.total("sent"))
            if index + 1 == warmup_blocks:
                run.report.rss_start_mib = rss_mib(run.aggregator.pid)
            run.report.aborted = run.check_block(index, cls, counts)
            if run.report.aborted:
                break
    run.report.duration_s = time.monotonic() - started


def _warmup_length(plan: list[tuple[str, int]]) -> int:
    """Blocks until every class has been sent once: memory is measured from there on."""
    seen: set[str] = set()
    for index, (cls, _) in enumerate(plan):
        seen.add(cls)
        if seen == set(CLASSES):
            return index + 1
    return len(plan)


def _finish(run: _Run) -> None:
    """Final counters and memory, SIGTERM, exit code, log scan."""
    report = run.report
    report.rss_end_mib = rss_mib(run.aggregator.pid)
    final = aggregator_counts(run.aggregator)
    if final is not None:
        report.overcounted = max(0, sum((final - run.baseline).values()) - run.delivered_total)
    report.publisher_disconnects = run.publisher.disconnects
    run.publisher.stop()
    report.exit_code = run.aggregator.stop()
    report.final_counts = run.aggregator.final_counts()
    report.log_problems = log_problems(run.aggregator.log_text())
    check_results(report, run.workdir / "results.sqlite3", run.generator.window_ns)
    if report.by_reason.get("rejected.internal_error") or report.hostile_accepted():
        report.reproducers = triage(run.generator.layout, run.config, run.workdir / "reproducers",
                                    epoch_ns=report.epoch_ns)


def check_results(report: FuzzReport, database: Path, window_ns: int) -> None:
    """Fill the report's result fields from the aggregator's database (read after its shutdown, so
    every window it closed is in): which valid windows have a result (a stored start within half a
    window of the one sent), and which results hold a non-finite number."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
            rows = conn.execute("SELECT window_start_ns, payload FROM results").fetchall()
    except sqlite3.Error as exc:
        report.results_error = f"{database}: {exc}"
        return
    starts = sorted(int(start) for start, _ in rows)
    report.results_stored = len(rows)
    for window in report.valid_windows:
        window["stored"] = _near(starts, window["window_start_ns"], window_ns // 2)
    sent = sorted(w["window_start_ns"] for w in report.valid_windows)
    report.results_unmatched = sum(not _near(sent, start, window_ns // 2) for start in starts)
    for _, payload in rows:
        try:
            finite = _all_finite(json.loads(payload))  # Python's json reads NaN and Infinity
        except (ValueError, TypeError, RecursionError):
            finite = False  # not even JSON: as bad as NaN for whoever reads it
        report.results_non_finite += not finite


def _near(ordered: list[int], value: int, tolerance: int) -> bool:
    i = bisect.bisect_left(ordered, value - tolerance)
    return i < len(ordered) and ordered[i] <= value + tolerance


def _all_finite(value: Any) -> bool:
    """Whether every number in a JSON value is finite (strings "NaN"/"Infinity" count as not)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return value not in ("NaN", "Infinity", "-Infinity", "nan", "inf", "-inf")
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


def log_problems(text: str, limit: int = 50) -> list[str]:
    """ERROR/CRITICAL lines, ``internal_error`` mentions, and the exception line closing each traceback."""
    out: list[str] = []
    in_traceback = False
    for line in text.splitlines():
        if line.startswith("Traceback"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            in_traceback = False
            out.append(f"raised: {line}")
        elif " ERROR " in line or " CRITICAL " in line or "internal_error" in line:
            out.append(line)
    return [line[:300] for line in out[:limit]]


# =========================================================================== triage
def local_verdict(message: FuzzMessage) -> str | None:
    """What the wire parsers make of a message in this process, when it is a problem.

    "escapes: <exception>" for anything but WireError (the aggregator counts that as internal_error);
    "accepted, image not finite" for a token frame that decodes to +-inf/NaN values. None otherwise.
    """
    import numpy as np

    from spar_wire.lifecycle import parse_birth, parse_state

    kind = message.topic.rsplit("/", 2)
    try:
        if kind[-1] == "birth":
            parse_birth(message.payload)
        elif kind[-1] == "state":
            parse_state(message.payload)
        elif kind[-2] == "data" and not np.all(np.isfinite(decode_message(message.payload).image())):
            return "accepted, image not finite"
    except WireError:
        return None
    except Exception as exc:  # noqa: BLE001 - what escapes is exactly what we are looking for
        return f"escapes: {type(exc).__name__}: {str(exc)[:120]}"
    return None


def triage(layout: SiteLayout, config: FuzzConfig, folder: Path, epoch_ns: int = BASE_EPOCH_NS
           ) -> list[dict[str, Any]]:
    """Replay the run's messages through the wire parsers in this process: one reproducer per class,
    variant and problem, its payload saved under ``folder``. The generator is deterministic from the
    run's seed and first window start (``epoch_ns``), so these are messages the aggregator received,
    except for window starts: the run's followed the wall clock, the replay's advance one window per
    valid block."""
    import warnings

    found: dict[tuple[str, str, str], FuzzMessage] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's overflow warnings are the point here
        generator = FuzzGenerator(layout, config.seed, epoch_ns=epoch_ns)
        for _, message in generator.messages(config.messages, config.block_size):
            verdict = None if message.cls == VALID else local_verdict(message)
            if verdict:
                found.setdefault((message.cls, message.variant, verdict), message)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for (cls, variant, verdict), message in found.items():
        path = folder / f"{cls}-{variant}.bin"
        path.write_bytes(message.payload)
        out.append({"class": cls, "variant": variant, "problem": verdict, "topic": message.topic,
                    "payload_bytes": len(message.payload), "payload_head": message.payload[:48].hex(),
                    "file": str(path)})
    return out
