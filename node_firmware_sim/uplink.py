"""A node's path to the broker: outage buffer -> lossy link -> timed MQTT publish.

While the link is down (a node outage) or the MQTT session is not connected, frames wait in a
bounded buffer, oldest dropped first when it is full (a node has little memory); once the uplink is
back, the buffer is re-sent, oldest first, before any new frame.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node_firmware_sim.delivery_scheduler import DeliveryScheduler
from node_firmware_sim.firmware import EncodedFrame
from node_firmware_sim.link_model import LinkModel
from spar_wire.mqtt_settings import publish_outcome


@dataclass
class UplinkCounters:
    buffered: int = 0  # frames that waited in the outage buffer
    buffer_dropped: int = 0  # frames pushed out of a full buffer (lost for good)
    published: int = 0  # copies handed to MQTT (duplicates included)
    acked: int = 0  # of those, acknowledged by the broker (counted by collect_acks)
    failed: int = 0  # of those, refused by the MQTT client itself (queue full, bad topic): no PUBACK
    pending: list[tuple[EncodedFrame, Any]] = field(default_factory=list)  # (frame, MQTTMessageInfo) not yet acked
    acked_frames: list[tuple[str, int]] | None = None  # (modality, window start) per PUBACK, when recording


class NodeUplink:
    def __init__(self, node_id: str, link: LinkModel, scheduler: DeliveryScheduler,
                 publish: Callable[[EncodedFrame], Any] | None, *, buffer_size: int,
                 connected: Callable[[], bool] = lambda: True, record_acks: bool = False,
                 outcome: Callable[[Any], str] = publish_outcome):
        """``record_acks``: keep (modality, window start) of every acknowledged frame, for fault
        trials that prove each acknowledged message reached the aggregator. ``outcome``: "acked",
        "pending" or "failed" for what ``publish`` returned (the publisher's, to see refusals)."""
        self.node_id = node_id
        self.link = link
        self.scheduler = scheduler
        self._publish_fn = publish
        self._connected = connected
        self._outcome = outcome
        self.buffer: collections.deque[EncodedFrame] = collections.deque()
        self.buffer_size = buffer_size
        self.counters = UplinkCounters(acked_frames=[] if record_acks else None)

    def is_up(self, t_s: float) -> bool:
        return self.link.is_up(self.node_id, t_s) and self._connected()

    def send(self, frame: EncodedFrame, t_s: float) -> None:
        """Send at trial time ``t_s``, or keep the frame for later when the uplink is down."""
        if not self.is_up(t_s):
            self._keep(frame)
            return
        self.flush(t_s)
        self._transmit(frame, t_s)

    def flush(self, t_s: float) -> int:
        """Re-send buffered frames if the uplink is up at ``t_s``. Returns how many."""
        if not self.buffer or not self.is_up(t_s):
            return 0
        sent = 0
        while self.buffer:
            self._transmit(self.buffer.popleft(), t_s)
            sent += 1
        return sent

    def _keep(self, frame: EncodedFrame) -> None:
        if self.buffer_size == 0:
            self.counters.buffer_dropped += 1
            return
        if len(self.buffer) >= self.buffer_size:
            self.buffer.popleft()
            self.counters.buffer_dropped += 1
        self.buffer.append(frame)
        self.counters.buffered += 1

    def _transmit(self, frame: EncodedFrame, t_s: float) -> None:
        event = self.link.transmit(self.node_id, frame.modality, frame.seq, len(frame.frame), t_s)
        for t_delivery in event.deliveries_s:
            self.scheduler.schedule(t_delivery, lambda frame=frame: self._publish(frame))

    def collect_acks(self, wait_s: float = 0.0) -> int:
        """Count acknowledged publishes and forget them (keeps memory flat on long trials).

        ``wait_s`` > 0 waits up to that long in total for the outstanding ones. Returns how many
        are still unacknowledged.
        """
        deadline = time.monotonic() + wait_s
        # The scheduler thread only appends; look at a prefix and replace just that prefix.
        snapshot = list(self.counters.pending)
        still = []
        for frame, info in snapshot:
            # Polled, not wait_for_publish: that raises at once for a message published while
            # disconnected, which paho still sends after the reconnect. Asked once per state: learning
            # that a PUBACK refused the message consumes the answer.
            outcome = self._outcome(info)
            while outcome == "pending" and time.monotonic() < deadline:
                time.sleep(0.01)
                outcome = self._outcome(info)
            if outcome == "acked":
                self.counters.acked += 1
                if self.counters.acked_frames is not None:
                    self.counters.acked_frames.append((frame.modality, frame.window_start_ns))
            elif outcome == "failed":
                self.counters.failed += 1
            else:
                still.append((frame, info))
        self.counters.pending[: len(snapshot)] = still
        return len(still)

    def _publish(self, frame: EncodedFrame) -> None:
        self.counters.published += 1
        if self._publish_fn is not None:
            self.counters.pending.append((frame, self._publish_fn(frame)))
