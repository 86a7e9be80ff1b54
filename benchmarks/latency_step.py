"""One step of ``spar-bench latency``: publish a paced burst, wait until every window is accounted for, measure.

The aggregator runs in the benchmark's own process, so a :class:`Probe` reads its counters and the
CPU clocks of its threads directly; :func:`run_step` snapshots them before and after a step of the
:class:`~benchmarks.load_generator.PacedPublisher` and turns the published schedule and the results
the :class:`~benchmarks.load_generator.ResultCollector` received into a
:class:`~benchmarks.latency_results.StepResult` (the conversion from the virtual node stamps back to
the publish schedule is explained in ``latency_bench``'s module docstring).
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.latency_results import StepResult
from benchmarks.load_generator import PacedPublisher, ResultCollector, StepPublish
from testbed.latency_stats import percentile

STALL_S = 3.0  # a drain with no progress for this long is over
MAX_DRAIN_S = 60.0


@dataclass
class _Snapshot:
    """The aggregator's counters and CPU clocks at one instant; a step is measured between two."""

    accepted: int
    late: int
    results: int
    failed: int
    dropped: int
    received: int
    cpu_s: float
    thread_cpu_s: dict[str, float | None]


class Probe:
    """Reads the aggregator's counters and CPU clocks (the aggregator runs in this process)."""

    def __init__(self, aggregator: Any, collector: ResultCollector):
        self.aggregator = aggregator
        self.collector = collector
        # Decoding and assembly run in the "ingest" thread; paho's network thread only queues messages.
        self.threads = {"ingest": "ingest", "inference": "inference"}

    def snapshot(self) -> _Snapshot:
        """Counters and clocks now (another thread keeps changing them: each is read once)."""
        agg = self.aggregator
        processor = agg.processor.snapshot_counts()
        worker = agg.worker.snapshot_counts()
        dropped = sum(value for _, labels, value in agg.metrics.overload.samples() if dict(labels).get("item")
                      == "window")
        return _Snapshot(processor.get("accepted", 0), int(_counter(agg.assembler.counts, "late")),
                         worker.get("results", 0), worker.get("windows_failed", 0), int(dropped),
                         len(self.collector.received), time.process_time(),
                         {key: _thread_cpu_s(name) for key, name in self.threads.items()})


def run_step(probe: Probe, publisher: PacedPublisher, *, rate: float, windows: int, first_index: int,
             window_ns: int, nodes: int, messages_per_window: int) -> StepResult:
    """Publish one paced step and wait until every window is accounted for; measure it."""
    before = probe.snapshot()
    wall_started = time.monotonic()
    published = publisher.step(first_index, windows, rate)
    accepted_at_end = probe.aggregator.processor.snapshot_counts().get("accepted", 0) - before.accepted
    after = _drain(probe, before, windows)
    wall_s = time.monotonic() - wall_started
    received = probe.collector.received[before.received:after.received]
    return _measure(published, received, before, after, rate=rate, window_ns=window_ns, nodes=nodes,
                    messages_per_window=messages_per_window, accepted_at_end=accepted_at_end, wall_s=wall_s)


def _drain(probe: Probe, before: _Snapshot, windows: int) -> _Snapshot:
    """Wait (bounded) until results + drops cover ``windows`` and every result reached the subscriber."""
    stall_deadline = time.monotonic() + STALL_S
    hard_deadline = time.monotonic() + MAX_DRAIN_S
    last_progress = None
    for _ in range(int(MAX_DRAIN_S / 0.01) + 1):
        now = probe.snapshot()
        done = (now.results - before.results) + (now.failed - before.failed) + (now.dropped - before.dropped)
        if done >= windows and now.received - before.received >= now.results - before.results:
            return now
        marker = (now.accepted, now.results, now.dropped, now.received)
        if marker != last_progress:
            last_progress, stall_deadline = marker, time.monotonic() + STALL_S
        if time.monotonic() > min(stall_deadline, hard_deadline):
            return now
        time.sleep(0.01)
    return probe.snapshot()


def _measure(published: StepPublish, received: list[tuple[int, bytes]], before: _Snapshot, after: _Snapshot, *,
             rate: float, window_ns: int, nodes: int, messages_per_window: int, accepted_at_end: int,
             wall_s: float) -> StepResult:
    """The step's StepResult from what was published, the results received and the counters around it."""
    by_stamp = {stamp: j for j, stamp in enumerate(published.stamps)}
    rows = []  # (j, e2e, publish lag, transport, assembly, queue, inference, delivery, batch, ready_ns, partial)
    for receipt_ns, payload in received:
        result = json.loads(payload)
        j = by_stamp.pop(int(result["window_start_ns"]), None)  # pop: a repeated result counts once
        latency = result["latency_ms"]
        if j is None or latency.get("end_to_end") is None:
            continue
        ready_ns = int(result["window_start_ns"]) + window_ns + int(round(latency["end_to_end"] * 1e6))
        e2e = (ready_ns - published.scheduled_ns[j]) / 1e6
        lag = (published.started_ns[j] - published.scheduled_ns[j]) / 1e6
        transport = e2e - lag - latency["assembly"] - latency["queue"] - latency["inference"]
        rows.append((j, e2e, lag, transport, latency["assembly"], latency["queue"], latency["inference"],
                     (receipt_ns - ready_ns) / 1e6, int(result.get("batch_size", 1)), ready_ns,
                     not result.get("complete", True)))
    rows.sort()
    results = len(rows)
    e2e = [r[1] for r in rows]
    third = len(e2e) // 3
    growth = float(np.median(e2e[-third:]) - np.median(e2e[:third])) if third >= 1 else float("nan")
    ready = sorted(r[9] for r in rows)
    achieved = _rate(ready)
    generator = _rate(published.started_ns)
    if not math.isfinite(generator):
        generator = rate
    # From the first window's schedule to the last result: n windows occupy span + one period.
    span_s = max(((ready[-1] if ready else published.finished_ns[-1]) - published.scheduled_ns[0]) / 1e9, 1e-3)
    dropped = (after.dropped - before.dropped) + (after.failed - before.failed)
    busy_s = sum(r[6] / r[8] for r in rows) / 1e3
    threads = {key: (None if after.thread_cpu_s[key] is None or before.thread_cpu_s[key] is None
                     else (after.thread_cpu_s[key] - before.thread_cpu_s[key]) / wall_s) for key in after.thread_cpu_s}

    def med(col: int, part: list[tuple] = rows) -> float:
        return float(np.median([r[col] for r in part])) if part else float("nan")

    def stages(part: list[tuple]) -> dict[str, float]:
        return {"load generator": med(2, part), "ingest": med(3, part) + med(4, part),
                "inference": med(5, part) + med(6, part)}

    return StepResult(
        nodes=nodes, offered_rate=rate, windows=len(published.stamps), messages=published.acked,
        generator_rate=generator, achieved_rate=achieved, results=results, partial=sum(r[10] for r in rows),
        dropped=dropped, lost=max(0, len(published.stamps) - results - dropped),
        p50_ms=percentile(e2e, 50), p99_ms=percentile(e2e, 99), growth_ms=growth, publish_lag_ms=med(2),
        transport_ms=med(3),
        assembly_ms=med(4), queue_ms=med(5), inference_ms=med(6), delivery_ms=med(7),
        mean_batch=float(np.mean([r[8] for r in rows])) if rows else float("nan"),
        inference_busy=min(1.0, busy_s / span_s), offered_messages_per_s=rate * messages_per_window,
        accepted_messages_per_s=(after.accepted - before.accepted) / (span_s + 1 / rate),
        ingest_lag_messages=max(0, published.acked - accepted_at_end), late_messages=after.late - before.late,
        aggregator_cpu=(after.cpu_s - before.cpu_s) / wall_s, ingest_thread_cpu=threads.get("ingest"),
        inference_thread_cpu=threads.get("inference"), span_s=span_s, e2e_ms=[round(v, 3) for v in e2e],
        head_stage_ms=stages(rows[:third] if third >= 1 else rows),
        tail_stage_ms=stages(rows[-third:] if third >= 1 else rows))



def _rate(times_ns: list[int]) -> float:
    """Events/s from sorted event times: the inverse slope of time against rank (least squares), so one
    late first or last event does not move it as it moves (n - 1) / (last - first)."""
    if len(times_ns) < 2:
        return float("nan")
    seconds = (np.asarray(times_ns, dtype=np.int64) - times_ns[0]) / 1e9
    slope = float(np.polyfit(np.arange(len(seconds)), seconds, 1)[0])
    return 1.0 / slope if slope > 0 else float("nan")


def _thread_cpu_s(name: str) -> float | None:
    """CPU seconds of this process's thread called ``name`` (Linux per-thread clock); None if absent."""
    for thread in threading.enumerate():
        if thread.name == name and thread.ident is not None:
            try:
                return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except (AttributeError, OSError):
                return None
    return None


def _counter(counter: Any, key: str) -> int:
    """One entry of a Counter another thread may be resizing (retry, bounded)."""
    for _ in range(5):
        try:
            return int(counter.get(key, 0))
        except RuntimeError:
            continue
    return 0

