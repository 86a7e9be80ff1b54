"""``spar-bench latency``: end-to-end latency against node count and window rate, up to saturation.

For each site size N (synthetic layouts with the parking lot's modalities and feature configs, nodes
on a jittered grid over a lot whose area grows with N) the real aggregator runs in this process with
a random-weight model of the shipped student's architecture (one ONNX graph, dynamic node axis),
fed through a loopback Mosquitto by a separate publisher process (one MQTT client per node). The
window rate steps up; at each step window k of every node is published at t0 + k / rate, and the
step is measured from the aggregator's own result fields and counters. An N stops at its first
saturated step: windows dropped or left partial, latency growing through the step (a backlog),
results coming out below 90 % of the offered rate, or the load generator itself falling behind.

Node clocks are virtual. The aggregator files messages on a grid of the window length (2 s here)
and treats two stamps less than half a window apart as the same window, so a site cannot send
windows faster than one per window length with honest stamps. Window k therefore carries the stamp
``base + k * window_length`` while it is published at ``T_k = t0 + k / rate``; the result's
``latency_ms.end_to_end`` (now - stamped window end) is converted back to the schedule:
``end_to_end = stamp + window_length + latency_ms.end_to_end - T_k``, i.e. from the moment every
node completed window k to the result being ready (after inference, just before it is stored and
published). Its breakdown: the publisher's lag behind the schedule, transport (publisher -> broker
-> first message processed by the aggregator), assembly (first message -> window closed), queue and
inference (the aggregator's own fields), and delivery (ready -> received by a subscriber on the
box).

The benchmark is split along its seams: ``load_sites`` (synthetic sites and the random-weight
model), ``load_generator`` (the paced publisher process and the results subscriber, shared with
``spar-bench overload``), ``latency_step`` (one step measured), ``latency_classify`` (saturation
and bottleneck rules), ``latency_results`` and ``latency_report`` (the figures and their
rendering). This module runs the sweep and holds the command line; its public names are the
benchmark's API.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cli_support import DEFAULT_SITE
from benchmarks.errors import BenchError
from benchmarks.experiment_ledger import versions
from benchmarks.latency_classify import classify_step
from benchmarks.latency_report import LatencyReport, summary_line
from benchmarks.latency_results import NodeSweep, StepResult
from benchmarks.latency_step import Probe, run_step
from benchmarks.load_generator import START_LEAD_S, PacedPublisher, ResultCollector
from benchmarks.load_sites import MODEL_KINDS, ensure_model, load_layout, synthetic_site
from spar_wire.errors import WireError
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.site_layout import SiteLayout, load_site_layout
from testbed.local_broker import BrokerSettings, LocalBroker
from testbed.machine import describe_machine

# The benchmark's API, wherever each name is defined (the CLI and the tests import them from here).
__all__ = ["DEFAULT_NODES", "DEFAULT_RATES", "DEFAULT_SITE", "MODEL_KINDS", "LatencyReport", "NodeSweep",
           "StepResult", "check_arguments", "classify_step", "ensure_model",
           "run_latency_benchmark", "step_windows", "summary_line", "synthetic_site"]

DEFAULT_NODES = (8, 16, 32, 64)
DEFAULT_RATES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
SETTLE_S = 0.3  # pause between steps so the previous step's tail cannot leak into the next


# =========================================================================== the sweep
def run_latency_benchmark(node_counts: Sequence[int] = DEFAULT_NODES, rates: Sequence[float] = DEFAULT_RATES, *,
                          windows_per_step: int = 40, min_windows_per_step: int = 6,
                          max_seconds_per_step: float = 4.0, budget_s: float = 240.0,
                          workdir: str | Path = Path("benchmarks/.work/latency"),
                          base_site: str | Path = DEFAULT_SITE, backend: str = "auto", codec: str = "png",
                          model: str = "student", seed: int = 0, broker: LocalBroker | None = None,
                          progress: Callable[[str], None] = lambda text: None) -> LatencyReport:
    """Sweep window rates for every node count until the aggregator saturates.

    Args:
        node_counts: site sizes N, each a synthetic layout of N nodes x the base site's modalities.
        rates: offered windows/s (all nodes of a window together), swept in increasing order.
        windows_per_step: at most this many windows per step; a step lasts about
            ``max_seconds_per_step`` but has at least ``min_windows_per_step`` windows.
        budget_s: wall-clock budget of the whole sweep (model build and setup included); each N gets
            its share (unused time passes on), and a step that would not fit is skipped and noted.
        workdir: cached model, site layouts, result databases, broker files.
        model: "student" (random weights, the shipped student's architecture, node table >= max N) or
            "tiny" (testbed.tiny_onnx_model); the student falls back to tiny when it cannot be built.
        broker: a running broker to use (tests); default: a private Mosquitto for the run.

    Returns:
        LatencyReport with one NodeSweep per N, each with its StepResults.
    """
    node_counts, rates = check_arguments(node_counts, rates, windows_per_step, min_windows_per_step,
                                         max_seconds_per_step, budget_s, model, codec)
    started = time.monotonic()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base_layout = load_layout(base_site)
    progress("model")
    info = ensure_model(base_site, workdir / "models", max_nodes=max(64, max(node_counts)), kind=model, seed=seed,
                        progress=progress)
    try:
        window_s = base_layout.window_s()  # the site's one window length (its modalities must agree)
    except WireError as exc:
        raise BenchError(str(exc)) from None
    sweeps: list[NodeSweep] = []
    backend_text = "?"
    settings_used: dict[str, Any] = {}
    own_broker = broker is None
    if own_broker:
        broker = LocalBroker(BrokerSettings(persistence=False, extra_lines=("max_inflight_messages 0",)),
                             workdir=workdir / "broker").start()
    try:
        for i, n in enumerate(node_counts):
            deadline = started + budget_s * (i + 1) / len(node_counts)
            site = synthetic_site(base_site, n, workdir / "sites", seed=seed)
            sweep, backend_text, settings_used = _sweep_nodes(
                site, info.manifest, broker, rates, deadline=deadline, windows_per_step=windows_per_step,
                min_windows=min_windows_per_step, max_seconds=max_seconds_per_step, backend=backend, codec=codec,
                seed=seed, database=workdir / "results" / f"n{n}.sqlite3", progress=progress)
            sweeps.append(sweep)
    finally:
        if own_broker:
            broker.close()
    return LatencyReport(describe_machine(versions("onnxruntime")), backend_text, info, codec, windows_per_step,
                         max_seconds_per_step, window_s, sweeps, time.monotonic() - started, settings_used,
                         load_before, os.getloadavg() if hasattr(os, "getloadavg") else None)


def check_arguments(node_counts: Sequence[int], rates: Sequence[float], windows_per_step: int,
                    min_windows_per_step: int, max_seconds_per_step: float, budget_s: float, model: str = "student",
                    codec: str = "png") -> tuple[tuple[int, ...], tuple[float, ...]]:
    """BenchError for an argument that cannot work; the node counts and rates, sorted and de-duplicated."""
    from spar_wire.codecs import CodecSpec

    nodes = tuple(node_counts)
    if not nodes or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 999 for n in nodes):
        raise BenchError(f"node counts must be integers in 1..999 (three-digit node ids), got {list(nodes)}")
    values = tuple(rates)
    if not values or not all(isinstance(r, (int, float)) and math.isfinite(r) and 0 < r <= 10_000 for r in values):
        raise BenchError(f"rates must be windows/s in (0, 10000], got {list(values)}")
    for name, value, low in (("windows_per_step", windows_per_step, 3), ("min_windows_per_step",
                                                                        min_windows_per_step, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BenchError(f"{name} must be an integer >= {low}, got {value!r}")
    if min_windows_per_step > windows_per_step:
        raise BenchError(f"min_windows_per_step ({min_windows_per_step}) > windows_per_step ({windows_per_step})")
    for name, value in (("max_seconds_per_step", max_seconds_per_step), ("budget_s", budget_s)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise BenchError(f"{name} must be a positive number of seconds, got {value!r}")
    if model not in MODEL_KINDS:
        raise BenchError(f"model must be one of {', '.join(MODEL_KINDS)}, got {model!r}")
    try:
        CodecSpec.parse(codec)
    except WireError as exc:
        raise BenchError(f"codec: {exc}") from None
    return tuple(sorted(set(nodes))), tuple(sorted({float(r) for r in values}))


def step_windows(rate: float, windows_per_step: int, min_windows: int, max_seconds: float) -> int:
    """Windows in a step at ``rate``: about ``max_seconds`` of traffic, within [min_windows, windows_per_step]."""
    return int(min(windows_per_step, max(min_windows, round(rate * max_seconds))))


def _sweep_nodes(site: Path, manifest: Path, broker: LocalBroker, rates: Sequence[float], *, deadline: float,
                 windows_per_step: int, min_windows: int, max_seconds: float, backend: str, codec: str, seed: int,
                 database: Path, progress: Callable[[str], None]) -> tuple[NodeSweep, str, dict[str, Any]]:
    """One N: its own aggregator (fresh database), the bare backend timed, then its rate steps.

    Returns the sweep, the backend's description and the aggregator settings that shape latency.
    """
    from edge_runtime.config import AggregatorConfig
    from edge_runtime.errors import AggregatorError
    from edge_runtime.service import Aggregator

    layout = load_site_layout(site)
    n = len(layout.nodes)
    database.parent.mkdir(parents=True, exist_ok=True)
    for stale in database.parent.glob(database.name + "*"):  # results of an earlier run would count as duplicates
        stale.unlink()
    config = AggregatorConfig(site=site, model=manifest, database=database, backend=backend, metrics_port=None,
                              mqtt=MqttSettings(host=broker.host, port=broker.port, max_inflight=1000))
    progress(f"N={n}: loading the model and measuring the bare backend")
    try:
        aggregator = Aggregator(config)
    except AggregatorError as exc:
        raise BenchError(f"aggregator for {n} nodes: {exc}") from None
    backend_text = _backend_text(aggregator.backend)
    settings = {"deadline_fraction": config.deadline_fraction, "max_open_windows": config.max_open_windows,
                "queue_size": config.queue_size, "max_batch": config.max_batch}
    messages_per_window = sum(len(node.modalities) for node in layout.nodes)
    try:  # stop() is safe before start(): it closes the backend and the store whatever happened
        bare_ms, bare_batch_ms = _bare_ms(aggregator, layout, config.max_batch)
        sweep = NodeSweep(n, messages_per_window, bare_ms, bare_batch_ms, config.max_batch)
        progress(f"N={n}: bare model {bare_ms:.1f} ms/window; starting {n} publishers")
        with PacedPublisher(broker, site, codec, seed) as publisher:
            try:
                aggregator.start()
            except AggregatorError as exc:
                raise BenchError(f"aggregator for {n} nodes did not start: {exc}") from None
            with ResultCollector(broker, layout.site_id) as collector:
                _steps(sweep, Probe(aggregator, collector), publisher, rates, deadline=deadline,
                       windows_per_step=windows_per_step, min_windows=min_windows, max_seconds=max_seconds,
                       window_ns=aggregator.worker.window_ns, progress=progress)
    finally:
        aggregator.stop()
    return sweep, backend_text, settings


def _steps(sweep: NodeSweep, probe: Probe, publisher: PacedPublisher, rates: Sequence[float], *, deadline: float,
           windows_per_step: int, min_windows: int, max_seconds: float, window_ns: int,
           progress: Callable[[str], None]) -> None:
    """Run the rate steps of one N into ``sweep`` until one saturates or the deadline would pass."""
    n, per_window = sweep.nodes, sweep.messages_per_window
    # Warm-up (not recorded): first SQLite writes, first batches, MQTT buffers.
    run_step(probe, publisher, rate=10.0, windows=3, first_index=0, window_ns=window_ns, nodes=n,
             messages_per_window=per_window)
    index = 3 + 2  # two empty grid slots between steps: a straggler can never join the next step's window
    for rate in rates:
        windows = step_windows(rate, windows_per_step, min_windows, max_seconds)
        if time.monotonic() + START_LEAD_S + windows / rate + 2 * SETTLE_S > deadline:
            sweep.note = f"time budget ran out before {rate:g} windows/s"
            progress(f"N={n}: {sweep.note}")
            return
        time.sleep(SETTLE_S)
        step = run_step(probe, publisher, rate=rate, windows=windows, first_index=index, window_ns=window_ns,
                        nodes=n, messages_per_window=per_window)
        index += windows + 2
        baseline = next((s for s in sweep.steps if not s.saturated), None)
        diagnosis = classify_step(step, baseline)
        step.saturated, step.reasons = diagnosis.saturated, list(diagnosis.reasons)
        step.bottleneck, step.evidence = diagnosis.bottleneck, diagnosis.evidence
        sweep.steps.append(step)
        progress(f"N={n} {rate:g} w/s: {step.results}/{step.windows} results at {step.achieved_rate:.1f}/s, "
                 f"e2e p50 {step.p50_ms:.1f} ms p99 {step.p99_ms:.1f} ms"
                 + (f" -> saturated ({', '.join(step.reasons)}; {step.bottleneck})" if step.saturated else ""))
        if step.saturated:
            return


# =========================================================================== small helpers
def _bare_ms(aggregator: Any, layout: SiteLayout, max_batch: int, budget_s: float = 1.0) -> tuple[float, float]:
    """Backend alone: median ms per window at batch 1, and ms per window at ``max_batch``."""
    from edge_runtime.inference.backend import dummy_inputs

    backend, manifest = aggregator.backend, aggregator.manifest
    n = len(layout.nodes)
    rng = np.random.default_rng(0)

    def inputs(batch: int) -> dict[str, np.ndarray]:
        x = dummy_inputs(manifest, batch=batch, n_nodes=n)
        for name, value in x.items():
            if name == "positions":
                x[name] = np.broadcast_to(layout.positions().astype(np.float32), value.shape).copy()
            elif value.dtype == np.float32:
                x[name] = (rng.standard_normal(value.shape) * 10 - 60).astype(np.float32)
        return x

    timings = {}
    for batch, least in ((1, 3), (max_batch, 1)):
        feed = inputs(batch)
        backend.run(feed)
        times = []
        stop = time.perf_counter() + budget_s
        for _ in range(20):
            t = time.perf_counter()
            backend.run(feed)
            times.append((time.perf_counter() - t) * 1e3 / batch)
            if time.perf_counter() > stop and len(times) >= least:
                break
        timings[batch] = float(np.median(times))
    return timings[1], timings[max_batch]


def _backend_text(backend: Any) -> str:
    """The backend's name, and its device where it can describe one (the report's "backend" line)."""
    describe = getattr(backend, "device_description", None)
    return f"{getattr(backend, 'name', '?')} on {describe()}" if describe else getattr(backend, "name", "?")
