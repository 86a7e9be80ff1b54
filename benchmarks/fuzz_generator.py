"""The seeded hostile-message generator of ``spar-bench fuzz``.

It turns a site's valid traffic (births and token frames of its real nodes, made by the node
firmware) into hostile messages of the classes in :mod:`benchmarks.fuzz_classes`, and plans a run
as single-class blocks so the run can attribute the aggregator's counters to a class. A small,
known share of valid traffic runs alongside. Valid windows follow the clock it is given, as real
nodes stamp theirs; the wrong clocks come from a minority of the nodes (``clock_nodes``): a site
where most nodes disagree with one correct node is not "one node with a wrong clock".
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks.fuzz_classes import (
    BASE_EPOCH_NS,
    BROKER_MESSAGE_LIMIT,
    CLASSES,
    FOLLOWED_BY_VALID,
    HOSTILE_WEIGHTS,
    VALID,
    VALID_BD_SEQ,
    FuzzMessage,
)
from benchmarks.fuzz_frames import RawFrame, deflate_repeated, png, webp_canvas
from benchmarks.fuzz_variants import (
    ALL_TOPIC_VARIANTS,
    BIRTH_VARIANTS,
    RARE_TOPIC_WEIGHTS,
    STATE_VARIANTS,
    TOPIC_VARIANTS,
)
from node_firmware_sim.firmware import FirmwareConfig, NodeFirmware
from node_firmware_sim.mqtt_publisher import FIRMWARE_VERSION
from node_firmware_sim.sine_source import sine_window
from spar_wire.codecs import CODECS, CodecSpec
from spar_wire.lifecycle import MAX_LIFECYCLE_BYTES, BirthMessage, ModalityInfo, StateMessage
from spar_wire.message import HEADER_SIZE, MAGIC, TokenMessage, WireLimits, decode_message, encode_message
from spar_wire.site_layout import SiteLayout
from spar_wire.topics import birth_topic, data_topic, state_topic

CHURN_DESCRIPTION_CHARS = 500  # under the wire's 512-character cap: accepted, and each one new
YEAR_S = 365.25 * 86_400
VALID_SHARE = 0.02  # of all messages
OVERSIZE_MAX = 100  # oversize messages are up to 2 MiB each: a few are enough


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
        self.window_ns = int(round(layout.window_s() * 1e9))
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
        self.bomb_idat = deflate_repeated(0x07, 32 << 20)  # filter type 7 does not exist
        self.zero_idat = deflate_repeated(0x00, 8 << 20)
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
            "png_canvas_30000": {"payload": png(30000, 30000, self.zero_idat)},
            "png_idat_32mib": {"payload": png(w, h, self.bomb_idat)},
            "webp_canvas_16384": {"payload": webp_canvas(16384, 16384), "codec_id": CODECS["webp"].wire_id},
            "claims_65535": {"payload": png(w, h, self.bomb_idat), "height": 65535, "width": 65535},
            "png_at_limit": {"payload": png(1024, 1024, self.zero_idat), "height": 1024, "width": 1024},
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
        variant = self._variant({**{name: 1.0 for name in TOPIC_VARIANTS}, **RARE_TOPIC_WEIGHTS})
        msg = self._pick("webp:85")
        birth = variant.endswith("_birth")
        payload = self.births[msg.node] if birth else encode_message(msg)
        topic = ALL_TOPIC_VARIANTS[variant](self.site, msg.node, msg.modality)
        return FuzzMessage("unicode_topic", variant, topic, payload)

    # ---------------------------------------------------------------- lifecycle JSON
    def _make_malformed_lifecycle(self) -> FuzzMessage:
        node = self.rng.choice(self.nodes)
        if self.rng.random() < 0.3:
            variant = self._variant({name: 1 for name in STATE_VARIANTS})
            topic_node = "n99" if variant == "state_unknown_node" else node
            return FuzzMessage("malformed_lifecycle", variant, state_topic(self.site, topic_node),
                               STATE_VARIANTS[variant]())
        variant = self._variant({name: 1 for name in BIRTH_VARIANTS})
        body = json.loads(self.births[node])
        return FuzzMessage("malformed_lifecycle", variant, birth_topic(self.site, node),
                           BIRTH_VARIANTS[variant](body))
