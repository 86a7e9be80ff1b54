"""``spar-bench runtime``: is the aggregator close to the bare model, and where does time go?

In one run, with one backend:
1. bare-model throughput: windows/s calling the backend directly (batch 1) on real window tensors;
2. aggregator throughput: the full service fed by simulated nodes over a loopback Mosquitto, from
   the first message published to the last result stored and published;
3. added latency (the window's last message arrived -> result published), p50 / p99, paced: once with
   each window's messages sent at one instant (split into the wait before inference and the SQLite
   commit), once with each message delayed by up to ``spread_ms`` as a link's jitter spreads them;
4. ingest capacity: token messages/s the aggregator's ingest path accepts;
5. a cost breakdown per message and per window (header parse, image decode, patchify, assembly,
   inference), timed in-process on the same frames;
6. the result store's commit cost with ``synchronous=FULL`` (the default: an acknowledged window
   survives a power cut) against ``NORMAL`` (one fsync less per commit), on a real SQLite file on the
   disk the results would live on (:func:`run_store_benchmark`, in ``runtime_store``; alone with
   ``--store-only``).
"""

from __future__ import annotations

import multiprocessing
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.experiment_ledger import versions
from benchmarks.runtime_store import (
    STORE_HEADING,
    SYNC_MODES,
    StoreCommitReport,
    run_store_benchmark,
    splice_store_section,
)
from edge_runtime.config import AggregatorConfig
from edge_runtime.node_registry import NodeRegistry
from edge_runtime.result_store import ResultStore
from edge_runtime.service import Aggregator
from edge_runtime.window_assembler import WindowAssembler
from node_firmware_sim.firmware import EncodedFrame, FirmwareConfig, NodeFirmware
from node_firmware_sim.scenarios import make_scenario
from spar_wire.codecs import CodecSpec
from spar_wire.features import patchify
from spar_wire.message import decode_message
from spar_wire.mqtt_settings import MqttSettings, connect_async, make_client
from spar_wire.site_layout import SiteLayout, load_site_layout
from spar_wire.topics import data_topic
from testbed.latency_stats import percentile
from testbed.local_broker import BrokerSettings, LocalBroker
from testbed.machine import describe_machine
from testbed.tiny_onnx_model import build_tiny_model

# The benchmark's API; the store section's names are defined in runtime_store (the CLI and the
# tests import them from here).
__all__ = ["STORE_HEADING", "SYNC_MODES", "RuntimeReport", "StoreCommitReport", "run_runtime_benchmark",
           "run_store_benchmark", "splice_store_section", "summary_line"]


@dataclass
class RuntimeReport:
    """Sections 1-5 of the module docstring, and the store section (6) when it ran."""

    backend: str
    windows: int
    messages: int
    bare_windows_per_s: float
    aggregator_windows_per_s: float
    added_latency_ms: list[float] = field(default_factory=list)
    ingest_messages_per_s: float = 0.0
    costs_ms: dict[str, float] = field(default_factory=dict)
    paced_windows_per_s: float = 0.0  # the rate at which added_latency_ms was measured
    saturated_latency_ms: list[float] = field(default_factory=list)  # flat out: includes queueing
    machine: str = ""  # date, CPU, OS, Python and library versions (testbed.machine)
    store: StoreCommitReport | None = None  # synchronous FULL vs NORMAL; None when skipped
    wait_ms: list[float] = field(default_factory=list)  # paced, burst: last arrival -> inference starts
    store_ms: list[float] = field(default_factory=list)  # paced, burst: one commit
    spread_latency_ms: list[float] = field(default_factory=list)  # paced, arrivals spread over spread_ms
    spread_ms: float = 0.0

    @property
    def ratio(self) -> float:
        return self.aggregator_windows_per_s / self.bare_windows_per_s

    def percentile(self, q: float) -> float:
        return percentile(self.added_latency_ms, q)

    def to_markdown(self) -> str:
        lines = [
            "# spar-bench runtime", "",
            *([f"machine: {self.machine}", ""] if self.machine else []),
            f"backend: {self.backend}; {self.windows} windows, {self.messages} token messages", "",
            "| measure | value | target |", "|---|---|---|",
            f"| bare-model throughput (batch 1) | {self.bare_windows_per_s:,.0f} windows/s | |",
            f"| aggregator throughput | {self.aggregator_windows_per_s:,.0f} windows/s | |",
            f"| aggregator / bare model | {100 * self.ratio:.1f} % | >= 90 % |",
            f"| added latency p50 at {self.paced_windows_per_s:g} windows/s, each window's messages at once | "
            f"{self.percentile(50):.2f} ms | |",
            f"| added latency p99 at {self.paced_windows_per_s:g} windows/s, each window's messages at once | "
            f"{self.percentile(99):.2f} ms | <= 2 ms |",
            f"| of which: last message arrived -> inference starts, p50 / p99 | {percentile(self.wait_ms, 50):.2f} / "
            f"{percentile(self.wait_ms, 99):.2f} ms | |",
            f"| of which: SQLite commit, p50 / p99 | {percentile(self.store_ms, 50):.2f} / "
            f"{percentile(self.store_ms, 99):.2f} ms | |",
            f"| added latency p50 / p99 at {self.paced_windows_per_s:g} windows/s, arrivals spread over "
            f"{self.spread_ms:g} ms | {percentile(self.spread_latency_ms, 50):.2f} / "
            f"{percentile(self.spread_latency_ms, 99):.2f} ms | <= 2 ms (p99) |",
            f"| added latency p50 flat out (queueing included) | "
            f"{percentile(self.saturated_latency_ms, 50):.1f} ms | |",
            f"| ingest capacity | {self.ingest_messages_per_s:,.0f} messages/s | >= 5,000 |",
            "", "## Where the time goes (in-process, same frames)", "",
            "| step | ms |", "|---|---|",
        ]
        lines += [f"| {name} | {value:.4f} |" for name, value in self.costs_ms.items()]
        text = "\n".join(lines) + "\n"
        return text + "\n" + self.store.to_markdown() if self.store is not None else text



def _split(frames: dict[str, list[EncodedFrame]], windows: int) -> tuple[dict[str, list[EncodedFrame]],
                                                                         dict[str, list[EncodedFrame]]]:
    """The first ``windows`` windows of every node, and the rest."""
    starts = sorted({f.window_start_ns for node_frames in frames.values() for f in node_frames})
    cut = starts[windows] if windows < len(starts) else starts[-1] + 1
    return ({n: [f for f in fs if f.window_start_ns < cut] for n, fs in frames.items()},
            {n: [f for f in fs if f.window_start_ns >= cut] for n, fs in frames.items()})


def run_runtime_benchmark(site: str | Path, *, windows: int = 200, codec: str = "webp:85", backend: str = "auto",
                          hidden: int = 16, seed: int = 0, paced_rate: float = 20.0, spread_ms: float = 30.0,
                          store_dir: str | Path | None = None, store_batches: int = 1000,
                          progress: Callable[[str], None] = lambda text: None) -> RuntimeReport:
    """Sections 1-5 (see the module docstring), then the store section (6) in ``store_dir`` unless
    ``store_dir`` is None or ``store_batches`` is 0."""
    layout = load_site_layout(site)
    with tempfile.TemporaryDirectory(prefix="spar-runtime-") as tmp:
        tmp_path = Path(tmp)
        build_tiny_model(layout, tmp_path / "model", hidden=hidden, seed=seed)
        progress("encoding frames")
        paced_windows = max(20, int(paced_rate * 5))  # five seconds at the paced rate
        frames = _encode_frames(layout, windows + 2 * paced_windows, CodecSpec.parse(codec), seed)
        settings = BrokerSettings(persistence=False, extra_lines=("max_inflight_messages 0",))
        with LocalBroker(settings, workdir=tmp_path / "broker") as broker:
            config = AggregatorConfig(site=Path(site), model=tmp_path / "model" / "manifest.json",
                                      database=tmp_path / "results.sqlite3", backend=backend, metrics_port=None,
                                      deadline_fraction=0.5, max_open_windows=64, queue_size=4096,
                                      # Capacity, not shedding: no queue may drop (the broker's in-flight
                                      # limit is off too).
                                      ingest_queue_size=1_000_000, max_held_messages=10**9,
                                      broker_max_inflight=10**9,
                                      # The frames carry node clocks of a real-time site, sent flat out:
                                      # hundreds of seconds of windows in a few seconds, ahead of this
                                      # box's clock, one node's publisher ahead of another's. The clock
                                      # guard would rightly refuse them; its cost is still measured.
                                      max_clock_ahead_s=10 * 86_400.0, max_clock_skew_s=10 * 86_400.0,
                                      mqtt=MqttSettings(host=broker.host, port=broker.port, max_inflight=1000))
            aggregator = Aggregator(config)
            progress("bare model")
            window_inputs = _window_inputs(aggregator, frames, layout)
            bare = _bare_throughput(aggregator.backend, window_inputs)
            costs = _cost_breakdown(aggregator, frames, layout, window_inputs)
            observed: dict[str, list[float]] = {"added_latency_seconds": [], "wait_seconds": [], "store_seconds": []}
            latencies = observed["added_latency_seconds"]
            original = aggregator.worker.observe

            def record(name: str, value: float) -> None:
                if name in observed:
                    observed[name].append(value * 1e3)
                original(name, value)

            aggregator.worker.observe = record
            flat_out, paced = _split(frames, windows)
            paced, spread = _split(paced, paced_windows)
            with aggregator:
                progress("aggregator through Mosquitto, flat out")
                agg_rate, ingest_rate, cpu_per_message = _aggregator_throughput(aggregator, layout, broker,
                                                                                flat_out, windows)
                saturated = list(latencies)
                for values in observed.values():
                    values.clear()
                progress(f"aggregator through Mosquitto, paced at {paced_rate:g} windows/s")
                _aggregator_throughput(aggregator, layout, broker, paced, paced_windows, paced_rate)
                burst = {name: list(values) for name, values in observed.items()}
                latencies.clear()
                progress(f"aggregator through Mosquitto, paced, arrivals spread over {spread_ms:g} ms")
                _aggregator_throughput(aggregator, layout, broker, spread, paced_windows, paced_rate, spread_ms / 1e3)
    costs = {"aggregator process CPU per message (all threads, MQTT included)": cpu_per_message * 1e3, **costs}
    store = None
    if store_dir is not None and store_batches > 0:
        # After the aggregator has stopped: its threads must not share the disk or the cores with this.
        store = run_store_benchmark(site, store_dir, batches=store_batches, seed=seed, progress=progress)
    return RuntimeReport(f"{getattr(aggregator.backend, 'name', '?')}, result store synchronous={config.synchronous}, "
                         f"codec {codec}",
                         windows, sum(len(f) for f in flat_out.values()), bare, agg_rate,
                         burst["added_latency_seconds"], ingest_rate, costs, paced_rate, saturated,
                         describe_machine(versions("onnxruntime", "SQLite", "numpy")), store,
                         burst["wait_seconds"], burst["store_seconds"],
                         list(latencies), spread_ms)


# --------------------------------------------------------------------------- pieces
def _encode_frames(layout: SiteLayout, windows: int, codec: CodecSpec, seed: int) -> dict[str, list[EncodedFrame]]:
    """Per node, the frames of ``windows`` windows of the sine source (the nodes' work, done beforehand)."""
    source = make_scenario("sine", layout, seed)
    firmwares = {n.id: NodeFirmware(layout, n.id, FirmwareConfig(codec=codec)) for n in layout.nodes}
    frames: dict[str, list[EncodedFrame]] = {n.id: [] for n in layout.nodes}
    base_ns = time.time_ns() // 10**9 * 10**9
    window_ns = int(round(source.window_s * 1e9))
    for k in range(windows):
        window = source.window(k % 4)  # four distinct windows, repeated: encoding is not under test
        for node in layout.nodes:
            for modality in node.modalities:
                frames[node.id].append(firmwares[node.id].encode(
                    modality, window.signals[(node.id, modality)], base_ns + k * window_ns))
    return frames


def _window_inputs(aggregator: Aggregator, frames: dict[str, list[EncodedFrame]], layout: SiteLayout
                   ) -> list[dict[str, np.ndarray]]:
    """The placement tensors of the first windows, assembled by the aggregator's own assembler."""
    assembler = _fresh_assembler(aggregator)
    registry = NodeRegistry(layout, aggregator.manifest)
    closed = []
    for node_frames in zip(*frames.values(), strict=True):
        for frame in node_frames:
            msg = decode_message(frame.frame)
            tokens = patchify(msg.image(), aggregator.processor.features[msg.modality])
            added = assembler.add(msg.node, msg.modality, msg.window_start_ns, tokens, registry.snapshot(), 0.0)
            closed += added.closed
        if len(closed) >= 50:
            break
    return [{k: v[None] for k, v in w.inputs.items()} for w in closed]


def _fresh_assembler(aggregator: Aggregator) -> WindowAssembler:
    a = aggregator.assembler
    return WindowAssembler(a.modalities, a.window_ns / 1e9, deadline_s=a.deadline_s, max_open=a.max_open)


def _bare_throughput(backend: Any, inputs: list[dict[str, np.ndarray]], seconds: float = 2.0) -> float:
    backend.run(inputs[0])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        backend.run(inputs[done % len(inputs)])
        done += 1
    return done / (time.perf_counter() - started)


def _cost_breakdown(aggregator: Aggregator, frames: dict[str, list[EncodedFrame]], layout: SiteLayout,
                    inputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
    sample = [f for node_frames in frames.values() for f in node_frames[:8]]
    features = aggregator.processor.features

    def per_call(fn: Callable[[Any], Any], items: list[Any], repeat: int = 5) -> float:
        started = time.perf_counter()
        for _ in range(repeat):
            for item in items:
                fn(item)
        return (time.perf_counter() - started) / (repeat * len(items)) * 1e3

    headers = [decode_message(f.frame, decode_image=False) for f in sample]
    images = [h.image() for h in headers]
    return {
        "message: header parse + CRC": per_call(lambda f: decode_message(f.frame, decode_image=False), sample),
        "message: payload decode + dequantize": per_call(lambda h: h.image(), headers),
        "message: patchify": per_call(lambda pair: patchify(pair[1], features[pair[0].modality]),
                                      list(zip(headers, images, strict=True))),
        "window: inference (batch 1)": per_call(aggregator.backend.run, inputs[:10], repeat=3),
        "window: SQLite store (batch 1, synchronous=FULL, small result; see the store section)":
            _store_cost(aggregator),
    }


def _store_cost(aggregator: Aggregator, n: int = 50) -> float:
    with tempfile.TemporaryDirectory() as tmp, ResultStore(Path(tmp) / "s.sqlite3") as store:
        started = time.perf_counter()
        for i in range(n):
            store.store([{"site": "bench", "window_start_ns": i, "nodes_present": 8, "outputs": {"x": [0.0] * 5}}])
        return (time.perf_counter() - started) / n * 1e3


def _aggregator_throughput(aggregator: Aggregator, layout: SiteLayout, broker: LocalBroker,
                           frames: dict[str, list[EncodedFrame]], windows: int,
                           windows_per_s: float | None = None, spread_s: float = 0.0) -> tuple[float, float, float]:
    """Publish every frame from a separate process (one MQTT client per node, as fast as possible), so
    the publishers do not share the aggregator's interpreter; time until every result is out."""
    ctx = multiprocessing.get_context("spawn")
    go, ready = ctx.Event(), ctx.Event()
    publisher = ctx.Process(target=_publisher_process, daemon=True,
                            args=(broker.host, broker.port, layout.site_id, frames, ready, go, windows_per_s,
                                  spread_s))
    publisher.start()
    if not ready.wait(60):
        raise TimeoutError("the publisher process did not connect")
    accepted_before = aggregator.processor.snapshot_counts().get("accepted", 0)
    results_before = aggregator.worker.snapshot_counts().get("results", 0)
    total_messages = sum(len(f) for f in frames.values())
    started = time.perf_counter()
    cpu_started = time.process_time()  # this process = the aggregator (the publishers run elsewhere)
    go.set()
    ingest_done = _wait_until(lambda: aggregator.processor.snapshot_counts().get("accepted", 0) - accepted_before
                              >= total_messages, 120)
    try:
        results_done = _wait_until(lambda: aggregator.worker.snapshot_counts().get("results", 0) - results_before
                                   >= windows, 60)
    except TimeoutError:
        raise TimeoutError(f"results did not arrive: worker {aggregator.worker.snapshot_counts()}, assembler "
                           f"{dict(aggregator.assembler.counts)}") from None
    cpu_s = time.process_time() - cpu_started
    publisher.join(30)
    return windows / (results_done - started), total_messages / (ingest_done - started), cpu_s / total_messages


def _publisher_process(host: str, port: int, site: str, frames: dict[str, list[EncodedFrame]],
                       ready: Any, go: Any, windows_per_s: float | None = None, spread_s: float = 0.0) -> None:
    settings = MqttSettings(host=host, port=port, max_inflight=1000)
    clients = []
    for node_id in frames:
        client = make_client(settings, f"bench.{node_id}", persistent=False)
        connected = threading.Event()
        client.on_connect = lambda c, u, f, rc, p, connected=connected: connected.set()
        connect_async(client, settings, persistent=False)
        client.loop_start()
        connected.wait(10)
        clients.append((node_id, client))
    ready.set()
    go.wait(60)
    started = time.monotonic()
    threads = [threading.Thread(target=_publish_all, args=(client, site, frames[node_id], windows_per_s, started,
                                                           spread_s, seed))
               for seed, (node_id, client) in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for _, client in clients:
        client.disconnect()
        client.loop_stop()


def _publish_all(client: Any, site: str, frames: list[EncodedFrame], windows_per_s: float | None,
                 started: float, spread_s: float = 0.0, seed: int = 0) -> None:
    """Publish in order; paced at ``windows_per_s`` (window k leaves at started + k / rate, plus a
    uniform delay in [0, ``spread_s``] per message, as a link's jitter spreads a window's arrivals) or
    flat out."""
    rng = np.random.default_rng(seed)
    first_ns = frames[0].window_start_ns
    window_ns = None
    infos = []
    for frame in frames:
        if windows_per_s:
            window_ns = window_ns or next((f.window_start_ns - first_ns for f in frames
                                           if f.window_start_ns != first_ns), 1)
            k = (frame.window_start_ns - first_ns) // window_ns
            delay = started + k / windows_per_s + rng.uniform(0.0, spread_s) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        infos.append(client.publish(data_topic(site, frame.node, frame.modality), frame.frame, qos=1))
    for info in infos:
        info.wait_for_publish(timeout=60)


def _wait_until(predicate: Callable[[], bool], timeout_s: float) -> float:
    deadline = time.perf_counter() + timeout_s
    while not predicate():
        if time.perf_counter() > deadline:
            raise TimeoutError("the aggregator did not finish in time")
        time.sleep(0.002)
    return time.perf_counter()


def summary_line(report: RuntimeReport) -> str:
    """One line for the terminal: throughput against the bare model, added latency, ingest capacity."""
    return (f"aggregator {report.aggregator_windows_per_s:,.0f} windows/s = {100 * report.ratio:.1f} % of the bare "
            f"model ({report.bare_windows_per_s:,.0f}/s); added latency at {report.paced_windows_per_s:g} windows/s "
            f"p50 {report.percentile(50):.2f} ms, "
            f"p99 {report.percentile(99):.2f} ms (arrivals spread over {report.spread_ms:g} ms: p99 "
            f"{percentile(report.spread_latency_ms, 99):.2f} ms); ingest {report.ingest_messages_per_s:,.0f} "
            "messages/s")
