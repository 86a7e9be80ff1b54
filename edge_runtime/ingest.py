"""MQTT ingest: from the broker to closed windows.

    paho network thread --on_message--> [bounded message queue] --> ingest thread: decode,
        validate, registry, WindowAssembler --> [bounded window queue] --> inference worker

paho's thread only queues what arrives (the service owns the queue). Processing in paho's thread
itself cost 25 % less CPU per message, but when decoding falls behind (a site sending faster than
this box decodes, while inference takes the other core) it holds back the socket, and the overload
then waits at the broker, where only the broker's queue limit bounds its latency: measured at 64
nodes and 20 windows/s, 1.4 s median before a message reached the aggregator, and growing. With the
bounded queue the oldest messages are shed here instead, counted and acknowledged. A deadline
thread closes windows whose deadline passed; both take the processor's lock. Anything wrong with a
message is counted under its reason and dropped, never raised. Subscriptions are made inside
``on_connect`` so they come back after every reconnect; the MQTT 5 session is persistent.

Acknowledgement after storage: paho's automatic PUBACK is off. ``MessageProcessor.handle`` says
whether a window now holds the message; ``acknowledgements`` decides when it is acknowledged (a
held message once its window's result is committed to SQLite, everything else once handled), and
``MqttIngest.ack`` sends the PUBACKs. If the aggregator dies in between, the broker still holds
the message in our persistent session and redelivers it to the next process. A receipt names the
connection it arrived on: after a reconnect the broker redelivers with new packet ids, so a stale
receipt is never acknowledged (it could name another message on the new connection).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_runtime.clock_guard import ClockGuard
from edge_runtime.node_registry import NodeRegistry
from edge_runtime.receipts import Receipt
from edge_runtime.window_assembler import AssembledWindow, WindowAssembler
from spar_wire.errors import WireError
from spar_wire.feature_config import FeatureConfig
from spar_wire.features import patchify
from spar_wire.lifecycle import parse_birth, parse_state
from spar_wire.message import WireLimits, decode_message
from spar_wire.topics import parse_topic, site_filter

if TYPE_CHECKING:
    from paho.mqtt.client import Client

log = logging.getLogger(__name__)
_TRACEBACKS_LOGGED = 3


@dataclass(frozen=True)
class RawMessage:
    topic: str
    payload: bytes
    arrival_s: float  # monotonic
    arrival_ns: int  # wall clock, for end-to-end latency against node timestamps
    receipt: Receipt | None = None  # None: nothing to acknowledge (QoS 0, or not from a broker)


class MessageProcessor:
    """Turns raw MQTT messages into registry updates and closed windows (one thread). The
    ``pipeline_protocols.ReceiptHolder`` of the closed windows' receipts."""

    def __init__(self, site_id: str, registry: NodeRegistry, assembler: WindowAssembler,
                 features: dict[str, FeatureConfig], emit: Callable[[AssembledWindow], None], *,
                 limits: WireLimits = WireLimits(), warn: Callable[[str, str], None] | None = None,
                 clock: ClockGuard | None = None, quiet_s: float = 60.0):
        """``emit`` takes each closed window (its receipts with it); ``clock`` refuses window starts no
        sane clock stamped before they reach the assembler; a gap of ``quiet_s`` between accepted
        messages ends a stretch of traffic (for /healthz's stall check)."""
        self.site_id = site_id
        self.registry = registry
        self.assembler = assembler
        self.features = features
        self.emit = emit
        self.limits = limits
        self.clock = clock or ClockGuard()
        self.warn = warn or (lambda reason, message: log.warning("%s: %s", reason, message))
        self.counts: collections.Counter[str] = collections.Counter()
        self.last_accepted_s: float | None = None  # monotonic arrival of the last token message accepted
        self.accepting_since_s: float | None = None  # monotonic start of the current stretch of traffic
        self.quiet_s = quiet_s
        self.received_messages = 0  # every message handed to us, good or bad (live traffic views)
        self.received_bytes = 0  # their payload bytes
        self.lock = threading.Lock()  # guards counts and traffic for readers in other threads
        # One message or deadline sweep at a time. Re-entrant: a window the queue sheds while this
        # thread emits it gives up its receipts (take_receipts) under the same lock.
        self._processing = threading.RLock()

    def handle(self, raw: RawMessage) -> bool:
        """Process one message (any thread); never raises. True when a window now holds its receipt
        (that window's acknowledgement covers it); else nothing will acknowledge it unless the caller
        does (``Acknowledgements.message_handled``)."""
        with self.lock:
            self.received_messages += 1
            self.received_bytes += len(raw.payload)
        held = False
        with self._processing:
            try:
                held = self._handle(raw)
            except WireError as exc:
                self._reject(exc.reason, exc.detail)
            except Exception as exc:  # noqa: BLE001 - a bug must not stop ingest: count and log it
                # The first tracebacks tell a developer where; after that the rate-limited warning
                # keeps hostile input that hits the same bug from flooding the log.
                if self.counts["rejected.internal_error"] < _TRACEBACKS_LOGGED:
                    log.exception("internal error handling %r", raw.topic[:200])
                self._reject("internal_error", repr(exc)[:500])
        return held

    def shed(self, raw: RawMessage) -> None:
        """Count a message the overload policy dropped before it got here (outcome ``shed``): every
        message the aggregator receives is counted under one outcome."""
        with self.lock:
            self.received_messages += 1
            self.received_bytes += len(raw.payload)
            self.counts["shed"] += 1

    def take_receipts(self, window: AssembledWindow) -> list[Receipt]:
        """The receipts a closed window holds, taken once (any thread): see WindowAssembler."""
        with self._processing:
            return self.assembler.take_receipts(window)

    def tick(self, now_s: float) -> None:
        """Close windows whose deadline has passed, or that nothing more will come for."""
        with self._processing:
            for window in self.assembler.expire(self.registry.snapshot(), now_s):
                self.emit(window)

    def flush(self, now_s: float) -> None:
        """Close every open window (shutdown)."""
        with self._processing:
            for window in self.assembler.flush(self.registry.snapshot(), now_s):
                self.emit(window)

    def next_deadline_s(self) -> float | None:
        """Monotonic time of the next deadline or early close."""
        with self._processing:
            return self.assembler.next_deadline_s(self.registry.snapshot())

    def snapshot_counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)

    def clock_report(self, now_s: float, now_ns: int) -> tuple[dict[str, dict[str, float]], float | None]:
        """(nodes whose clocks are off, the site's clock minus this box's in seconds) for /healthz."""
        with self._processing:
            return self.clock.off_nodes(now_s), self.clock.box_offset_s(now_ns, now_s)

    def traffic(self) -> tuple[int, int]:
        """(messages, payload bytes) received so far, whatever became of them."""
        with self.lock:
            return self.received_messages, self.received_bytes

    def _handle(self, raw: RawMessage) -> bool:
        """True when an open window now holds the message (and will release its receipt)."""
        topic = parse_topic(raw.topic)
        if topic.site != self.site_id:
            raise WireError("wrong_site", f"topic of site {topic.site}")
        if topic.is_aggregator:
            self._count("ignored.aggregator")
            return False
        if topic.kind == "birth":
            birth = parse_birth(raw.payload)
            if birth.node != topic.node:
                raise WireError("topic_mismatch", f"birth of {birth.node} on the topic of {topic.node}")
            decision = self.registry.on_birth(birth)
            if not decision.accepted:
                self.warn(f"refused.{decision.reason}", f"node refused: {decision.detail}")
            self._count("birth" if decision.accepted else f"refused.{decision.reason}")
            return False
        if topic.kind == "state":
            decision = self.registry.on_state(topic.node, parse_state(raw.payload))
            self._count("state" if decision.accepted else f"ignored.{decision.reason}")
            return False
        return self._handle_data(topic.node, topic.modality or "", raw)

    def _handle_data(self, node: str, modality: str, raw: RawMessage) -> bool:
        # Cheap checks first: header only, then the registry, then the payload decode.
        message = decode_message(raw.payload, self.limits, decode_image=False)
        if (message.site, message.node, message.modality) != (self.site_id, node, modality):
            raise WireError("topic_mismatch", f"message of {message.node}/{message.modality} on the "
                            f"topic of {node}/{modality}")
        decision = self.registry.check_data(node, modality, message.feature_hash)
        if not decision.accepted:
            raise WireError(decision.reason, decision.detail)
        verdict = self.clock.check(node, message.window_start_ns, raw.arrival_ns, raw.arrival_s)
        if not verdict.accepted:
            # Warned per node (only registered nodes get here, so the keys are bounded): two nodes with
            # wrong clocks are both named in the log, not only the first within the rate limit.
            self._count(f"rejected.{verdict.reason}")
            self.warn(f"rejected.{verdict.reason}.{node}", verdict.detail)
            return False
        cfg = self.features[modality]
        if message.shape != cfg.image_shape:
            raise WireError("shape_mismatch", f"{node}/{modality}: image {message.shape} != {cfg.image_shape}")
        tokens = patchify(message.image(self.limits), cfg)
        self._count("accepted")
        if self.last_accepted_s is None or raw.arrival_s - self.last_accepted_s > self.quiet_s:
            self.accepting_since_s = raw.arrival_s  # traffic resumes after a quiet spell
        self.last_accepted_s = raw.arrival_s
        added = self.assembler.add(node, modality, message.window_start_ns, tokens, self.registry.snapshot(),
                                   raw.arrival_s, receipt=raw.receipt)
        for window in added.closed:
            self.emit(window)
        return added.held

    def _reject(self, reason: str, detail: str) -> None:
        self._count(f"rejected.{reason}")
        self.warn(f"rejected.{reason}", detail)

    def _count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1


class MqttIngest:
    """The aggregator's subscriber session: every message goes to ``deliver`` in paho's thread, and
    is acknowledged to the broker only when ``ack`` is called with its receipt (any thread).

    Two broker answers that would otherwise leave a "healthy" aggregator that silently misses data
    are recorded for /healthz: a SUBACK that refuses a subscription (an ACL that does not let this
    user read the node topics: nothing would ever arrive), and a CONNACK without our session when
    we had one (the broker restarted without persistence or expired the session: the messages it
    kept for us are gone).
    """

    def __init__(self, client: Client, site_id: str, deliver: Callable[[RawMessage], None], *,
                 expect_session: bool = False, on_link: Callable[[bool], None] = lambda up: None):
        """``expect_session``: this site's aggregator ran before (its store has results), so even the
        first connection should find the persistent session. ``on_link(up)``: called (in paho's
        thread, holding no lock of ours) when the connection comes up or goes down."""
        self.client = client
        self.site_id = site_id
        self.deliver = deliver
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.refused_subscriptions: list[str] = []  # "topic: reason" of the latest SUBACK's refusals
        self.sessions_lost = 0
        self.session_lost_s: float | None = None  # monotonic time of the latest loss
        self._expect_session = expect_session
        self._on_link = on_link
        self._topics: list[str] = []
        self.connects = 0
        self.connection = 0  # bumped on every connect and disconnect: receipts of older ones are stale
        self.acks: collections.Counter[str] = collections.Counter()  # sent | stale
        self._ack_lock = threading.Lock()  # a connection change cannot slip between check and ack
        self._paused = threading.Event()
        client.manual_ack_set(True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect

    # paho callbacks: never raise (an exception kills the network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if reason_code.is_failure:
                log.error("broker refused the connection: %s", reason_code)
                return
            with self._ack_lock:
                self.connection += 1
            if self._expect_session and not getattr(flags, "session_present", True):
                self.sessions_lost += 1
                self.session_lost_s = time.monotonic()
                log.error("the broker did not keep this aggregator's session: messages it queued for us while "
                          "we were away are lost (broker restarted without persistence, or session expired)")
            self._expect_session = True  # from now on we have a session to lose
            self.connects += 1
            # Node topics only: not "#", which would also bring back our own results and state.
            self._topics = [site_filter(self.site_id, kind) for kind in ("birth", "state", "data")]
            client.subscribe([(topic, 1) for topic in self._topics])
            self._on_link(True)
            self.connected.set()
            log.info("connected to the broker (connection %d)", self.connects)
        except Exception:  # noqa: BLE001
            log.exception("on_connect failed")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        try:
            refused = [f"{topic}: {code}" for topic, code in zip(self._topics, reason_codes, strict=False)
                       if getattr(code, "is_failure", False)]
            self.refused_subscriptions = refused
            if refused:
                log.error("the broker refused %d subscription(s), nothing will arrive on them (does the ACL "
                          "let this user read the node topics?): %s", len(refused), "; ".join(refused))
            self.subscribed.set()
        except Exception:  # noqa: BLE001
            log.exception("on_subscribe failed")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            with self._ack_lock:
                self.connection += 1
            self.connected.clear()
            self._on_link(False)
            # Our own disconnect at shutdown is normal; anything else is worth a warning.
            level = logging.WARNING if getattr(reason_code, "is_failure", True) else logging.INFO
            log.log(level, "disconnected from the broker: %s", reason_code)
        except Exception:  # noqa: BLE001
            log.exception("on_disconnect failed")

    def pause(self) -> None:
        """Stop taking messages but stay connected (to send the acknowledgements still due): what
        arrives from now on is left unacknowledged, and the broker redelivers it to the next session."""
        self._paused.set()

    def ack(self, receipts: Sequence[Receipt]) -> None:
        """Acknowledge these messages to the broker; receipts of an earlier connection are skipped.
        Only ``acknowledgements`` decides when (``pipeline_protocols.BrokerAcks``)."""
        with self._ack_lock:
            for receipt in receipts:
                if receipt.connection == self.connection:
                    self.client.ack(receipt.mid, 1)
                    self.acks["sent"] += 1
                else:
                    self.acks["stale"] += 1

    def _on_message(self, client, userdata, msg) -> None:
        try:
            if self._paused.is_set():
                return
            try:
                topic = msg.topic
            except UnicodeDecodeError:  # paho decodes the topic lazily; let the parser reject it
                topic = "<topic is not UTF-8>"
            with self._ack_lock:
                receipt = Receipt(self.connection, msg.mid) if msg.qos > 0 else None
            self.deliver(RawMessage(topic, msg.payload, time.monotonic(), time.time_ns(), receipt))
        except Exception:  # noqa: BLE001
            log.exception("on_message failed")
