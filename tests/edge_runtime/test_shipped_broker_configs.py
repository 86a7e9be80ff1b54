"""The shipped example configs work together: configs/aggregator.toml with configs/mosquitto/local.conf
(the local path: loopback 1883, no TLS), configs/aggregator-secure.toml with the mosquitto.conf that
`spar-aggregator secure init` generates (the secure path: TLS 8883, client certificates).

Issue 19: aggregator.toml spoke plain MQTT to port 1883 while the only shipped broker config listened
on 8883 with TLS, so the two shipped files never worked together.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from edge_runtime.config import load_config
from edge_runtime.site_broker_config import mosquitto_conf_text
from edge_runtime.site_folder import SecurityManifest
from edge_runtime.site_security import BrokerOptions, init_site
from spar_wire.mqtt_settings import MqttSettings, connect_async, make_client
from spar_wire.toml_file import read_toml
from testbed.local_broker import LocalBroker, find_mosquitto

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
LOCAL_CONF = CONFIGS / "mosquitto" / "local.conf"
SECURE_CONF = CONFIGS / "mosquitto" / "mosquitto.conf"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Broker settings the aggregator's defaults depend on (broker_max_inflight, backlog, frame size).
TUNING = ("max_inflight_messages", "set_tcp_nodelay", "max_queued_messages", "message_size_limit")


@dataclasses.dataclass
class Listener:
    port: int
    bind: str | None  # None: every interface
    options: dict[str, str]

    @property
    def tls(self) -> bool:
        return "certfile" in self.options


@dataclasses.dataclass
class BrokerConf:
    general: dict[str, str]  # settings before the first listener (all of them global here)
    listeners: list[Listener]

    def listener(self, port: int) -> Listener:
        found = [listener for listener in self.listeners if listener.port == port]
        assert len(found) == 1, f"{len(found)} listeners on port {port}"
        return found[0]


def parse_conf(text: str) -> BrokerConf:
    """Mosquitto's format: one ``key value`` per line; a ``listener`` line opens a block that the
    listener-specific options after it belong to (the global ones anywhere apply to all)."""
    general: dict[str, str] = {}
    listeners: list[Listener] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.strip().partition(" ")
        if key == "listener":
            port, _, bind = value.partition(" ")
            listeners.append(Listener(int(port), bind or None, {}))
        elif listeners and key not in ("allow_anonymous", "password_file", "acl_file", "persistence",
                                       "persistence_location", "autosave_interval", "autosave_on_changes",
                                       *TUNING, "log_dest", "log_type", "connection_messages", "log_timestamp",
                                       "user", "per_listener_settings"):
            listeners[-1].options[key] = value
        else:
            general[key] = value
    return BrokerConf(general, listeners)


def generated_secure_conf(install_dir: str = "/etc/spar-edge/parking_lot", port: int = 8883) -> str:
    manifest = SecurityManifest(site="parking_lot", port=port, hostnames=["localhost", "127.0.0.1"],
                                install_dir=install_dir, data_dir=f"{install_dir}/data", monitor=False,
                                broker_user="mosquitto")
    return mosquitto_conf_text(manifest)


# --------------------------------------------------------------------------- the files agree
def test_shipped_aggregator_toml_matches_the_local_listener():
    mqtt = read_toml(CONFIGS / "aggregator.toml")["mqtt"]
    conf = parse_conf(LOCAL_CONF.read_text())
    listener = conf.listener(mqtt["port"])
    assert mqtt["port"] == 1883 and listener.bind == "127.0.0.1" and mqtt["host"] in LOOPBACK
    # Plain MQTT on both sides, and no login asked for or offered.
    assert not listener.tls and not any(key.startswith("tls_") for key in mqtt)
    assert conf.general["allow_anonymous"] == "true" and "password_file" not in conf.general
    assert not {"username", "password_env", "credentials_dir"} & set(mqtt)
    # One listener only: nothing but the loopback address is ever open without TLS.
    assert [listener.bind for listener in conf.listeners] == ["127.0.0.1"]


def test_shipped_secure_toml_matches_the_generated_tls_listener():
    mqtt = read_toml(CONFIGS / "aggregator-secure.toml")["mqtt"]
    example = parse_conf(SECURE_CONF.read_text())
    assert parse_conf(generated_secure_conf()).listeners == example.listeners
    listener = example.listener(mqtt["port"])
    assert mqtt["port"] == 8883 and listener.bind is None and listener.tls
    assert listener.options["require_certificate"] == "true"
    assert listener.options["use_identity_as_username"] == "true"
    assert example.general["allow_anonymous"] == "false"
    # The aggregator brings the folder init wrote, where the broker's example config reads it from.
    install_dir = str(Path(listener.options["cafile"]).parent)
    assert mqtt["credentials_dir"] == install_dir
    # The server certificate init makes by default names localhost (what host must match).
    assert mqtt["host"] in BrokerOptions().hostnames


def test_both_aggregator_configs_run_the_same_aggregator():
    local, secure = read_toml(CONFIGS / "aggregator.toml"), read_toml(CONFIGS / "aggregator-secure.toml")
    assert local["aggregator"] == secure["aggregator"], \
        "configs/aggregator-secure.toml must keep the [aggregator] section of configs/aggregator.toml"
    assert local["aggregator"]["model"] == "../models/parking_lot/model.int8.dynamic.manifest.json"
    without_path = {"host", "port", "credentials_dir"}
    assert {k: v for k, v in local["mqtt"].items() if k not in without_path} == \
        {k: v for k, v in secure["mqtt"].items() if k not in without_path}


def test_local_broker_is_tuned_as_the_secure_one():
    local, secure = parse_conf(LOCAL_CONF.read_text()), parse_conf(generated_secure_conf())
    assert {k: local.general[k] for k in TUNING} == {k: secure.general[k] for k in TUNING}
    agg = read_toml(CONFIGS / "aggregator.toml")["aggregator"]
    assert int(local.general["max_inflight_messages"]) == agg["broker_max_inflight"]


# --------------------------------------------------------------------------- against Mosquitto
def connects(mqtt: MqttSettings, timeout_s: float = 5.0, *, echo: bool = True) -> tuple[bool, list[bytes]]:
    """Connect, subscribe to a topic, publish to it at QoS 1: (CONNACK success, what came back).
    ``echo=False``: return at the CONNACK (for a user the ACL does not let read that topic)."""
    got = threading.Event()
    state: dict[str, object] = {"messages": []}
    client = make_client(mqtt, "shipped-config-probe", persistent=False)

    def on_connect(c, u, f, rc, p):
        state["connack"] = rc
        if rc.is_failure or not echo:
            got.set()
        else:
            c.subscribe("spar/v1/parking_lot/aggregator/results", qos=1)

    def on_subscribe(c, u, mid, rcs, p):
        c.publish("spar/v1/parking_lot/aggregator/results", b"probe", qos=1)

    def on_message(c, u, m):
        state["messages"].append(m.payload)
        got.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    connect_async(client, mqtt, persistent=False)
    client.on_disconnect = lambda c, u, f, rc, p: got.set()  # refused in the TLS handshake
    client.loop_start()
    try:
        got.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    connack = state.get("connack")
    return connack is not None and not connack.is_failure, state["messages"]


@pytest.mark.mosquitto
def test_local_path_aggregator_toml_talks_to_local_conf(tmp_path):
    """Mosquitto runs the shipped local.conf (its listener moved to a free loopback port); the MQTT
    settings of the shipped aggregator.toml, port aside, connect, subscribe and receive."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` or `sudo apt-get install mosquitto`")
    mqtt = load_config(CONFIGS / "aggregator.toml").mqtt
    with LocalBroker(workdir=tmp_path / "broker", config_file=LOCAL_CONF) as broker:
        ok, messages = connects(dataclasses.replace(mqtt, port=broker.port))
    assert ok and messages == [b"probe"]


@pytest.mark.mosquitto
def test_secure_path_aggregator_toml_talks_to_the_generated_conf(tmp_path):
    """The shipped aggregator-secure.toml, with the folder and port of this test, against Mosquitto
    running what init generated: the aggregator gets in over TLS with its certificate (host localhost
    checked against the server certificate); without the certificate it does not."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` or `sudo apt-get install mosquitto`")
    site = init_site(CONFIGS / "sites" / "parking_lot.toml", tmp_path / "secure").folder.root
    shipped = (CONFIGS / "aggregator-secure.toml").read_text()
    assert 'credentials_dir = "/etc/spar-edge/parking_lot"' in shipped
    copy = tmp_path / "configs" / "aggregator-secure.toml"
    copy.parent.mkdir()
    copy.write_text(shipped.replace('"/etc/spar-edge/parking_lot"', f'"{site}"'))
    with LocalBroker(workdir=tmp_path / "broker", config_file=site / "mosquitto.conf") as broker:
        mqtt = dataclasses.replace(load_config(copy).mqtt, port=broker.port)
        assert mqtt.host == read_toml(CONFIGS / "aggregator-secure.toml")["mqtt"]["host"] == "localhost"
        assert mqtt.username == "aggregator" and mqtt.tls_cert == str(site / "clients" / "aggregator.crt")
        ok, _ = connects(mqtt, echo=False)
        assert ok
        # The results publisher has its own identity from the same folder (one connection per identity).
        results = dataclasses.replace(load_config(copy).results_mqtt, port=broker.port)
        assert results.username == "aggregator-results" and results.host == mqtt.host
        assert results.tls_cert == str(site / "clients" / "aggregator-results.crt")
        ok, _ = connects(results, echo=False)
        assert ok
        # Without the certificate the same settings do not get in.
        refused, _ = connects(dataclasses.replace(mqtt, tls_cert=None, tls_key=None), echo=False)
        assert not refused
