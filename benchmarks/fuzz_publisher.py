"""The raw MQTT side of ``spar-bench fuzz``: one QoS 1 session with a bounded window in flight, and
throwaway connections for what the broker answers with a disconnect.

PUBACK reason codes are how the run tells delivered messages (``SUCCESS``) from topics nobody
subscribes to (``NO_SUBSCRIBERS``) and from messages the broker refused.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from benchmarks.errors import BenchError

# MQTT 5 PUBACK reason codes: delivered to a subscriber (the aggregator), or to nobody.
SUCCESS, NO_SUBSCRIBERS = 0x00, 0x10


def broker_refuses_topic(topic: str) -> bool:
    """Whether Mosquitto drops a connection that publishes to ``topic`` (its UTF-8 rules, MQTT 5 1.5.4)."""
    return any(code <= 0x1F or 0x7F <= code <= 0x9F or 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE
               for code in map(ord, topic))


class FuzzPublisher:
    """One MQTT 5 session publishing at QoS 1 with at most ``max_inflight`` unacknowledged messages.

    Counts PUBACK reason codes: "Success" means the broker delivered to a subscriber (the
    aggregator is the only one), "No matching subscribers" that the topic reaches nobody.
    """

    def __init__(self, host: str, port: int, max_inflight: int = 100):
        import paho.mqtt.client as mqtt

        self.host, self.port = host, port
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="spar-fuzzer", protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.slots = threading.BoundedSemaphore(max_inflight)
        self.lock = threading.Condition()
        self.codes: Counter[int] = Counter()  # PUBACK reason code value -> count
        self.sent = 0
        self.acked = 0
        self.disconnects = 0
        self.connected = threading.Event()

    def start(self, timeout_s: float = 10.0) -> FuzzPublisher:
        """Connect (clean session) and wait for the CONNACK."""
        self.client.connect(self.host, self.port, keepalive=60)
        self.client.loop_start()
        if not self.connected.wait(timeout_s):
            raise BenchError(f"fuzz publisher: no CONNACK from 127.0.0.1:{self.port} in {timeout_s:.0f} s")
        return self

    def stop(self) -> None:
        """Disconnect and end paho's network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self.lock:
            self.disconnects += 1
        self.connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self.lock:
            self.codes[int(getattr(reason_code, "value", reason_code))] += 1
            self.acked += 1
            self.lock.notify_all()
        self.slots.release()

    def publish(self, topic: str, payload: bytes, timeout_s: float = 30.0) -> bool:
        """Publish at QoS 1; False if paho refuses the topic (ValueError, e.g. wildcards)."""
        if not self.slots.acquire(timeout=timeout_s):
            raise BenchError(f"no PUBACK for {timeout_s:.0f} s with the in-flight window full")
        try:
            self.client.publish(topic, payload, qos=1)
        except ValueError:  # UnicodeEncodeError included: lone surrogates
            self.slots.release()
            return False
        with self.lock:
            self.sent += 1
        return True

    def wait_acked(self, timeout_s: float = 30.0) -> bool:
        """Until every message sent so far has its PUBACK."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while self.acked < self.sent:
                left = deadline - time.monotonic()
                if left <= 0 or not self.lock.wait(left):
                    return self.acked >= self.sent
        return True

    def snapshot(self) -> Counter[int]:
        """PUBACK reason codes so far (code value -> count)."""
        with self.lock:
            return Counter(self.codes)


def publish_once(host: str, port: int, topic: str, payload: bytes, timeout_s: float = 5.0) -> int | None:
    """Publish one message on a throwaway connection: the PUBACK reason code, or None if the broker
    dropped the connection (or nothing came back in time)."""
    import paho.mqtt.client as mqtt

    outcome: dict[str, int | None] = {}
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_publish(c, u, mid, reason_code, properties) -> None:
        outcome["code"] = int(getattr(reason_code, "value", reason_code))
        done.set()

    client.on_publish = on_publish
    client.on_disconnect = lambda *args: done.set()
    # Looped by hand, not by loop_start: paho's network thread would wait out a reconnect back-off
    # (a second or more) after the broker dropped us.
    client.connect(host, port, keepalive=10)
    try:
        client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + timeout_s
        while not done.is_set() and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != 0:  # connection gone
                break
    finally:
        client.disconnect()
    return outcome.get("code")
