"""Walking-skeleton aggregator: subscribe to a site, decode every message, count, report.

The real aggregator (window assembly, inference, storage) replaces this; what stays is the
ingest discipline: subscribe inside ``on_connect`` so subscriptions survive reconnects, and never
let a callback raise: bad input is counted under its ``WireError`` reason and dropped.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

from spar_wire.errors import WireError
from spar_wire.lifecycle import BirthMessage, parse_birth, parse_state
from spar_wire.message import TokenMessage, WireLimits, decode_message
from spar_wire.mqtt_settings import MqttSettings, connect_async, make_client
from spar_wire.topics import parse_topic, site_filter

log = logging.getLogger(__name__)


class IngestStub:
    """Decodes everything published under ``spar/v1/{site}/#``; thread-safe counters."""

    def __init__(self, site_id: str, settings: MqttSettings, *, limits: WireLimits = WireLimits(),
                 on_token: Callable[[TokenMessage], None] | None = None, keep_last: int = 10_000):
        self.site_id = site_id
        self.settings = settings
        self.limits = limits
        self.on_token = on_token
        self.counts: collections.Counter[str] = collections.Counter()
        self.tokens: collections.deque[TokenMessage] = collections.deque(maxlen=keep_last)
        self.births: dict[str, BirthMessage] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = make_client(settings, client_id=f"{site_id}.aggregator-skeleton", persistent=False)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def start(self, timeout_s: float = 10.0) -> IngestStub:
        """Connect and wait until the site subscription is acknowledged."""
        connect_async(self._client, self.settings, persistent=False)
        self._client.loop_start()
        if not self._subscribed.wait(timeout_s):
            self._client.loop_stop()
            raise ConnectionError(f"aggregator stub: not subscribed to {self.settings.host}:"
                                  f"{self.settings.port} within {timeout_s:.0f} s")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> IngestStub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    # ------------------------------------------------------------ paho callbacks (never raise)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if not reason_code.is_failure:
                client.subscribe(site_filter(self.site_id), qos=1)
        except Exception:  # noqa: BLE001 - an exception here would kill paho's network thread
            log.exception("on_connect failed")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._subscribed.set()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            self._handle(msg.topic, msg.payload)
        except WireError as exc:
            self._count(f"rejected.{exc.reason}")
        except Exception:  # noqa: BLE001 - a bug must not stop ingest; count it and log it
            log.exception("unexpected error handling %r", msg.topic)
            self._count("rejected.internal_error")

    def _handle(self, topic_text: str, payload: bytes) -> None:
        topic = parse_topic(topic_text)
        if topic.kind == "birth":
            self.births[topic.node] = parse_birth(payload)
            self._count("birth")
        elif topic.kind == "state":
            parse_state(payload)
            self._count("state")
        elif topic.kind == "data":
            message = decode_message(payload, self.limits)
            if (message.site, message.node, message.modality) != (topic.site, topic.node, topic.modality):
                raise WireError("topic_mismatch", f"message from {message.node}/{message.modality} "
                                f"on topic of {topic.node}/{topic.modality}")
            with self._lock:
                self.tokens.append(message)
            self._count("accepted")
            if self.on_token is not None:
                self.on_token(message)
        else:
            self._count("ignored")

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1
