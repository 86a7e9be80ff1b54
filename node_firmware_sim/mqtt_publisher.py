"""The node's MQTT side: connect, announce (birth + online), publish token messages at QoS 1.

Birth and ``online`` are (re)published inside ``on_connect``, so they come back after every
reconnect. Nothing is published before the broker's CONNACK: paho would accept it and report
success while nothing reached the broker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from node_firmware_sim.errors import NodeError
from spar_wire.lifecycle import BirthMessage, ModalityInfo, StateMessage
from spar_wire.mqtt_settings import MqttSettings, RefusedPublishes, connect_async, make_client, publish_outcome
from spar_wire.site_layout import SiteLayout
from spar_wire.topics import birth_topic, data_topic, state_topic

log = logging.getLogger(__name__)
FIRMWARE_VERSION = "0.1.0"


class NodePublisher:
    """One node's MQTT session. Use as a context manager, or call start()/stop()."""

    def __init__(self, layout: SiteLayout, node_id: str, settings: MqttSettings, *, bd_seq: int = 0):
        self.layout = layout
        self.node = layout.node(node_id)
        self.settings = settings
        self.bd_seq = bd_seq
        self._connected = threading.Event()
        self._refused: str | None = None
        self._warned_refusal = False
        offline = StateMessage("offline", bd_seq).to_json()
        self._client = make_client(settings, client_id=f"{layout.site_id}.{node_id}", persistent=True,
                                   will=(state_topic(layout.site_id, node_id), offline))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self.refused = RefusedPublishes()
        self._client.on_publish = self.refused

    def birth(self) -> BirthMessage:
        infos = {name: ModalityInfo(self.layout.modalities[name].features.hash,
                                    self.layout.modalities[name].sample_rate_hz,
                                    self.layout.modalities[name].channels)
                 for name in self.node.modalities}
        return BirthMessage(site=self.layout.site_id, node=self.node.id, bd_seq=self.bd_seq,
                            position=self.node.position, modalities=infos,
                            description=self.node.description, firmware=FIRMWARE_VERSION)

    def start(self, timeout_s: float = 10.0) -> NodePublisher:
        """Connect and wait for the broker's CONNACK; NodeError if refused or unreachable."""
        connect_async(self._client, self.settings, persistent=True)
        self._client.loop_start()
        if not self._connected.wait(timeout_s) or self._refused:
            self._client.loop_stop()
            why = self._refused or f"no CONNACK within {timeout_s:.0f} s"
            raise NodeError(f"node {self.node.id}: cannot connect to "
                            f"{self.settings.host}:{self.settings.port}: {why}")
        return self

    @property
    def connected(self) -> bool:
        """True between CONNACK and the next disconnect."""
        return self._connected.is_set() and not self._refused

    def publish_token(self, modality: str, frame: bytes) -> Any:
        """Publish one framed TokenMessage at QoS 1. Returns paho's MQTTMessageInfo."""
        return self._client.publish(data_topic(self.layout.site_id, self.node.id, modality),
                                    frame, qos=1)

    def outcome(self, info: Any) -> str:
        """"acked", "pending" or "failed" (a PUBACK refusing the message, e.g. the ACL's, is failed)."""
        outcome = publish_outcome(info, self.refused)
        if outcome == "failed" and self.refused.count and not self._warned_refusal:
            self._warned_refusal = True
            log.warning("node %s: the broker refuses its messages (check its user name and the ACL: a "
                        "node may publish only under its own id)", self.node.id)
        return outcome

    def stop(self) -> None:
        """Announce ``offline`` (a clean disconnect does not fire the will) and disconnect."""
        if self._connected.is_set():
            info = self._client.publish(state_topic(self.layout.site_id, self.node.id),
                                        StateMessage("offline", self.bd_seq).to_json(), qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):  # lost the connection meanwhile
                info.wait_for_publish(timeout=5.0)
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> NodePublisher:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ------------------------------------------------------------ paho callbacks (never raise)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if reason_code.is_failure:
                self._refused = str(reason_code)
                self._connected.set()
                return
            site, node = self.layout.site_id, self.node.id
            client.publish(birth_topic(site, node), self.birth().to_json(), qos=1, retain=True)
            client.publish(state_topic(site, node), StateMessage("online", self.bd_seq).to_json(),
                           qos=1, retain=True)
            self._connected.set()
        except Exception:  # noqa: BLE001 - an exception here would kill paho's network thread
            log.exception("node %s: on_connect failed", self.node.id)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            self._connected.clear()
            # Sparkplug-style bdSeq: the next connection carries a new number in both its will
            # and its birth, so a late will from this connection can be told apart and ignored.
            self.bd_seq += 1
            client.will_set(state_topic(self.layout.site_id, self.node.id),
                            StateMessage("offline", self.bd_seq).to_json(), qos=1, retain=True)
            log.info("node %s: disconnected (%s)", self.node.id, reason_code)
        except Exception:  # noqa: BLE001
            log.exception("node %s: on_disconnect failed", self.node.id)
