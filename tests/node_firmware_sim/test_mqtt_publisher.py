"""The node's MQTT session against a real Mosquitto: birth, will, reconnect, bdSeq."""

import time

import paho.mqtt.client as mqtt

from node_firmware_sim.mqtt_publisher import NodePublisher
from spar_wire.lifecycle import parse_birth, parse_state
from spar_wire.mqtt_settings import MqttSettings


def retained(port, topic, timeout_s=5.0):
    got = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_message = lambda c, u, m: got.setdefault(m.topic, m.payload)
    client.connect("127.0.0.1", port)
    client.loop_start()
    deadline = time.monotonic() + timeout_s
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    client.disconnect()
    client.loop_stop()
    return got.get(topic)


def wait_for(predicate, timeout_s):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def test_birth_state_and_reconnect_with_a_new_bdseq(mosquitto, parking_lot):
    settings = MqttSettings(host=mosquitto.host, port=mosquitto.port, reconnect_min_s=1, reconnect_max_s=2)
    node = NodePublisher(parking_lot, "n06", settings).start()
    try:
        birth = parse_birth(retained(mosquitto.port, "spar/v1/parking_lot/n06/birth"))
        assert birth.bd_seq == 0 and birth.position == (26.0, 30.0)
        assert set(birth.modalities) == {"microphone", "geophone"} and birth.firmware
        assert parse_state(retained(mosquitto.port, "spar/v1/parking_lot/n06/state")).state == "online"
        mosquitto.restart()  # graceful: retained messages persist, the node is disconnected
        assert wait_for(lambda: not node.connected, 5)
        assert wait_for(lambda: node.connected, 15), "node did not reconnect"
        assert wait_for(lambda: parse_birth(retained(mosquitto.port,
                                                     "spar/v1/parking_lot/n06/birth")).bd_seq == 1, 5)
    finally:
        node.stop()
    state = parse_state(retained(mosquitto.port, "spar/v1/parking_lot/n06/state"))
    assert state.state == "offline" and state.bd_seq == 1


def test_last_will_announces_a_vanished_node(mosquitto, parking_lot):
    settings = MqttSettings(host=mosquitto.host, port=mosquitto.port, keepalive_s=1)
    node = NodePublisher(parking_lot, "n07", settings).start()
    # Vanish without a DISCONNECT: stop the network loop and close the socket under paho.
    node._client.loop_stop()
    node._client.socket().close()
    assert wait_for(lambda: (retained(mosquitto.port, "spar/v1/parking_lot/n07/state", 1.0) or b"")
                    .find(b"offline") >= 0, 10)


def test_a_publish_the_client_refused_is_counted_not_raised(parking_lot):
    """paho's is_published raises for a refused publish (its queue is full); the uplink counts it as failed."""
    import paho.mqtt.client as mqtt

    from node_firmware_sim.delivery_scheduler import DeliveryScheduler
    from node_firmware_sim.firmware import EncodedFrame
    from node_firmware_sim.link_model import LinkConfig, LinkModel
    from node_firmware_sim.uplink import NodeUplink
    from spar_wire.mqtt_settings import publish_outcome

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="never-connected")
    client.max_queued_messages_set(1)
    queued = client.publish("spar/v1/x/n01/data/microphone", b"x", qos=1)
    refused = client.publish("spar/v1/x/n01/data/microphone", b"y", qos=1)
    assert publish_outcome(queued) == "pending"  # kept by paho, sent once connected
    assert publish_outcome(refused) == "failed"
    scheduler = DeliveryScheduler(realtime=False)
    uplink = NodeUplink("n01", LinkModel(LinkConfig(), 0), scheduler, lambda frame: refused, buffer_size=4)
    uplink.send(EncodedFrame("n01", "microphone", 0, 0, b"frame"), 2.0)
    scheduler.run_due(10.0)
    assert uplink.collect_acks(wait_s=0.1) == 0
    assert (uplink.counters.published, uplink.counters.acked, uplink.counters.failed) == (1, 0, 1)


def test_a_publish_made_while_disconnected_is_acked_after_the_connect(mosquitto):
    """paho keeps a QoS 1 message published before the connection and sends it after CONNACK: it is
    pending, then acked, never counted as failed (a node that lost its broker counts acks right)."""
    from spar_wire.mqtt_settings import MqttSettings, connect_async, make_client, publish_outcome

    settings = MqttSettings(port=mosquitto.port)
    client = make_client(settings, "early-publisher", persistent=False)
    info = client.publish("spar/v1/x/n01/data/microphone", b"x", qos=1)
    assert publish_outcome(info) == "pending"
    connect_async(client, settings, persistent=False)
    client.loop_start()
    try:
        assert wait_for(lambda: publish_outcome(info) == "acked", 10)
    finally:
        client.disconnect()
        client.loop_stop()
