"""The embedded amqtt broker: lifecycle, the broker chooser, and the project's MQTT clients over it."""

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.config import AggregatorConfig
from edge_runtime.result_store import ResultStore
from edge_runtime.service import Aggregator
from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field
from spar_wire.mqtt_settings import MqttSettings, connect_async, make_client
from spar_wire.topics import aggregator_topic
from testbed.broker_choice import start_broker
from testbed.embedded_broker import EmbeddedBroker
from testbed.errors import TestbedError
from testbed.local_broker import LocalBroker, find_mosquitto, free_loopback_port

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def accepts_connections(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Client:
    """A project MQTT client (spar_wire.make_client) that records what it receives."""

    def __init__(self, broker, client_id, *, persistent=False, subscribe=()):
        self.settings = MqttSettings(host=broker.host, port=broker.port, protocol=broker.protocol)
        self.persistent = persistent
        self.received = []
        self.session_present = []
        self.subscribed = threading.Event()
        self.client = make_client(self.settings, client_id, persistent=persistent)
        self.client.on_message = lambda c, u, m: self.received.append((m.topic, bytes(m.payload), m.qos))

        def on_connect(client, userdata, flags, reason_code, properties):
            self.session_present.append(flags.session_present)
            if subscribe:
                client.subscribe([(topic, 1) for topic in subscribe])
            else:
                self.subscribed.set()

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *args: self.subscribed.set()

    def connect(self):
        self.subscribed.clear()
        connect_async(self.client, self.settings, persistent=self.persistent)
        self.client.loop_start()
        assert self.subscribed.wait(5), "no CONNACK/SUBACK within 5 s"
        return self

    def disconnect(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_start_stop_and_restart_on_a_chosen_port(tmp_path):
    port = free_loopback_port()
    broker = EmbeddedBroker(workdir=tmp_path / "broker", port=port, start_timeout_s=5)
    try:
        assert broker.start() is broker
        assert (broker.host, broker.port, broker.protocol, broker.running) == ("127.0.0.1", port, "3.1.1", True)
        assert accepts_connections(port)
        broker.stop()
        assert not broker.running and not accepts_connections(port)
        broker.restart()  # same port, right after the old listener closed
        assert broker.running and broker.port == port and accepts_connections(port)
        assert f"listening on 127.0.0.1:{port}" in broker.log_tail()
    finally:
        broker.close()
    assert not broker.running and not accepts_connections(port)
    assert (tmp_path / "broker").is_dir()  # a directory the caller chose is left in place


def test_a_port_held_by_someone_else_is_an_error_not_a_false_start(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        broker = EmbeddedBroker(workdir=tmp_path, port=holder.getsockname()[1], start_timeout_s=5)
        with pytest.raises(TestbedError, match="failed to start"):
            broker.start()
        assert not broker.running
        assert "could not start" in broker.log_tail() and "address already in use" in broker.log_tail()


def test_the_context_manager_removes_its_own_directory():
    with EmbeddedBroker() as broker:
        workdir = broker.workdir
        assert workdir.is_dir() and broker.running
    assert not workdir.exists() and not broker.running


def test_auto_picks_mosquitto_where_it_is_installed():
    assert find_mosquitto() is not None, "mosquitto is not installed: run `make test`"
    with start_broker("auto") as broker:
        assert type(broker) is LocalBroker and broker.running and broker.protocol == "5"
    with start_broker("mosquitto") as broker:
        assert type(broker) is LocalBroker and broker.running


def test_amqtt_kind_gives_the_embedded_broker(tmp_path):
    broker = start_broker("amqtt", workdir=tmp_path / "b")
    try:
        assert type(broker) is EmbeddedBroker and broker.running and broker.protocol == "3.1.1"
        assert broker.workdir == tmp_path / "b" and accepts_connections(broker.port)
    finally:
        broker.close()


def test_an_unknown_kind_is_a_clear_error():
    with pytest.raises(TestbedError, match=r"unknown broker kind 'rabbitmq': choose one of auto, mosquitto, amqtt"):
        start_broker("rabbitmq")


def test_qos1_retained_and_a_persistent_session_over_amqtt():
    """QoS 1 with PUBACK, 16 KB payloads, retained messages, and a clean_session=False subscriber that
    gets what was published while it was away (amqtt drops such sessions unless we fix it)."""
    big = bytes(range(256)) * 64  # 16 KB, about the size of a PNG token frame
    with EmbeddedBroker() as broker:
        subscriber = Client(broker, "site.aggregator", persistent=True, subscribe=["t/data/#"]).connect()
        subscriber.disconnect()
        time.sleep(1.5)  # amqtt's session monitor runs every second: the session must survive it
        publisher = Client(broker, "node", subscribe=()).connect()
        infos = [publisher.client.publish("t/data/n01", big, qos=1) for _ in range(5)]
        infos.append(publisher.client.publish("t/state/n01", b"online", qos=1, retain=True))
        for info in infos:
            info.wait_for_publish(5)
        assert all(info.is_published() for info in infos), "PUBACK missing"

        subscriber.connect()
        assert subscriber.session_present == [False, True]
        assert wait_for(lambda: len(subscriber.received) >= 5)
        assert subscriber.received[:5] == [("t/data/n01", big, 1)] * 5

        # Retained: sent to a new subscriber of its topic, and to nobody else (amqtt sent it to
        # every client that connected while any filter matched it).
        late = Client(broker, "late", subscribe=["t/state/+"]).connect()
        bystander = Client(broker, "bystander", subscribe=["other/#"]).connect()
        assert wait_for(lambda: late.received)
        time.sleep(0.3)
        assert late.received == [("t/state/n01", b"online", 1)]
        assert bystander.received == [] and publisher.received == []
        for client in (subscriber, publisher, late, bystander):
            client.disconnect()


def test_aggregator_and_nodes_end_to_end_over_amqtt(tmp_path, parking_lot):
    """The real aggregator and field runner, MQTT 3.1.1 through amqtt: every token acknowledged,
    every window stored in SQLite and published."""
    with EmbeddedBroker(workdir=tmp_path / "broker") as broker:
        mqtt = MqttSettings(host=broker.host, port=broker.port, protocol=broker.protocol)
        results = Client(broker, "results", subscribe=[aggregator_topic("parking_lot", "results")]).connect()
        config = AggregatorConfig(site=REPO / "configs/sites/parking_lot.toml",
                                  model=REPO / "models/tiny_parking_lot/manifest.json",
                                  database=tmp_path / "results.sqlite3", metrics_port=None, mqtt=mqtt)
        aggregator = Aggregator(config).start(timeout_s=10)
        try:
            summary = run_field(FieldConfig(parking_lot, SourceSpec("sine"), duration_s=6, mqtt=mqtt,
                                            realtime=False, ack_timeout_s=10))
            assert wait_for(lambda: aggregator.worker.snapshot_counts().get("results", 0) >= 3, 15), (
                f"results {aggregator.worker.snapshot_counts()}; broker log:\n{broker.log_tail()}")
        finally:
            aggregator.stop(timeout_s=10)
        assert wait_for(lambda: len(results.received) >= 3)
        results.disconnect()
        assert broker.running, broker.log_tail()

    total = summary.total()
    assert total.published == total.messages == 3 * 8 * 2
    assert total.acked == total.published
    counts = aggregator.processor.snapshot_counts()
    assert counts.get("accepted") == 48 and not [k for k in counts if k.startswith("rejected")], counts
    with ResultStore(tmp_path / "results.sqlite3", readonly=True) as store:  # stop() closed its own
        stored = store.query(newest_first=False)
    assert len(stored) == 3 and all(r["complete"] and r["nodes_present"] == 8 for r in stored)
    published = sorted(json.loads(payload)["window_index"] for _, payload, _ in results.received)
    assert published == [r["window_index"] for r in stored]
