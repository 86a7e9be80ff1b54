"""Node firmware core: one window of samples -> one framed token message per modality.

Pure computation, no I/O: the same code runs on a live node, in a field trial and in the dataset
exporter, so training data and live traffic are byte-for-byte the same kind of thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node_firmware_sim.errors import NodeError
from spar_wire.codecs import CodecSpec
from spar_wire.features import compute_token_image
from spar_wire.message import WireLimits, encode_message, make_message
from spar_wire.site_layout import SiteLayout

SEQ_MODULO = 2**32  # the header's uint32 sequence number wraps here


@dataclass(frozen=True)
class FirmwareConfig:
    codec: CodecSpec = CodecSpec("webp", 85)
    clock_offset_s: float = 0.0  # node clock minus true time; it stamps every window start
    outage_buffer_messages: int = 512  # frames kept while the uplink is down (oldest dropped)

    def __post_init__(self) -> None:
        if self.outage_buffer_messages < 0:
            raise NodeError("outage_buffer_messages must be >= 0")


@dataclass(frozen=True)
class EncodedFrame:
    node: str
    modality: str
    seq: int
    window_start_ns: int  # as stamped by the node clock
    frame: bytes  # framed TokenMessage, the MQTT payload


class NodeFirmware:
    """Encodes windows for one node; owns the node's sequence counter."""

    def __init__(self, layout: SiteLayout, node_id: str, config: FirmwareConfig = FirmwareConfig()):
        self.layout = layout
        self.node = layout.node(node_id)
        self.config = config
        self.seq = 0

    def encode(self, modality: str, samples: np.ndarray, true_window_start_ns: int) -> EncodedFrame:
        """samples [C, S] of one window -> framed message stamped with the node's clock."""
        if modality not in self.node.modalities:
            raise NodeError(f"node {self.node.id} has no modality {modality!r}")
        cfg = self.layout.modalities[modality].features
        stamped = max(0, int(true_window_start_ns + round(self.config.clock_offset_s * 1e9)))
        message = make_message(compute_token_image(samples, cfg), cfg, self.config.codec,
                               site=self.layout.site_id, node=self.node.id, modality=modality,
                               window_start_ns=stamped, seq=self.seq)
        frame = encode_message(message)
        if len(frame) > WireLimits().max_message_bytes:
            # The aggregator would reject it, and a broker with message_size_limit answers with a
            # PUBACK code paho cannot parse: it disconnects and resends the message forever.
            raise NodeError(f"node {self.node.id}/{modality}: a {len(frame)}-byte message exceeds the wire limit "
                            f"of {WireLimits().max_message_bytes} bytes; use a compressing codec")
        encoded = EncodedFrame(self.node.id, modality, self.seq, stamped, frame)
        self.seq = (self.seq + 1) % SEQ_MODULO
        return encoded
