"""The generated ACL and mosquitto.conf (edge_runtime.site_broker_config) against a real Mosquitto.

Observed with Mosquitto 2.0.11 and MQTT 5: a refused login gets CONNACK 0x87 (not authorised); a QoS 1
publish outside the node's own topic gets PUBACK 0x87 and is dropped; a SUBSCRIBE without read access
is granted (SUBACK 0x01) but nothing is ever delivered on it; a will on another node's topic is dropped.
On the generated TLS listener the certificate's CN is the username and the client id
(use_identity_as_username, use_username_as_clientid) and no password is checked; passwords gate a
listener without client certificates (``plain_broker``, test_site_passwords.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

import pytest

from edge_runtime.site_broker_config import acl_text, mosquitto_conf_text
from edge_runtime.site_folder import SecurityManifest
from edge_runtime.site_security import credentials
from spar_wire.mqtt_settings import connect_async, make_client
from tests.edge_runtime.site_security_helpers import (
    BASE,
    NOT_AUTHORIZED,
    REPO,
    aggregator_listening,
    settings,
    wait_for,
)


def test_example_configs_match_what_init_generates():
    manifest = SecurityManifest(site="parking_lot", port=8883, hostnames=["localhost"],
                                    install_dir="/etc/spar-edge/parking_lot",
                                    data_dir="/var/lib/spar-edge/parking_lot", monitor=True, broker_user="mosquitto")

    def settings_of(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]

    example = (REPO / "configs" / "mosquitto")
    assert settings_of(example.joinpath("mosquitto.conf").read_text()) == \
        settings_of(mosquitto_conf_text(manifest))
    assert settings_of(example.joinpath("acl").read_text()) == settings_of(acl_text("parking_lot", monitor=True))


# --------------------------------------------------------------------------- against Mosquitto
@pytest.mark.mosquitto
def test_a_node_certificate_with_the_aggregator_password_gets_no_aggregator_rights(site, broker, sessions):
    """Issue 19: n01's certificate + username "aggregator" + the aggregator's password. Without
    use_identity_as_username Mosquitto logged that in as the aggregator: it read every node's data and
    published results. Now the certificate's CN (n01) is the username, whatever the client sends."""
    agg = aggregator_listening(site, broker, sessions)
    monitor = sessions(settings(site, broker, "monitor"))
    monitor.subscribe(f"{BASE}/aggregator/#")
    aggregator = credentials(site, "aggregator")
    impostor = sessions(settings(site, broker, "n01", username="aggregator", password=aggregator.password))
    assert impostor.accepted
    impostor.subscribe(f"{BASE}/+/birth", f"{BASE}/+/state", f"{BASE}/+/data/+", f"{BASE}/#")
    assert impostor.publish(f"{BASE}/aggregator/results", b"forged result").value == NOT_AUTHORIZED
    assert impostor.publish(f"{BASE}/n02/data/microphone", b"as n02").value == NOT_AUTHORIZED
    assert impostor.publish(f"{BASE}/n01/state", b"as itself").value == 0  # it is n01, nothing more
    node = sessions(settings(site, broker, "n02"))
    assert node.publish(f"{BASE}/n02/data/microphone", b"n02 data").value == 0
    results = sessions(settings(site, broker, "aggregator-results"))
    assert results.publish(f"{BASE}/aggregator/results", b"real result").value == 0
    assert wait_for(lambda: agg.received(f"{BASE}/n02/data/microphone") == [b"n02 data"])
    assert wait_for(lambda: monitor.received(f"{BASE}/aggregator/results") == [b"real result"])
    assert agg.received(f"{BASE}/n01/state") == [b"as itself"]
    assert impostor.messages == []


@pytest.mark.mosquitto
def test_a_node_cannot_take_over_the_aggregators_session(site, broker):
    """Found with issue 19: n01 connecting with the aggregator's client id took over its persistent
    session; the aggregator was cut off and the messages queued for it were gone. The client id is
    the certificate's CN now (use_username_as_clientid), so the two sessions stay apart."""
    agg_id = "parking_lot.aggregator"  # what the aggregator uses: "{site}.{client_id}"
    received: list[bytes] = []
    dropped: list[str] = []

    @contextlib.contextmanager
    def connected(user: str, client_id: str, subscribe: str | None = None):
        """A persistent MQTT 5 session, connected (and subscribed) on entry, disconnected on exit."""
        mqtt = settings(site, broker, user)
        client = make_client(mqtt, client_id, persistent=True)
        client.reconnect_delay_set(30, 30)
        ready = threading.Event()
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(subscribe, qos=1) if subscribe else ready.set()
        client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
        client.on_message = lambda c, u, m: received.append(m.payload)
        client.on_disconnect = lambda c, u, f, rc, p: None if rc.value == 0 else dropped.append(user)
        connect_async(client, mqtt, persistent=True)
        client.loop_start()
        try:
            assert ready.wait(5), f"{user}: no CONNACK / SUBACK"
            yield client
        finally:
            client.disconnect()
            client.loop_stop()

    with connected("aggregator", agg_id, subscribe=f"{BASE}/+/data/+"):
        with connected("n01", agg_id):  # while the aggregator is connected
            time.sleep(0.5)
        assert dropped == [], "a node using the aggregator's client id cut the aggregator off"
    # The aggregator is away: the broker keeps its session and queues what arrives for it.
    with connected("n02", "parking_lot.n02") as node:
        node.publish(f"{BASE}/n02/data/microphone", b"queued", qos=1).wait_for_publish(5)
    with connected("n01", agg_id):  # while the aggregator is away
        time.sleep(0.5)
    assert received == []
    with connected("aggregator", agg_id):
        assert wait_for(lambda: received == [b"queued"]), f"the aggregator's queued message is gone: {received}"


@pytest.mark.mosquitto
def test_the_certificate_is_the_login_on_the_tls_listener(site, broker, sessions):
    """Username and password are not checked on the TLS listener: n01's certificate is n01 with no
    password, a wrong one or another user's name, and never more than n01."""
    agg = aggregator_listening(site, broker, sessions)
    node = settings(site, broker, "n01")
    for mqtt in (dataclasses.replace(node, username=None, password=None),
                 dataclasses.replace(node, password="wrong"),
                 dataclasses.replace(node, username="n02")):
        session = sessions(mqtt)
        assert session.accepted, session.connack
        assert session.publish(f"{BASE}/n02/birth", b"spoof").value == NOT_AUTHORIZED
        assert session.publish(f"{BASE}/n01/birth", b"own").value == 0
    assert wait_for(lambda: agg.received(f"{BASE}/n01/birth") == [b"own"] * 3)
    assert agg.received(f"{BASE}/n02/birth") == []


@pytest.mark.mosquitto
def test_a_node_publishes_under_its_own_topic_only(site, broker, sessions):
    agg = aggregator_listening(site, broker, sessions)
    node = sessions(settings(site, broker, "n01"))
    assert node.publish(f"{BASE}/n01/data/microphone", b"own").value == 0
    assert wait_for(lambda: agg.received(f"{BASE}/n01/data/microphone") == [b"own"])
    for foreign in (f"{BASE}/n02/data/microphone", f"{BASE}/n02/birth", f"{BASE}/aggregator/results"):
        assert node.publish(foreign, b"spoof").value == NOT_AUTHORIZED, foreign
    # Messages of one connection are handled in order: once this marker is in, a spoof would be too.
    node.publish(f"{BASE}/n01/state", b"marker")
    assert wait_for(lambda: agg.received(f"{BASE}/n01/state") == [b"marker"])
    assert [t for t, _ in agg.messages] == [f"{BASE}/n01/data/microphone", f"{BASE}/n01/state"]


@pytest.mark.mosquitto
def test_a_node_reads_nothing_and_cannot_fake_another_nodes_will(site, broker, sessions):
    agg = aggregator_listening(site, broker, sessions)
    monitor = sessions(settings(site, broker, "monitor"))
    monitor.subscribe(f"{BASE}/aggregator/#")
    node = sessions(settings(site, broker, "n01"))
    node.subscribe(f"{BASE}/aggregator/results", f"{BASE}/#")  # granted by Mosquitto 2.0, but filtered
    results = sessions(settings(site, broker, "aggregator-results"))
    assert results.publish(f"{BASE}/aggregator/results", b"result").value == 0
    assert wait_for(lambda: monitor.received(f"{BASE}/aggregator/results") == [b"result"])
    assert monitor.publish(f"{BASE}/monitor/birth", b"x").value == NOT_AUTHORIZED  # read-only
    # Both wills fire when their sockets vanish; only the one on the node's own topic is delivered.
    spoofer = sessions(settings(site, broker, "n02"), will=(f"{BASE}/n03/state", b"fake offline"))
    honest = sessions(settings(site, broker, "n04"), will=(f"{BASE}/n04/state", b"offline"))
    for session in (spoofer, honest):
        session.client.loop_stop()
        session.client.socket().close()
    assert wait_for(lambda: agg.received(f"{BASE}/n04/state") == [b"offline"])
    assert agg.received(f"{BASE}/n03/state") == []
    assert node.messages == []


@pytest.mark.mosquitto
def test_the_aggregators_two_identities_have_least_privilege(site, broker, sessions):
    """'aggregator' (the subscriber) reads node traffic and publishes nothing, not even its will;
    'aggregator-results' (the publisher) publishes results and health and reads nothing."""
    agg = aggregator_listening(site, broker, sessions)
    monitor = sessions(settings(site, broker, "monitor"))
    monitor.subscribe(f"{BASE}/aggregator/#")
    results = sessions(settings(site, broker, "aggregator-results"), will=(f"{BASE}/aggregator/state", b"offline"))
    results.subscribe(f"{BASE}/+/birth", f"{BASE}/+/state", f"{BASE}/+/data/+", f"{BASE}/#")
    node = sessions(settings(site, broker, "n01"))
    assert node.publish(f"{BASE}/n01/data/microphone", b"data").value == 0
    assert node.publish(f"{BASE}/n01/birth", b"birth").value == 0
    for topic in (f"{BASE}/aggregator/results", f"{BASE}/aggregator/state", f"{BASE}/aggregator/x",
                  f"{BASE}/n01/data/microphone"):
        assert agg.publish(topic, b"from the subscriber").value == NOT_AUTHORIZED, topic
    assert results.publish(f"{BASE}/aggregator-results/state", b"own subtree").value == NOT_AUTHORIZED
    assert results.publish(f"{BASE}/n01/birth", b"as n01").value == NOT_AUTHORIZED
    assert results.publish(f"{BASE}/aggregator/state", b"online").value == 0
    assert results.publish(f"{BASE}/aggregator/results", b"result").value == 0
    assert wait_for(lambda: monitor.received(f"{BASE}/aggregator/results") == [b"result"])
    assert wait_for(lambda: agg.received(f"{BASE}/n01/birth") == [b"birth"])
    assert agg.received(f"{BASE}/n01/data/microphone") == [b"data"]
    assert results.messages == []
    # Its +/state subscription does not bring the aggregator its own health: the deny covers reads too.
    assert agg.received(f"{BASE}/aggregator/state") == []
    # Wills: the publisher's "offline" is delivered; one the subscriber's identity set on the same topic
    # is not (that session takes agg's connection over: one per identity, and agg is done here).
    spoof = sessions(settings(site, broker, "aggregator"), will=(f"{BASE}/aggregator/state", b"fake offline"))
    for session in (spoof, results):
        session.client.loop_stop()
        session.client.socket().close()
    assert wait_for(lambda: b"offline" in monitor.received(f"{BASE}/aggregator/state"))
    assert monitor.received(f"{BASE}/aggregator/state") == [b"online", b"offline"]
