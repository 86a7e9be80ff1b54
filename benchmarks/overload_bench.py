"""``spar-bench overload``: the aggregator under 10x its nominal load, and after it.

Three phases back to back, without a pause: the site's nominal window rate, ``factor`` times that,
then nominal again. The real aggregator runs in this process (a random-weight model of the shipped
student's architecture, ``max_held_messages`` and ``queue_size`` as deployed) behind a private
Mosquitto with the deployed in-flight limit; a separate publisher process plays every node of a
synthetic site (``load_generator``'s paced publisher, the one ``spar-bench latency`` uses).

What must hold, and what is measured:
- the queue stays bounded: its depth in windows and in held (unacknowledged) messages is sampled
  every 20 ms;
- the oldest work is dropped and counted: every message the broker acknowledged was either decoded
  or shed from the message queue (counted), and every window assembled was either served or shed
  from the window queue (counted);
- the latency of served windows stays bounded: from the moment every node finished a window (its
  schedule) to its result, p50/p99/max per phase. The bound follows from the settings: a window
  waits at most its deadline (a shed message leaves it partial), then behind the windows the queue
  may hold, each costing an inference: deadline + (held windows + 2) x 2 x inference median + 0.5 s;
- the service recovers: how long after the load drops latency is back within reach of the first
  phase's, and stays there;
- resident memory: sampled with the queue.

Nominal: one window per window length (a site's natural rate). Whether 10x overloads this machine
depends on the site size: the latency benchmark measures where each size saturates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cli_support import DEFAULT_SITE
from benchmarks.errors import BenchError
from benchmarks.load_generator import PacedPublisher, ResultCollector, StepPublish
from benchmarks.load_sites import ensure_model, synthetic_site
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.site_layout import load_site_layout
from testbed.latency_stats import percentile
from testbed.local_broker import BrokerSettings, LocalBroker
from testbed.machine import describe_machine

PHASES = ("nominal", "overload", "recovery")


@dataclass(frozen=True)
class OverloadConfig:
    """What to run: the site size, the nominal rate and factor, the phases' lengths, the settings under test."""

    nodes: int = 64  # synthetic site size
    nominal_rate: float | None = None  # windows/s; None: one per window length
    factor: float = 10.0  # the overload phase offers factor x nominal
    phase_s: tuple[float, float, float] = (10.0, 10.0, 20.0)  # nominal, overload, recovery
    queue_size: int = 64  # aggregator settings under test (as in configs/aggregator.toml)
    max_held_messages: int = 400
    codec: str = "png"
    model: str = "student"  # or "tiny" (testbed.tiny_onnx_model)
    backend: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise BenchError(f"nodes must be >= 1, got {self.nodes}")
        if self.nominal_rate is not None and not (math.isfinite(self.nominal_rate) and self.nominal_rate > 0):
            raise BenchError(f"nominal rate must be > 0 windows/s, got {self.nominal_rate!r}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise BenchError(f"factor must be >= 1, got {self.factor!r}")
        if len(self.phase_s) != 3 or not all(math.isfinite(s) and s > 0 for s in self.phase_s):
            raise BenchError(f"phase_s must be three durations > 0, got {self.phase_s!r}")


@dataclass
class PhaseResult:
    """One phase (nominal, overload or recovery): what was offered, what was served, and how fast."""

    name: str
    rate: float  # offered windows/s
    windows: int
    served: int  # windows with a result
    partial: int  # of those, incomplete
    p50_ms: float
    p99_ms: float
    max_ms: float
    growth_ms: float  # median latency of the last third of served windows minus the middle third
    # Medians of where the time went: before the aggregator had the window's first message (publisher
    # lag, broker, and ingest backlog), assembling it, waiting in the window queue, inference.
    stage_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class OverloadReport:
    """A whole overload run: the phases, the aggregator's own accounting of every message and window, the checks."""

    config: dict[str, Any]
    machine: str
    model: str
    messages_per_window: int
    phases: list[PhaseResult]
    published_messages: int  # acknowledged by the broker to the publisher
    decoded_messages: int  # taken by the aggregator's ingest thread
    dropped_messages: int  # shed from the message queue, oldest first (counted)
    assembled: int  # windows the assembler closed
    dropped: int  # of those, shed from the window queue, oldest first (counted)
    failed: int  # of those, failed inference
    results: int  # of those, stored and published
    unserved: int  # windows published without a result
    max_queue_windows: int
    max_queue_messages: int
    rss_mib: dict[str, float]  # start / peak / end
    recovery_s: float | None  # recovery phase start -> latency back for good (None: never)
    latency_bound_ms: float = float("nan")  # see the module docstring
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def phase(self, name: str) -> PhaseResult:
        return next(p for p in self.phases if p.name == name)

    @property
    def checks(self) -> dict[str, bool]:
        """The issue's four promises, as measured."""
        nominal, overload, recovery = (self.phase(n) for n in PHASES)
        window_bound = self.config["queue_size"]
        message_bound = self.config["max_held_messages"] + self.messages_per_window
        return {
            "queue bounded": self.max_queue_windows <= window_bound and self.max_queue_messages <= message_bound,
            "oldest dropped and counted": (
                self.published_messages == self.decoded_messages + self.dropped_messages
                and self.assembled == self.results + self.dropped + self.failed),
            "latency bounded": overload.max_ms <= self.latency_bound_ms,
            "recovered": self.recovery_s is not None and recovery.p50_ms <= 2 * nominal.p50_ms + 50.0,
        }

    def to_markdown(self) -> str:
        c = self.config
        lines = [
            f"# Overload: {c['nodes']} nodes, nominal {self.phases[0].rate:g} windows/s, "
            f"{c['factor']:g}x in the middle",
            "",
            f"{self.machine}; model {self.model}; {self.messages_per_window} messages per window; "
            f"queue_size {c['queue_size']}, max_held_messages {c['max_held_messages']}; {self.elapsed_s:.0f} s.",
            "",
            "| phase | offered w/s | windows | served | partial | e2e p50 ms | p99 ms | max ms | growth ms "
            "| before ingest | assembly | queue | inference |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in self.phases:
            stages = " | ".join(f"{p.stage_ms.get(k, float('nan')):.0f}"
                                for k in ("before ingest", "assembly", "queue", "inference"))
            lines.append(f"| {p.name} | {p.rate:g} | {p.windows} | {p.served} | {p.partial} | {p.p50_ms:.0f} | "
                         f"{p.p99_ms:.0f} | {p.max_ms:.0f} | {p.growth_ms:.0f} | {stages} |")
        recovery = "never" if self.recovery_s is None else f"{self.recovery_s:.1f} s"
        overload_max = self.phase("overload").max_ms
        lines += [
            "",
            f"- Shed, oldest first, and counted by the aggregator: **{self.dropped_messages}** of "
            f"{self.published_messages} messages before decoding, **{self.dropped}** of {self.assembled} "
            f"assembled windows before inference; {self.unserved} published windows got no result.",
            f"- Queue at most **{self.max_queue_windows}** windows / **{self.max_queue_messages}** held messages "
            f"(bounds {c['queue_size']} / {c['max_held_messages']} + one window).",
            f"- Latency bound from the settings: {self.latency_bound_ms:.0f} ms (overload max {overload_max:.0f} ms).",
            f"- Recovery after the load dropped: **{recovery}**.",
            f"- Resident memory: start {self.rss_mib['start']:.0f} MiB, peak {self.rss_mib['peak']:.0f} MiB, "
            f"end {self.rss_mib['end']:.0f} MiB.",
            "",
            "| check | |",
            "|---|---|",
            *(f"| {name} | {'yes' if ok else '**NO**'} |" for name, ok in self.checks.items()),
        ]
        lines += [f"- note: {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "checks": self.checks}, indent=2, default=_nan_to_none) + "\n"


def run_overload(config: OverloadConfig, workdir: str | Path = Path("benchmarks/.work/overload"),
                 progress: Callable[[str], None] = lambda text: None) -> OverloadReport:
    """Run the three phases (module docstring) and measure them."""
    from edge_runtime.config import AggregatorConfig
    from edge_runtime.service import Aggregator

    started = time.monotonic()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    progress("model")
    info = ensure_model(DEFAULT_SITE, workdir / "models", max_nodes=max(64, config.nodes), kind=config.model,
                        seed=config.seed, progress=progress)
    site = synthetic_site(DEFAULT_SITE, config.nodes, workdir / "sites", seed=config.seed)
    layout = load_site_layout(site)
    window_s = layout.window_s()
    nominal = config.nominal_rate or 1.0 / window_s
    database = workdir / "results.sqlite3"
    for stale in database.parent.glob(database.name + "*"):
        stale.unlink()
    with LocalBroker(BrokerSettings(persistence=False), workdir=workdir / "broker") as broker:
        aggregator = Aggregator(AggregatorConfig(
            site=site, model=info.manifest, database=database, backend=config.backend, metrics_port=None,
            queue_size=config.queue_size, max_held_messages=config.max_held_messages,
            mqtt=MqttSettings(host=broker.host, port=broker.port)))
        sampler = _Sampler(aggregator)
        try:
            with PacedPublisher(broker, site, config.codec, config.seed) as publisher:
                aggregator.start()
                with ResultCollector(broker, layout.site_id) as collector, sampler:
                    progress("warm-up")
                    publisher.step(0, 3, nominal)
                    time.sleep(1.0)
                    sampler.reset()
                    steps = _phases(publisher, config, nominal, progress)
                    _wait_for_quiet(aggregator, sum(len(s.stamps) for s in steps), collector)
                    received = list(collector.received)
                    counts = _Counts.of(aggregator).minus(sampler.baseline)
        finally:
            aggregator.stop()
    window_ns = int(round(window_s * 1e9))
    phases, recovery_s, unserved = _analyse(steps, received, window_ns, config, nominal)
    messages_per_window = sum(len(n.modalities) for n in layout.nodes)
    held_windows = math.ceil(config.max_held_messages / messages_per_window)
    inference_ms = phases[1].stage_ms.get("inference", float("nan"))
    bound_ms = aggregator.config.deadline_fraction * window_s * 1e3 + (held_windows + 2) * 2 * inference_ms + 500.0
    return OverloadReport(
        config={**asdict(config), "phase_s": list(config.phase_s)}, machine=describe_machine({}),
        model=info.description, messages_per_window=messages_per_window, phases=phases,
        published_messages=sum(step.acked for step in steps), decoded_messages=counts.decoded,
        dropped_messages=counts.dropped_messages, assembled=counts.assembled, dropped=counts.dropped_windows,
        failed=counts.failed, results=counts.results, unserved=unserved, max_queue_windows=sampler.max_windows,
        max_queue_messages=sampler.max_messages, rss_mib=sampler.rss(), recovery_s=recovery_s,
        latency_bound_ms=round(bound_ms, 1), elapsed_s=time.monotonic() - started)


# --------------------------------------------------------------------------- running
def _phases(publisher: PacedPublisher, config: OverloadConfig, nominal: float,
            progress: Callable[[str], None]) -> list[StepPublish]:
    steps = []
    index = 3 + 2  # after the warm-up windows, two empty grid slots
    for name, rate, seconds in zip(PHASES, (nominal, nominal * config.factor, nominal), config.phase_s, strict=True):
        windows = max(3, int(round(seconds * rate)))
        progress(f"{name}: {windows} windows at {rate:g}/s")
        steps.append(publisher.step(index, windows, rate))
        index += windows
    return steps


class _Sampler:
    """Every 20 ms: the window queue's depth and held messages, and this process's resident memory."""

    def __init__(self, aggregator: Any):
        self.aggregator = aggregator
        self.max_windows = self.max_messages = 0
        self.rss_samples: list[float] = []
        self.baseline = _Counts.of(aggregator)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="overload-sampler", daemon=True)

    def reset(self) -> None:
        self.max_windows = self.max_messages = 0
        self.rss_samples = [_rss_mib()]
        self.baseline = _Counts.of(self.aggregator)

    def rss(self) -> dict[str, float]:
        samples = self.rss_samples or [_rss_mib()]
        return {"start": samples[0], "peak": max(samples), "end": samples[-1]}

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        queue = self.aggregator.window_queue
        while not self._stop.wait(0.02):
            self.max_windows = max(self.max_windows, queue.qsize())
            self.max_messages = max(self.max_messages, queue.weight())
            if len(self.rss_samples) < 100_000:
                self.rss_samples.append(_rss_mib())


def _wait_for_quiet(aggregator: Any, windows: int, collector: ResultCollector, timeout_s: float = 60.0) -> None:
    """Until every published window has a result or was dropped, and results stopped arriving."""
    deadline = time.monotonic() + timeout_s
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len(collector.received)
        if count != last:
            last, quiet_since = count, time.monotonic()
        if aggregator.assembler.open_windows == 0 and aggregator.window_queue.qsize() == 0 \
                and aggregator.message_queue.qsize() == 0 and time.monotonic() - quiet_since > 2.0:
            return
        time.sleep(0.05)


@dataclass(frozen=True)
class _Counts:
    """The aggregator's own counters that account for every message and window."""

    decoded: int
    dropped_messages: int
    assembled: int
    dropped_windows: int
    failed: int
    results: int

    @classmethod
    def of(cls, aggregator: Any) -> _Counts:
        dropped = {dict(labels).get("item"): int(value) for _, labels, value in aggregator.metrics.overload.samples()}
        assembler, worker = aggregator.assembler.counts, aggregator.worker.snapshot_counts()
        shed = aggregator.processor.snapshot_counts().get("shed", 0)  # received, counted, never decoded
        return cls(aggregator.processor.traffic()[0] - shed, dropped.get("message", 0),
                   assembler["windows_complete"] + assembler["windows_partial"], dropped.get("window", 0),
                   worker.get("windows_failed", 0), worker.get("results", 0))

    def minus(self, other: _Counts) -> _Counts:
        return _Counts(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))


def _rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("nan")


# --------------------------------------------------------------------------- analysis
def _analyse(steps: list[StepPublish], received: list[tuple[int, bytes]], window_ns: int, config: OverloadConfig,
             nominal: float) -> tuple[list[PhaseResult], float | None, int]:
    """Per phase latency of served windows; recovery time; windows without a result."""
    by_stamp = {stamp: (p, j) for p, step in enumerate(steps) for j, stamp in enumerate(step.stamps)}
    latency: dict[tuple[int, int], tuple[float, bool, dict[str, float]]] = {}
    for _, payload in received:
        result = json.loads(payload)
        key = by_stamp.get(int(result["window_start_ns"]))
        times = result["latency_ms"]
        if key is None or times.get("end_to_end") is None or key in latency:
            continue
        p, j = key
        ready_ns = int(result["window_start_ns"]) + window_ns + int(round(times["end_to_end"] * 1e6))
        e2e = (ready_ns - steps[p].scheduled_ns[j]) / 1e6
        stages = {name: float(times[name]) for name in ("assembly", "queue", "inference")}
        stages = {"before ingest": e2e - sum(stages.values()), **stages}
        latency[key] = (e2e, not result.get("complete", True), stages)
    rates = (nominal, nominal * config.factor, nominal)
    phases = [_phase(name, rate, step, [latency.get((p, j)) for j in range(len(step.stamps))])
              for p, (name, rate, step) in enumerate(zip(PHASES, rates, steps, strict=True))]
    recovery = recovery_time_s(steps[2], [latency.get((2, j)) for j in range(len(steps[2].stamps))], phases[0])
    unserved = sum(len(step.stamps) for step in steps) - len(latency)
    return phases, recovery, unserved


def _phase(name: str, rate: float, step: StepPublish,
           rows: list[tuple[float, bool, dict[str, float]] | None]) -> PhaseResult:
    """One phase's figures from its windows' (e2e ms, partial, stage ms) rows, None where unserved."""
    served = [r for r in rows if r is not None]
    e2e = [r[0] for r in served]
    # Last third against the middle one: a bounded queue fills in the first third and then holds its
    # latency flat; an unbounded one keeps growing through the phase.
    third = len(e2e) // 3
    growth = float(np.median(e2e[-third:]) - np.median(e2e[third:-third])) if third >= 1 else float("nan")
    stages = {key: round(float(np.median([r[2][key] for r in served])), 1) for key in served[0][2]} if served else {}
    return PhaseResult(name, rate, len(step.stamps), len(served), sum(r[1] for r in served), percentile(e2e, 50),
                       percentile(e2e, 99), max(e2e, default=float("nan")), growth, stages)


def recovery_time_s(step: StepPublish, rows: list[tuple[float, bool, dict[str, float]] | None],
                    baseline: PhaseResult) -> float | None:
    """Seconds from the recovery phase's start to the first window from which on every window is served
    within twice the nominal p50 (+ 50 ms, for noise)."""
    bound = 2 * baseline.p50_ms + 50.0
    first_good = None
    for j, row in enumerate(rows):
        if row is None or row[0] > bound:
            first_good = None
        elif first_good is None:
            first_good = j
    if first_good is None:
        return None
    return (step.scheduled_ns[first_good] - step.scheduled_ns[0]) / 1e9


def _nan_to_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else str(value)
