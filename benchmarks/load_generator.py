"""The paced load generator of the latency and overload benchmarks: simulated nodes on a schedule.

A :class:`PacedPublisher` is a spawned process holding one MQTT client per node of a site. It
encodes a few windows of the parking-lot scenario once (real spectrogram content, so decoding costs
what it does in the field), then on each :meth:`PacedPublisher.step` re-stamps them onto the site's
window grid and publishes window j of every node at ``t0 + j / rate``, reporting in a
:class:`StepPublish` when each window was scheduled, started and finished and how many messages the
broker acknowledged. It runs in its own process so that publishing does not share the aggregator's
interpreter (the aggregator under test runs in the benchmark's process).

Node clocks are virtual: window k carries the stamp ``base + k * window_length`` whatever the rate,
because the aggregator files messages on a grid of the window length and cannot tell two windows
apart that are stamped closer than half a window (``latency_bench``'s module docstring has how the
latencies are converted back to the schedule).

A :class:`ResultCollector` subscribes to the site's results topic and keeps every result with the
wall-clock time it arrived, the other end of the measurement.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.errors import BenchError
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.site_layout import SiteLayout, load_site_layout
from testbed.local_broker import LocalBroker

START_LEAD_S = 0.3  # publisher's pause between pre-stamping a step and its first window
DISTINCT_WINDOWS = 4  # distinct scenario windows per node, repeated (encoding is not under test)


@dataclass
class StepPublish:
    """What the publisher did in one step (wall-clock ns; one entry per window)."""

    stamps: list[int]  # the window_start_ns every node's messages of the window carried
    scheduled_ns: list[int]  # when the window was due (t0 + j / rate)
    started_ns: list[int]  # when its first message was handed to the MQTT client
    finished_ns: list[int]  # ... and its last
    messages: int  # token messages published in the step
    acked: int  # of those, acknowledged by the broker (QoS 1)


class PacedPublisher:
    """A spawned process with one MQTT client per node, driven step by step over two queues.

    Use as a context manager: entering starts the process and waits until every client is
    connected (BenchError after ``ready_timeout_s``); leaving stops it. Steps of one publisher share
    one window grid and continue each node's sequence numbers, so give each step a ``first_index``
    past the previous step's windows.
    """

    def __init__(self, broker: LocalBroker, site: Path, codec: str, seed: int, ready_timeout_s: float = 120.0):
        ctx = multiprocessing.get_context("spawn")
        self._commands: Any = ctx.Queue()
        self._replies: Any = ctx.Queue()
        self._process = ctx.Process(target=_publisher_main, daemon=True, name="latency-publisher",
                                    args=(broker.host, broker.port, str(site), codec, seed, self._commands,
                                          self._replies))
        self._ready_timeout_s = ready_timeout_s

    def __enter__(self) -> PacedPublisher:
        self._process.start()
        self._expect("ready", self._ready_timeout_s)
        return self

    def step(self, first_index: int, windows: int, rate: float) -> StepPublish:
        """Publish windows ``first_index`` .. ``first_index + windows - 1`` of every node at ``rate``
        windows/s, wait for the broker's acknowledgements, and say when each window went out."""
        self._commands.put(("step", first_index, windows, rate))
        return self._expect("done", START_LEAD_S + windows / rate + 120.0)

    def __exit__(self, *exc_info: Any) -> None:
        if self._process.is_alive():
            self._commands.put(("stop",))
            self._process.join(15)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)

    def _expect(self, kind: str, timeout_s: float) -> Any:
        try:
            got, value = self._replies.get(timeout=timeout_s)
        except queue.Empty:
            raise BenchError(f"the publisher process sent no {kind!r} within {timeout_s:.0f} s "
                             f"(alive: {self._process.is_alive()}, exit code {self._process.exitcode})") from None
        if got == "error":
            raise BenchError(f"the publisher process failed:\n{value}")
        if got != kind:
            raise BenchError(f"the publisher process sent {got!r}, expected {kind!r}")
        return value


def _publisher_main(host: str, port: int, site: str, codec: str, seed: int, commands: Any, replies: Any) -> None:
    """Publisher process: encode template frames, connect one client per node, run steps on command."""
    clients: list[tuple[str, Any]] = []
    try:
        layout = load_site_layout(site)
        templates = _templates(layout, codec, seed)
        clients = _connect_clients(layout, host, port)
        seq = [0] * len(clients)  # per node, across steps, as a node's firmware counts
        window_ns = int(round(layout.window_s() * 1e9))
        base_ns = time.time_ns() // window_ns * window_ns  # one grid for every step of this publisher
        replies.put(("ready", len(clients)))
        for _ in range(10_000):  # one command per step; a sweep has a few dozen
            try:
                command = commands.get(timeout=900)
            except queue.Empty:
                return  # the parent is gone
            if command[0] != "step":
                return
            _, first_index, windows, rate = command
            replies.put(("done", _publish_step(layout, clients, templates, seq, first_index, windows, rate, base_ns)))
    except Exception:  # noqa: BLE001 - the parent must learn why its publisher died, not time out
        replies.put(("error", traceback.format_exc()))
    finally:
        for _, client in clients:
            client.disconnect()
            client.loop_stop()


def _templates(layout: SiteLayout, codec: str, seed: int) -> list[list[tuple[int, Any]]]:
    """Per distinct window, (client slot, TokenMessage) for every node and modality, from the parking-lot
    scenario (real spectrogram content, so payload decoding costs what it does in the field)."""
    from node_firmware_sim.firmware import FirmwareConfig, NodeFirmware
    from node_firmware_sim.scenarios import make_scenario
    from spar_wire.codecs import CodecSpec
    from spar_wire.message import decode_message

    source = make_scenario("parking_lot", layout, seed)
    firmwares = [NodeFirmware(layout, node.id, FirmwareConfig(codec=CodecSpec.parse(codec))) for node in layout.nodes]
    out = []
    for k in range(DISTINCT_WINDOWS):
        window = source.window(k)
        out.append([(slot, decode_message(firmware.encode(m, window.signals[(firmware.node.id, m)], 0).frame,
                                          decode_image=False))
                    for slot, firmware in enumerate(firmwares) for m in firmware.node.modalities])
    return out


def _connect_clients(layout: SiteLayout, host: str, port: int, timeout_s: float = 30.0) -> list[tuple[str, Any]]:
    from spar_wire.mqtt_settings import connect_async, make_client

    settings = MqttSettings(host=host, port=port, max_inflight=1000)
    clients, events = [], []
    for node in layout.nodes:
        client = make_client(settings, f"bench.{layout.site_id}.{node.id}", persistent=False)
        connected = threading.Event()
        client.on_connect = lambda c, u, f, rc, p, connected=connected: connected.set()
        connect_async(client, settings, persistent=False)
        client.loop_start()
        clients.append((node.id, client))
        events.append(connected)
    deadline = time.monotonic() + timeout_s
    for (node_id, _), event in zip(clients, events, strict=True):
        if not event.wait(max(0.0, deadline - time.monotonic())):
            raise BenchError(f"publisher client of node {node_id} did not connect within {timeout_s:.0f} s")
    return clients


def _publish_step(layout: SiteLayout, clients: list[tuple[str, Any]], templates: list[list[tuple[int, Any]]],
                  seq: list[int], first_index: int, windows: int, rate: float,
                  base_ns: int | None = None) -> StepPublish:
    """Re-stamp the templates for windows first_index.. (grid stamps, next sequence numbers from ``seq``,
    which is advanced), then publish window j of every node at t0 + j / rate and wait for the broker's
    acknowledgements."""
    from spar_wire.message import encode_message
    from spar_wire.topics import data_topic

    window_ns = int(round(layout.window_s() * 1e9))
    # Any grid works, stamps are virtual (module docstring), but they start now: a window that
    # ended long ago is backlog to the aggregator, which never sheds it.
    base_ns = base_ns if base_ns is not None else time.time_ns() // window_ns * window_ns
    frames, stamps = [], []
    for j in range(windows):
        stamp = base_ns + (first_index + j) * window_ns
        batch = []
        for slot, message in templates[(first_index + j) % len(templates)]:
            payload = encode_message(dataclasses.replace(message, window_start_ns=stamp, seq=seq[slot] % 2**32))
            seq[slot] += 1
            batch.append((slot, data_topic(layout.site_id, message.node, message.modality), payload))
        frames.append(batch)
        stamps.append(stamp)
    period_ns = 1e9 / rate
    t0_mono = time.monotonic() + START_LEAD_S
    t0_wall = time.time_ns() + int(START_LEAD_S * 1e9)
    scheduled, started, finished, infos = [], [], [], []
    for j, batch in enumerate(frames):
        delay = t0_mono + j / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        scheduled.append(t0_wall + int(round(j * period_ns)))
        started.append(time.time_ns())
        for slot, topic, payload in batch:
            infos.append(clients[slot][1].publish(topic, payload, qos=1))
        finished.append(time.time_ns())
    deadline = time.monotonic() + 60.0
    for info in infos:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            info.wait_for_publish(timeout=remaining)
        except (RuntimeError, ValueError):  # not connected / queue full: counted as not acknowledged
            continue
    return StepPublish(stamps, scheduled, started, finished, len(infos), sum(info.is_published() for info in infos))


class ResultCollector:
    """Subscribes to the site's results topic; keeps (receipt wall ns, payload) in arrival order.

    A context manager: entering connects and waits for the subscription (BenchError after
    ``timeout_s``), so no result published afterwards is missed; ``received`` only grows.
    """

    def __init__(self, broker: LocalBroker, site_id: str, timeout_s: float = 15.0):
        from spar_wire.mqtt_settings import make_client

        self.settings = MqttSettings(host=broker.host, port=broker.port, max_inflight=1000)
        self.site_id = site_id
        self.timeout_s = timeout_s
        self.received: list[tuple[int, bytes]] = []  # list.append is atomic: paho's thread appends, we read
        self._subscribed = threading.Event()
        self.client = make_client(self.settings, f"bench.{site_id}.results", persistent=False)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, codes, props: self._subscribed.set()
        self.client.on_message = lambda c, u, msg: self.received.append((time.time_ns(), msg.payload))

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        from spar_wire.topics import aggregator_topic

        client.subscribe(aggregator_topic(self.site_id, "results"), qos=1)

    def __enter__(self) -> ResultCollector:
        from spar_wire.mqtt_settings import connect_async

        connect_async(self.client, self.settings, persistent=False)
        self.client.loop_start()
        if not self._subscribed.wait(self.timeout_s):
            self.__exit__()
            raise BenchError(f"the results subscriber did not subscribe within {self.timeout_s:.0f} s")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.client.disconnect()
        self.client.loop_stop()

