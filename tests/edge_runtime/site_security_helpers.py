"""Helpers of the site security tests (test_site_pki, _passwords, _broker_config, _security): MQTT
sessions and TLS probes against the site's generated broker, and the parking-lot site's constants.

A plain module rather than conftest.py, whose names tests cannot import; the fixtures built on these
(``site``, ``broker``, ``plain_broker``, ``sessions``) are in conftest.py.
"""

from __future__ import annotations

import itertools
import ssl
import threading
import time
from pathlib import Path

from edge_runtime.site_security import credentials
from spar_wire.mqtt_settings import MqttSettings, connect_async, make_client
from testbed.local_broker import LocalBroker

REPO = Path(__file__).resolve().parents[2]
SITE_TOML = REPO / "configs" / "sites" / "parking_lot.toml"
BASE = "spar/v1/parking_lot"
NOT_AUTHORIZED = 0x87
_ids = itertools.count()

# What the generated config's TLS listener needs and a password listener does not have.
TLS_OPTIONS = ("cafile", "certfile", "keyfile", "require_certificate", "use_identity_as_username",
               "use_username_as_clientid", "crlfile", "tls_version")


def plain(site: Path, broker: LocalBroker, user: str, **overrides) -> MqttSettings:
    """``user``'s username and password, no TLS."""
    return settings(site, broker, user, tls_ca=None, tls_cert=None, tls_key=None, **overrides)


def settings(site: Path, broker: LocalBroker, user: str, **overrides) -> MqttSettings:
    return credentials(site, user).mqtt_settings(broker.host, broker.port, **overrides)


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(predicate())


class Session:
    """An MQTT 5 client that records CONNACK, PUBACK reason codes, messages and disconnects."""

    def __init__(self, mqtt: MqttSettings, *, will: tuple[str, bytes] | None = None):
        self.client = make_client(mqtt, f"test-{next(_ids)}", persistent=False, will=will)
        self.client.reconnect_delay_set(30, 30)  # a refused session must not retry during the test
        self.connack = None
        self.pubacks: dict[int, object] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self.disconnects = 0
        self.client.on_connect = lambda c, u, f, rc, p: setattr(self, "connack", rc)
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, rc)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_disconnect = lambda c, u, f, rc, p: setattr(self, "disconnects", self.disconnects + 1)
        connect_async(self.client, mqtt, persistent=False)
        self.client.loop_start()
        wait_for(lambda: self.connack is not None or self.disconnects > 0)

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, *filters: str) -> None:
        self.subscribed.clear()
        self.client.subscribe([(f, 1) for f in filters])
        assert self.subscribed.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes):
        """Publish at QoS 1 and return the PUBACK reason code (bounded wait)."""
        info = self.client.publish(topic, payload, qos=1)
        assert wait_for(lambda: info.mid in self.pubacks), f"no PUBACK for {topic}"
        return self.pubacks[info.mid]

    def received(self, topic: str) -> list[bytes]:
        return [payload for t, payload in list(self.messages) if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def tls_outcome(mqtt: MqttSettings, timeout_s: float = 5.0) -> str:
    """'accepted', 'refused', 'tls-error' (handshake failed on our side) or 'closed' (broker hung up)."""
    client = make_client(mqtt, f"probe-{next(_ids)}", persistent=False)
    got: dict[str, object] = {}
    client.on_connect = lambda c, u, f, rc, p: got.setdefault("connack", rc)
    client.on_disconnect = lambda c, u, f, rc, p: got.setdefault("closed", rc)
    try:
        client.connect(mqtt.host, mqtt.port, keepalive=10)
    except ssl.SSLError:
        return "tls-error"
    except OSError:
        return "closed"
    deadline = time.monotonic() + timeout_s
    while not got and time.monotonic() < deadline:
        if client.loop(timeout=0.1) != 0:
            got.setdefault("closed", None)
    client.disconnect()
    if "connack" in got:
        return "refused" if got["connack"].is_failure else "accepted"
    return "closed" if got else "no answer"


def aggregator_listening(site, broker, sessions) -> Session:
    agg = sessions(settings(site, broker, "aggregator"))
    assert agg.accepted
    agg.subscribe(f"{BASE}/+/birth", f"{BASE}/+/state", f"{BASE}/+/data/+")
    return agg
