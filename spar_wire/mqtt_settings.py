"""MQTT connection settings shared by nodes and the aggregator, and the paho client factory.

The settings are plain data (no paho import), so ``import spar_wire`` stays light. ``make_client``
imports paho-mqtt when called: nodes and aggregators both need it, and one factory keeps their
protocol, TLS and session handling identical.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spar_wire.errors import WireError

PROTOCOLS = ("5", "3.1.1")


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"  # "5" (default) or "3.1.1" for brokers that speak nothing newer
    keepalive_s: int = 30
    session_expiry_s: int = 24 * 3600  # MQTT 5: how long the broker keeps our session offline
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None  # CA file; setting it turns TLS on
    tls_cert: str | None = None  # client certificate (mutual TLS)
    tls_key: str | None = None
    reconnect_min_s: float = 0.5  # paho's automatic reconnect backs off from min to max
    reconnect_max_s: float = 30.0
    max_inflight: int = 20  # QoS 1 messages awaiting PUBACK

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise WireError("bad_settings", f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not (isinstance(self.port, int) and 0 < self.port < 65536):
            raise WireError("bad_settings", f"port must be in 1..65535, got {self.port!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise WireError("bad_settings", "tls_cert and tls_key must be given together")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise WireError("bad_settings", "need 0 < reconnect_min_s <= reconnect_max_s")


def make_client(settings: MqttSettings, client_id: str, *, persistent: bool,
                will: tuple[str, bytes] | None = None) -> Any:
    """A configured (not yet connected) paho-mqtt 2 client using the VERSION2 callback API.

    Args:
        persistent: ask the broker to keep the session (subscriptions, queued QoS 1 messages)
            while we are away; pass the same value to :func:`connect_async`.
        will: (topic, payload) published retained at QoS 1 by the broker if we vanish.
    """
    import paho.mqtt.client as mqtt

    protocol = mqtt.MQTTv5 if settings.protocol == "5" else mqtt.MQTTv311
    # MQTT 3.1.1 has no clean_start: clean_session=False asks for a persistent session.
    kwargs = {} if protocol == mqtt.MQTTv5 else {"clean_session": not persistent}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=protocol, **kwargs)
    client.reconnect_delay_set(min_delay=max(1, int(settings.reconnect_min_s)),
                               max_delay=max(1, int(settings.reconnect_max_s)))
    client.max_inflight_messages_set(settings.max_inflight)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls_ca is not None:
        client.tls_set(ca_certs=settings.tls_ca, certfile=settings.tls_cert, keyfile=settings.tls_key)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    return client


def connect_async(client: Any, settings: MqttSettings, *, persistent: bool) -> None:
    """Start connecting in the background (the caller runs ``loop_start``).

    ``persistent=True`` resumes the broker-side session (MQTT 5: clean_start=False plus a
    session expiry; paho's default would start a fresh session after a restart).
    """
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    if settings.protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = settings.session_expiry_s if persistent else 0
        client.connect_async(settings.host, settings.port, keepalive=settings.keepalive_s,
                             clean_start=not persistent, properties=props)
    else:
        # MQTT 3.1.1: persistence was fixed by clean_session in make_client.
        client.connect_async(settings.host, settings.port, keepalive=settings.keepalive_s)


class RefusedPublishes:
    """Remembers PUBACKs that carried a failure reason code; install as the client's ``on_publish``.

    A broker that refuses a publish (MQTT 5: 0x87 not authorized by the ACL, 0x97 quota) still
    answers with a PUBACK, and paho's ``is_published`` turns True for it like for any other: only the
    reason code tells. paho calls ``on_publish`` before it marks the message published, so once
    ``is_published`` is True the refusal, if any, is already here.
    """

    def __init__(self, limit: int = 65_536):
        self._reasons: dict[int, str] = {}
        self._limit = limit  # packet ids wrap at 65535; an uncollected refusal must not pile up forever
        self._lock = threading.Lock()
        self.count = 0

    def __call__(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            with self._lock:
                if len(self._reasons) < self._limit:
                    self._reasons[mid] = str(reason_code)
                self.count += 1

    def take(self, mid: int) -> str | None:
        """The refusal reason of message ``mid`` (forgotten once taken), or None if it was accepted."""
        with self._lock:
            return self._reasons.pop(mid, None)


def publish_outcome(info: Any, refused: RefusedPublishes | None = None) -> str:
    """"acked", "pending" or "failed" for a paho ``MQTTMessageInfo`` of a QoS >= 1 publish (paho
    drops a QoS 0 publish made while disconnected, which would then read "pending" for ever).

    With ``refused`` (the client's :class:`RefusedPublishes`), a PUBACK that refused the message
    counts as failed, not acked.

    paho's ``is_published`` raises instead of answering when the publish call itself failed. Two
    cases differ: a QoS > 0 message published while disconnected (rc NO_CONN) is kept by paho and
    sent after the reconnect, so it is pending until its PUBACK (paho never clears that rc, so the
    flag is read directly); a message refused outright (queue full, bad topic) has no PUBACK to
    wait for and has failed.
    """
    import paho.mqtt.client as mqtt

    if info.rc == mqtt.MQTT_ERR_NO_CONN and getattr(info, "_published", None) is not None:
        with info._condition:
            outcome = "acked" if info._published else "pending"
    else:
        try:
            outcome = "acked" if info.is_published() else "pending"
        except (RuntimeError, ValueError):
            return "failed"
    if outcome == "acked" and refused is not None and refused.take(info.mid) is not None:
        return "failed"
    return outcome


def user_files(folder: str | Path, user: str) -> dict[str, Path]:
    """Where one MQTT user's files are in a site security folder (``spar-aggregator secure init``):
    the site CA, the user's client certificate and key, and the file holding its password."""
    root = Path(folder)
    return {"ca": root / "ca.crt", "cert": root / "clients" / f"{user}.crt", "key": root / "clients" / f"{user}.key",
            "password": root / "credentials" / f"{user}.password"}


def with_credentials(settings: MqttSettings, folder: str | Path, user: str) -> MqttSettings:
    """``settings`` for ``user``: its user name, password and TLS files from a site security folder.

    A node's user name is its node id, so ``spar-node run`` gives every simulated node its own
    credentials from one folder. WireError naming the file when one is missing.
    """
    files = user_files(folder, user)
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise WireError("bad_settings", f"credentials of {user!r}: missing {', '.join(missing)}")
    return dataclasses.replace(settings, username=user, password=files["password"].read_text().strip(),
                               tls_ca=str(files["ca"]), tls_cert=str(files["cert"]), tls_key=str(files["key"]))
