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
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import json
import math
import multiprocessing
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.errors import BenchError
from benchmarks.local_broker import BrokerSettings, LocalBroker
from benchmarks.machine import describe_machine
from spar_wire.errors import WireError
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.site_layout import SiteLayout, load_site_layout
from spar_wire.toml_file import read_toml

DEFAULT_SITE = Path("configs/sites/parking_lot.toml")
DEFAULT_NODES = (8, 16, 32, 64)
DEFAULT_RATES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
MODEL_KINDS = ("student", "tiny")

# Saturation thresholds (see classify_step).
ACHIEVED_FRACTION = 0.9  # results/s below this share of the offered rate: saturated
GENERATOR_FRACTION = 0.9  # the publisher reaching less than this share of the schedule: it is the limit
GROWTH_MIN_MS = 20.0  # e2e growth through a step below this is noise on a shared machine
# ... and below one window period: in a saturated FIFO each extra waiting window adds about one
# period, so less growth than that is not even one window of backlog (a transient stall recovers).
# Not relative to the step's early latency: a step that is backlogged from its first third on
# would hide its growth behind a threshold that grew with it.
GROWTH_PERIODS = 1.0
GROWTH_MIN_WINDOWS = 9  # fewer results: thirds too small to compare
STAGE_GROWTH_MIN_MS = 10.0  # a stage must have grown by this much to be named the bottleneck
# Backend running this share of the step: at capacity. Batching can still clear the backlog on
# average, but only by letting latency climb (measured: N=32 at 20 w/s, 94 % busy, p50 5x the idle p50).
BUSY_SATURATED = 0.9

START_LEAD_S = 0.3  # publisher's pause between pre-stamping a step and its first window
SETTLE_S = 0.3  # pause between steps so the previous step's tail cannot leak into the next
STALL_S = 3.0  # a drain with no progress for this long is over
MAX_DRAIN_S = 60.0
DISTINCT_WINDOWS = 4  # distinct scenario windows per node, repeated (encoding is not under test)
_MODEL_SOURCES = ("export.distill", "export.deploy_model", "export.onnx_export", "export.manifests",
                  "train.models.config", "train.models.spar", "train.models.transformer",
                  "train.models.positions", "train.heads")


# =========================================================================== results
@dataclass
class StepResult:
    """One (N, rate) step. Latencies in ms are medians over the step's results unless named p50/p99."""

    nodes: int
    offered_rate: float  # windows/s scheduled
    windows: int  # windows published
    messages: int  # token messages published and acknowledged by the broker
    generator_rate: float  # windows/s the publisher actually started (same fit)
    achieved_rate: float  # results/s (inverse slope of result times against rank)
    results: int
    partial: int  # results of incomplete windows (a node's message missed the window)
    dropped: int  # windows shed by the full window queue or failed in the backend
    lost: int  # published windows with neither a result nor a drop
    p50_ms: float  # end to end: every node completed the window -> result ready
    p99_ms: float
    growth_ms: float  # median e2e of the step's last third minus its first third
    publish_lag_ms: float  # publisher start of the window - schedule
    transport_ms: float  # publisher start -> first message processed by the aggregator
    assembly_ms: float  # first message -> window closed
    queue_ms: float  # closed -> inference started
    inference_ms: float  # backend call (shared by a batch)
    delivery_ms: float  # result ready -> received by a subscriber
    mean_batch: float
    inference_busy: float  # share of the step's span the backend was running
    offered_messages_per_s: float
    accepted_messages_per_s: float  # by the aggregator, over the step's span
    ingest_lag_messages: int  # published but not yet processed when the publisher finished
    late_messages: int  # arrived after their window had closed (dropped by the assembler)
    aggregator_cpu: float  # cores: the aggregator process's CPU seconds per second of the step's wall time
    ingest_thread_cpu: float | None  # cores: the MQTT thread that decodes and assembles
    inference_thread_cpu: float | None  # cores: the inference worker thread (ORT's own pool excluded)
    span_s: float  # first scheduled window -> last result ready
    e2e_ms: list[float] = field(default_factory=list)  # per result, in window order
    head_stage_ms: dict[str, float] = field(default_factory=dict)  # stage_ms over the step's first third
    tail_stage_ms: dict[str, float] = field(default_factory=dict)  # ... and over its last third
    saturated: bool = False
    reasons: list[str] = field(default_factory=list)
    bottleneck: str | None = None
    evidence: str = ""

    @property
    def stage_ms(self) -> dict[str, float]:
        """Median ms per bottleneck candidate: load generator, ingest (transport + assembly), inference."""
        return {"load generator": self.publish_lag_ms, "ingest": self.transport_ms + self.assembly_ms,
                "inference": self.queue_ms + self.inference_ms}


@dataclass
class NodeSweep:
    """All steps of one site size and where it saturated."""

    nodes: int
    messages_per_window: int
    bare_ms: float  # backend alone, batch 1, ms per window
    bare_batch_ms: float  # backend alone, per window at the aggregator's max batch
    max_batch: int
    steps: list[StepResult] = field(default_factory=list)
    note: str = ""  # why the sweep stopped early, if it did

    @property
    def saturated_step(self) -> StepResult | None:
        return next((s for s in self.steps if s.saturated), None)

    @property
    def sustained_rate(self) -> float | None:
        """The highest offered rate before the first saturated step."""
        ok = [s.offered_rate for s in self.steps if not s.saturated]
        limit = self.saturated_step
        if limit is not None:
            ok = [r for r in ok if r < limit.offered_rate]
        return max(ok) if ok else None

    def verdict(self) -> str:
        """One sentence: where this N saturates and why, from the measurements."""
        step = self.saturated_step
        if not self.steps:
            return f"not measured ({self.note or 'no steps'})"
        if step is None:
            top = max(s.offered_rate for s in self.steps)
            return f"not saturated up to {top:g} windows/s" + (f" ({self.note})" if self.note else "")
        return (f"saturates at {step.offered_rate:g} windows/s ({', '.join(step.reasons)}); "
                f"bottleneck {step.bottleneck}: {step.evidence}")


@dataclass
class ModelInfo:
    manifest: Path
    kind: str  # "student" (random weights, the shipped student's architecture) | "tiny"
    description: str
    parameters: int | None
    cached: bool
    note: str = ""  # why the tiny fallback was used


@dataclass
class LatencyReport:
    machine: str
    backend: str
    model: ModelInfo
    codec: str
    windows_per_step: int
    max_seconds_per_step: float
    window_s: float
    sweeps: list[NodeSweep]
    elapsed_s: float
    aggregator_settings: dict[str, Any] = field(default_factory=dict)
    load_before: tuple[float, float, float] | None = None  # os.getloadavg() when the run started
    load_after: tuple[float, float, float] | None = None  # ... and when it ended (this run included)

    def to_markdown(self) -> str:
        date = self.machine.split(" · ", 1)[0]
        lines = ["# spar-bench latency: end-to-end latency vs nodes and window rate", "",
                 f"machine: {self.machine}", "",
                 f"model: {self.model.description}" + (f" ({self.model.note})" if self.model.note else ""), "",
                 f"backend: {self.backend}; codec {self.codec}; aggregator {_settings_text(self.aggregator_settings)}; "
                 f"up to {self.windows_per_step} windows or {self.max_seconds_per_step:g} s per step; "
                 f"{self.elapsed_s:.0f} s in all; load average (1 / 5 / 15 min) {_load_text(self.load_before)} "
                 f"when it started, {_load_text(self.load_after)} when it ended (this run alone keeps about 1-1.5 "
                 "busy; more is other work sharing the cores).", "",
                 f"## Where each site saturates ({date})", "",
                 "| nodes | messages/window | bare model ms (b1) | bare ms/window (b" + str(self._max_batch()) + ") | "
                 "sustained windows/s | saturates at | bottleneck | evidence |",
                 "|---|---|---|---|---|---|---|---|"]
        for sweep in self.sweeps:
            step = sweep.saturated_step
            sustained = sweep.sustained_rate
            where = "not reached" if step is None else f"{step.offered_rate:g} ({', '.join(step.reasons)})"
            lines.append(
                f"| {sweep.nodes} | {sweep.messages_per_window} | {sweep.bare_ms:.1f} | {sweep.bare_batch_ms:.1f} | "
                f"{'–' if sustained is None else f'{sustained:g}'} | {where} | "
                f"{'–' if step is None else step.bottleneck} | "
                f"{sweep.note if step is None else step.evidence} |")
        lines += ["", f"## Every step ({date})", "",
                  "| nodes | offered w/s | publisher w/s | results w/s | windows | partial | dropped | lost | "
                  "p50 ms | p99 ms | growth ms | publish lag | transport | assembly | queue | inference | "
                  "delivery | batch | inference busy | msgs/s offered | msgs/s accepted | ingest lag msgs | "
                  "agg CPU cores | ingest thread | inference thread | saturated |",
                  "|" + "---|" * 26]
        for sweep in self.sweeps:
            for s in sweep.steps:
                lines.append("| " + " | ".join([
                    str(s.nodes), f"{s.offered_rate:g}", _f(s.generator_rate, 1), _f(s.achieved_rate, 1),
                    str(s.windows), str(s.partial), str(s.dropped), str(s.lost), _f(s.p50_ms, 1), _f(s.p99_ms, 1),
                    _f(s.growth_ms, 1), _f(s.publish_lag_ms, 1), _f(s.transport_ms, 1), _f(s.assembly_ms, 1),
                    _f(s.queue_ms, 1), _f(s.inference_ms, 1), _f(s.delivery_ms, 1), _f(s.mean_batch, 1),
                    f"{100 * s.inference_busy:.0f} %", f"{s.offered_messages_per_s:,.0f}",
                    f"{s.accepted_messages_per_s:,.0f}", str(s.ingest_lag_messages), _f(s.aggregator_cpu, 2),
                    _f(s.ingest_thread_cpu, 2), _f(s.inference_thread_cpu, 2),
                    ", ".join(s.reasons) if s.saturated else "no"]) + " |")
        lines += ["", "## How to read it", "",
                  f"- End to end = every node completed window k (its scheduled publish time) -> the result is "
                  f"ready (after inference, just before it is stored and published). Node stamps are virtual: "
                  f"the aggregator keys windows on a {self.window_s:g} s grid, so window k is stamped "
                  f"k x {self.window_s:g} s after the first and the aggregator's latency_ms.end_to_end is converted "
                  f"back to the publish schedule.",
                  "- publish lag: the load generator behind its schedule; transport: publisher -> Mosquitto -> "
                  "first message of the window processed (broker and socket backlog included); assembly: first "
                  "message -> window closed; queue: closed -> inference started; delivery: result ready -> "
                  "received by a subscriber on this box. Medians over the step.",
                  "- Saturated = a window dropped, lost or left partial; e2e growing through the step (median of "
                  f"the last third - first third) by more than max({GROWTH_MIN_MS:g} ms, {GROWTH_PERIODS:g} window "
                  "period) (a backlog of at least a window); results below "
                  f"{ACHIEVED_FRACTION:.0%} of the offered rate; the backend busy {BUSY_SATURATED:.0%} of the "
                  f"step or more; or the publisher below {GENERATOR_FRACTION:.0%} of its schedule. Bottleneck = "
                  "the stage (load generator / ingest = transport + assembly / inference = queue + inference) "
                  "whose median over the step's last third grew most against the N's first step; without "
                  "growth, the kind of loss decides (queue overflow or a busy backend: inference; partial windows, "
                  "late messages or unprocessed messages: ingest).",
                  "- Publisher, Mosquitto and aggregator share this machine's cores: every figure includes that "
                  "contention. CPU columns are cores averaged over the whole step (pre-stamping and drain "
                  "included): the aggregator process (ONNX Runtime's threads included), its MQTT ingest thread "
                  "and its inference worker thread. p99 over a few dozen windows is close to the maximum."]
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        """Everything in the report as JSON (NaN written as null)."""
        data = {"machine": self.machine, "backend": self.backend, "codec": self.codec,
                "model": {**dataclasses.asdict(self.model), "manifest": str(self.model.manifest)},
                "windows_per_step": self.windows_per_step, "max_seconds_per_step": self.max_seconds_per_step,
                "window_s": self.window_s, "elapsed_s": self.elapsed_s, "load_before": self.load_before,
                "load_after": self.load_after,
                "aggregator_settings": self.aggregator_settings,
                "sweeps": [{**dataclasses.asdict(s), "sustained_rate": s.sustained_rate,
                            "saturated_rate": None if s.saturated_step is None else s.saturated_step.offered_rate,
                            "bottleneck": None if s.saturated_step is None else s.saturated_step.bottleneck,
                            "verdict": s.verdict()} for s in self.sweeps]}
        return json.dumps(_nan_to_none(data), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LatencyReport:
        """The report ``to_json`` wrote (to re-plot or re-render without re-running)."""
        data = json.loads(text)
        model = ModelInfo(**{**data["model"], "manifest": Path(data["model"]["manifest"])})
        step_fields = {f.name for f in dataclasses.fields(StepResult)}
        sweep_fields = {f.name for f in dataclasses.fields(NodeSweep)} - {"steps"}
        sweeps = [NodeSweep(**{k: v for k, v in sweep.items() if k in sweep_fields},
                            steps=[StepResult(**{k: _none_to_nan(v) for k, v in step.items() if k in step_fields})
                                   for step in sweep["steps"]]) for sweep in data["sweeps"]]
        before, after = data.get("load_before"), data.get("load_after")
        return cls(data["machine"], data["backend"], model, data["codec"], data["windows_per_step"],
                   data["max_seconds_per_step"], data["window_s"], sweeps, data["elapsed_s"],
                   data.get("aggregator_settings", {}), None if before is None else tuple(before),
                   None if after is None else tuple(after))

    def plot(self, path: str | Path) -> Path:
        """Left: p50 (solid) and p99 (dashed) end-to-end latency vs offered rate, one colour per N, log
        axes, saturated steps circled. Right: results/s vs offered windows/s against the ideal line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, (ax, ax_rate) = plt.subplots(1, 2, figsize=(12, 5.4))
        for i, sweep in enumerate(self.sweeps):
            colour = f"C{i}"
            steps = [s for s in sweep.steps if s.results and math.isfinite(s.p50_ms)]
            if not steps:
                continue
            rates = [s.offered_rate for s in steps]
            ax.plot(rates, [max(s.p50_ms, 1e-3) for s in steps], "o-", color=colour, label=f"N={sweep.nodes} p50")
            ax.plot(rates, [max(s.p99_ms, 1e-3) for s in steps], "x--", color=colour, alpha=0.7,
                    label=f"N={sweep.nodes} p99")
            ax_rate.plot(rates, [s.achieved_rate for s in steps], "o-", color=colour, label=f"N={sweep.nodes}")
            limit = sweep.saturated_step
            if limit is not None and limit in steps:
                for axis, value in ((ax, max(limit.p50_ms, 1e-3)), (ax_rate, limit.achieved_rate)):
                    axis.plot([limit.offered_rate], [value], "o", ms=14, mfc="none", mec=colour, mew=2)
                ax.annotate(f"N={sweep.nodes}: {limit.bottleneck}", (limit.offered_rate, max(limit.p50_ms, 1e-3)),
                            xytext=(6, -12), textcoords="offset points", fontsize=8, color=colour)
        all_rates = [s.offered_rate for sw in self.sweeps for s in sw.steps]
        if all_rates:
            span = [min(all_rates), max(all_rates)]
            ax_rate.plot(span, span, ":", color="grey", label="results = offered")
        plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
        for axis in (ax, ax_rate):
            axis.set_xscale("log")
            axis.set_yscale("log")
            for which in (axis.xaxis, axis.yaxis):
                which.set_major_formatter(plain)
                which.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axis.set_xlabel("offered windows/s (all nodes)")
            axis.grid(True, which="both", alpha=0.3)
        ax.set_ylabel("end-to-end latency ms")
        ax.set_title("latency (circle: first saturated step)", fontsize=10)
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
        ax_rate.set_ylabel("results/s")
        ax_rate.set_title("throughput", fontsize=10)
        ax_rate.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.14))
        fig.suptitle(f"spar-bench latency · {self.model.kind} model · {self.backend}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def _max_batch(self) -> int:
        return self.sweeps[0].max_batch if self.sweeps else 1


def summary_line(report: LatencyReport) -> str:
    """E.g. ``latency: N=8 sustains 100 w/s, saturates at 200 (ingest); ...``."""
    parts = []
    for sweep in report.sweeps:
        step, sustained = sweep.saturated_step, sweep.sustained_rate
        first = next((s for s in sweep.steps if s.results), None)
        base = f"p50 {first.p50_ms:.0f} ms at {first.offered_rate:g} w/s" if first else "no results"
        if not sweep.steps:
            parts.append(f"N={sweep.nodes}: {sweep.verdict()}")
        elif step is None:
            parts.append(f"N={sweep.nodes}: not saturated up to "
                         f"{max(s.offered_rate for s in sweep.steps):g} w/s ({base})")
        else:
            parts.append(f"N={sweep.nodes}: sustains {'–' if sustained is None else f'{sustained:g}'} w/s, saturates "
                         f"at {step.offered_rate:g} ({step.bottleneck}; {base})")
    return "latency: " + "; ".join(parts)


# =========================================================================== classification
@dataclass(frozen=True)
class Diagnosis:
    saturated: bool
    reasons: tuple[str, ...]
    bottleneck: str | None  # "inference" | "ingest" | "load generator" | None when not saturated
    evidence: str


def classify_step(step: StepResult, baseline: StepResult | None = None) -> Diagnosis:
    """Is ``step`` saturated, why, and which stage limits it.

    ``baseline``: an unsaturated step of the same N (its first), against which stage growth is
    measured; None (the N's first step is already saturated) compares with the step's own first third.
    """
    reasons = []
    if step.generator_rate < GENERATOR_FRACTION * step.offered_rate:
        reasons.append(f"publisher reached {step.generator_rate:.1f} w/s")
    if step.dropped:
        reasons.append(f"{step.dropped} dropped")
    if step.lost:
        reasons.append(f"{step.lost} lost")
    if step.partial:
        reasons.append(f"{step.partial} partial")
    if not step.achieved_rate >= ACHIEVED_FRACTION * step.offered_rate:  # NaN (under two results) counts
        reasons.append(f"results {step.achieved_rate:.1f} w/s")
    if _backlog(step):
        reasons.append(f"e2e grew {step.growth_ms:.0f} ms")
    if step.inference_busy >= BUSY_SATURATED:
        reasons.append(f"backend busy {100 * step.inference_busy:.0f} %")
    if not reasons:
        return Diagnosis(False, (), None, "")
    # Where the added latency sits by the end of the step: the last third's stage medians against
    # the N's first (unsaturated) step; a backlog shows there before it moves the step's medians.
    before = baseline.stage_ms if baseline is not None else step.head_stage_ms or dict.fromkeys(step.stage_ms, 0.0)
    now = step.tail_stage_ms or step.stage_ms
    growth = {name: _nan0(now[name]) - _nan0(before[name]) for name in step.stage_ms}
    stage, grown = max(growth.items(), key=lambda item: item[1])
    stages = ", ".join(f"{name} {round(value):+d} ms" for name, value in growth.items())
    busy = f"backend busy {100 * step.inference_busy:.0f} %, aggregator process {step.aggregator_cpu:.2f} cores"
    if grown >= STAGE_GROWTH_MIN_MS:
        against = "the first step" if baseline is not None else "its first third"
        evidence = f"stage medians of the step's last third vs {against}: {stages}; {busy}"
        return Diagnosis(True, tuple(reasons), stage, evidence)
    # No stage grew: name the limit from the kind of loss.
    if step.generator_rate < GENERATOR_FRACTION * step.offered_rate and not step.dropped:
        stage = "load generator"
    elif step.dropped or step.inference_busy >= BUSY_SATURATED:
        stage = "inference"
    elif step.partial or step.late_messages or step.ingest_lag_messages > step.messages / max(step.windows, 1):
        stage = "ingest"
    else:
        stage = "inference" if step.inference_busy >= 0.5 else "ingest"
    evidence = (f"no stage grew by {STAGE_GROWTH_MIN_MS:g} ms ({stages}); {busy}; {step.late_messages} late "
                f"messages; {step.ingest_lag_messages} messages unprocessed when publishing ended")
    return Diagnosis(True, tuple(reasons), stage, evidence)


def _backlog(step: StepResult) -> bool:
    if len(step.e2e_ms) < GROWTH_MIN_WINDOWS or not math.isfinite(step.growth_ms):
        return False
    return step.growth_ms > max(GROWTH_MIN_MS, GROWTH_PERIODS * 1e3 / step.offered_rate)


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
            "tiny" (benchmarks.tiny_onnx_model); the student falls back to tiny when it cannot be built.
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
    base_layout = _load_layout(base_site)
    progress("model")
    info = ensure_model(base_site, workdir / "models", max_nodes=max(64, max(node_counts)), kind=model, seed=seed,
                        progress=progress)
    window_s = _window_s(base_layout)
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
    return LatencyReport(describe_machine(_versions()), backend_text, info, codec, windows_per_step,
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
        with _Publisher(broker, site, codec, seed) as publisher:
            try:
                aggregator.start()
            except AggregatorError as exc:
                raise BenchError(f"aggregator for {n} nodes did not start: {exc}") from None
            with _ResultCollector(broker, layout.site_id) as collector:
                _steps(sweep, _Probe(aggregator, collector), publisher, rates, deadline=deadline,
                       windows_per_step=windows_per_step, min_windows=min_windows, max_seconds=max_seconds,
                       window_ns=aggregator.worker.window_ns, progress=progress)
    finally:
        aggregator.stop()
    return sweep, backend_text, settings


def _steps(sweep: NodeSweep, probe: _Probe, publisher: _Publisher, rates: Sequence[float], *, deadline: float,
           windows_per_step: int, min_windows: int, max_seconds: float, window_ns: int,
           progress: Callable[[str], None]) -> None:
    """Run the rate steps of one N into ``sweep`` until one saturates or the deadline would pass."""
    n, per_window = sweep.nodes, sweep.messages_per_window
    # Warm-up (not recorded): first SQLite writes, first batches, MQTT buffers.
    _run_step(probe, publisher, rate=10.0, windows=3, first_index=0, window_ns=window_ns, nodes=n,
              messages_per_window=per_window)
    index = 3 + 2  # two empty grid slots between steps: a straggler can never join the next step's window
    for rate in rates:
        windows = step_windows(rate, windows_per_step, min_windows, max_seconds)
        if time.monotonic() + START_LEAD_S + windows / rate + 2 * SETTLE_S > deadline:
            sweep.note = f"time budget ran out before {rate:g} windows/s"
            progress(f"N={n}: {sweep.note}")
            return
        time.sleep(SETTLE_S)
        step = _run_step(probe, publisher, rate=rate, windows=windows, first_index=index, window_ns=window_ns,
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


# =========================================================================== one step
@dataclass
class _Snapshot:
    accepted: int
    late: int
    results: int
    failed: int
    dropped: int
    received: int
    cpu_s: float
    thread_cpu_s: dict[str, float | None]


class _Probe:
    """Reads the aggregator's counters and CPU clocks (the aggregator runs in this process)."""

    def __init__(self, aggregator: Any, collector: _ResultCollector):
        self.aggregator = aggregator
        self.collector = collector
        # Decoding and assembly run in the "ingest" thread; paho's network thread only queues messages.
        self.threads = {"ingest": "ingest", "inference": "inference"}

    def snapshot(self) -> _Snapshot:
        agg = self.aggregator
        processor = agg.processor.snapshot_counts()
        worker = agg.worker.snapshot_counts()
        dropped = sum(value for _, labels, value in agg.metrics.overload.samples() if dict(labels).get("item")
                      == "window")
        return _Snapshot(processor.get("accepted", 0), int(_counter(agg.assembler.counts, "late")),
                         worker.get("results", 0), worker.get("windows_failed", 0), int(dropped),
                         len(self.collector.received), time.process_time(),
                         {key: _thread_cpu_s(name) for key, name in self.threads.items()})


def _run_step(probe: _Probe, publisher: _Publisher, *, rate: float, windows: int, first_index: int, window_ns: int,
              nodes: int, messages_per_window: int) -> StepResult:
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


def _drain(probe: _Probe, before: _Snapshot, windows: int) -> _Snapshot:
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


def _measure(published: _StepPublish, received: list[tuple[int, bytes]], before: _Snapshot, after: _Snapshot, *,
             rate: float, window_ns: int, nodes: int, messages_per_window: int, accepted_at_end: int,
             wall_s: float) -> StepResult:
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
        p50_ms=_pct(e2e, 50), p99_ms=_pct(e2e, 99), growth_ms=growth, publish_lag_ms=med(2), transport_ms=med(3),
        assembly_ms=med(4), queue_ms=med(5), inference_ms=med(6), delivery_ms=med(7),
        mean_batch=float(np.mean([r[8] for r in rows])) if rows else float("nan"),
        inference_busy=min(1.0, busy_s / span_s), offered_messages_per_s=rate * messages_per_window,
        accepted_messages_per_s=(after.accepted - before.accepted) / (span_s + 1 / rate),
        ingest_lag_messages=max(0, published.acked - accepted_at_end), late_messages=after.late - before.late,
        aggregator_cpu=(after.cpu_s - before.cpu_s) / wall_s, ingest_thread_cpu=threads.get("ingest"),
        inference_thread_cpu=threads.get("inference"), span_s=span_s, e2e_ms=[round(v, 3) for v in e2e],
        head_stage_ms=stages(rows[:third] if third >= 1 else rows),
        tail_stage_ms=stages(rows[-third:] if third >= 1 else rows))


# =========================================================================== publisher process
@dataclass
class _StepPublish:
    """What the publisher did in one step (wall-clock ns; one entry per window)."""

    stamps: list[int]
    scheduled_ns: list[int]
    started_ns: list[int]
    finished_ns: list[int]
    messages: int
    acked: int


class _Publisher:
    """A spawned process with one MQTT client per node, driven step by step over two queues."""

    def __init__(self, broker: LocalBroker, site: Path, codec: str, seed: int, ready_timeout_s: float = 120.0):
        ctx = multiprocessing.get_context("spawn")
        self._commands: Any = ctx.Queue()
        self._replies: Any = ctx.Queue()
        self._process = ctx.Process(target=_publisher_main, daemon=True, name="latency-publisher",
                                    args=(broker.host, broker.port, str(site), codec, seed, self._commands,
                                          self._replies))
        self._ready_timeout_s = ready_timeout_s

    def __enter__(self) -> _Publisher:
        self._process.start()
        self._expect("ready", self._ready_timeout_s)
        return self

    def step(self, first_index: int, windows: int, rate: float) -> _StepPublish:
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
        window_ns = int(round(_window_s(layout) * 1e9))
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
                  base_ns: int | None = None) -> _StepPublish:
    """Re-stamp the templates for windows first_index.. (grid stamps, next sequence numbers from ``seq``,
    which is advanced), then publish window j of every node at t0 + j / rate and wait for the broker's
    acknowledgements."""
    from spar_wire.message import encode_message
    from spar_wire.topics import data_topic

    window_ns = int(round(_window_s(layout) * 1e9))
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
    return _StepPublish(stamps, scheduled, started, finished, len(infos), sum(info.is_published() for info in infos))


# =========================================================================== results subscriber
class _ResultCollector:
    """Subscribes to the site's results topic; keeps (receipt wall ns, payload) in arrival order."""

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

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        from spar_wire.topics import aggregator_topic

        client.subscribe(aggregator_topic(self.site_id, "results"), qos=1)

    def __enter__(self) -> _ResultCollector:
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


# =========================================================================== sites and model
def synthetic_site(base: str | Path, n_nodes: int, out_dir: str | Path, seed: int = 0) -> Path:
    """Write ``parking_lot_n{N}.toml``: the base site's modalities and feature configs, ``n_nodes`` nodes
    (ids n001..) on a jittered grid over a lot of the base lot's aspect ratio whose area grows with N
    (the base lot's extent at the base node count). Returns the path; BenchError if it does not load
    back with the base site's feature hashes."""
    base = Path(base)
    layout = _load_layout(base)
    raw = read_toml(base, "bad_layout")
    if n_nodes < 1:
        raise BenchError(f"a site needs at least one node, got {n_nodes}")
    extent = np.ptp(layout.positions()[:, :2], axis=0)
    width, height = (float(v) if v > 0 else 30.0 for v in extent)
    scale = math.sqrt(n_nodes / len(layout.nodes))
    width, height = width * scale, height * scale
    cols = max(1, math.ceil(math.sqrt(n_nodes * width / height)))
    rows = math.ceil(n_nodes / cols)
    dx, dy = width / max(cols - 1, 1), height / max(rows - 1, 1)
    rng = np.random.default_rng(seed + n_nodes)
    modalities = list(layout.modalities)
    site_id = f"{layout.site_id}_n{n_nodes}"[:64]
    lines = [f"# Synthetic {n_nodes}-node variant of {base.name} for spar-bench latency (generated).",
             "[site]", f"id = {json.dumps(site_id)}", f"frame = {json.dumps(layout.frame)}",
             f"description = {json.dumps(f'{width:.0f} m x {height:.0f} m lot, {n_nodes} nodes on a jittered grid')}",
             ""]
    for name, table in raw["modalities"].items():
        lines.append(f"[modalities.{name}]")
        lines += [f"{key} = {_toml_value(value, f'modalities.{name}.{key}')}" for key, value in table.items()]
        lines.append("")
    for i in range(n_nodes):
        r, c = divmod(i, cols)
        x = c * dx + rng.uniform(-0.25, 0.25) * dx
        y = r * dy + rng.uniform(-0.25, 0.25) * dy
        lines += ["[[nodes]]", f'id = "n{i + 1:03d}"', f"position = [{x:.2f}, {y:.2f}]",
                  f"modalities = {json.dumps(modalities)}", ""]
    out = Path(out_dir) / f"{site_id}.toml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    made = _load_layout(out)
    if made.feature_hashes() != layout.feature_hashes():
        raise BenchError(f"{out}: feature hashes {made.feature_hashes()} differ from {base}'s "
                         f"{layout.feature_hashes()}")
    return out


def ensure_model(base_site: str | Path, out_dir: str | Path, *, max_nodes: int = 64, kind: str = "student",
                 seed: int = 0, progress: Callable[[str], None] = lambda text: None) -> ModelInfo:
    """The model every N runs: ``model.onnx`` + ``manifest.json`` under ``out_dir``, node range 1..max_nodes.

    "student": random weights in the architecture of the shipped student (``export.distill``'s
    DEFAULT_STUDENT over SparConfig defaults; classify + localize heads), exported with a dynamic node
    axis in a separate process (torch stays out of the aggregator's process) and cached under a key of
    its settings and the model code's source; falls back to "tiny" when it cannot be built.
    """
    from export.errors import ExportError  # export/errors.py alone: no torch here

    if kind not in MODEL_KINDS:
        raise BenchError(f"model must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    out_dir = Path(out_dir)
    layout = _load_layout(base_site)
    note = ""
    if kind == "student":
        key = _model_key(layout, max_nodes, seed)
        target = out_dir / f"student-{max_nodes}-{key}"
        info_path = target / "info.json"
        if info_path.exists() and (target / "manifest.json").exists() and (target / "model.onnx").exists():
            info = json.loads(info_path.read_text())
            return ModelInfo(target / "manifest.json", "student", info["description"], info["parameters"], True)
        progress("exporting a random-weight student (torch, in a separate process)")
        try:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                info = pool.submit(_export_student, str(base_site), str(target), max_nodes, seed).result(timeout=900)
        except (ExportError, ImportError, RuntimeError, ValueError, OSError, concurrent.futures.TimeoutError,
                concurrent.futures.process.BrokenProcessPool) as exc:
            note = f"student export failed ({type(exc).__name__}: {exc}); tiny fallback"
            progress(note)
        else:
            info_path.write_text(json.dumps(info, indent=2) + "\n")
            return ModelInfo(target / "manifest.json", "student", info["description"], info["parameters"], False)
    from benchmarks.tiny_onnx_model import build_tiny_model

    target = out_dir / f"tiny-{max_nodes}"
    manifest = build_tiny_model(layout, target, seed=seed, max_nodes=max_nodes)
    return ModelInfo(target / "manifest.json", "tiny", f"tiny test model {manifest.name} (random weights), node range "
                     f"1..{max_nodes}", None, False, note)


def _export_student(base_site: str, out_dir: str, max_nodes: int, seed: int) -> dict[str, Any]:
    """Child process: build, export and check the random-weight student; returns its description."""
    import torch

    from export.distill import DEFAULT_STUDENT, build_student
    from export.manifests import manifest_for, manifest_path_for
    from export.onnx_export import export_onnx
    from node_firmware_sim.scenarios import make_scenario
    from train.models.config import ModalitySpec as TokenSpec
    from train.models.config import SparConfig

    layout = load_site_layout(base_site)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    specs = tuple(TokenSpec(name, spec.features.n_tokens, spec.features.token_dim)
                  for name, spec in layout.modalities.items())
    cfg = SparConfig(modalities=specs, max_nodes=max_nodes, position_dims=layout.position_dim, **DEFAULT_STUDENT)
    class_names = make_scenario("parking_lot", layout, seed).class_names
    model = build_student(cfg, ["classify", "localize"], len(class_names), layout.position_dim, {})
    # Token statistics of dB spectrogram tokens (their values change no compute, only the numbers).
    model.encoder.set_token_statistics({name: (-60.0, 12.0) for name in layout.modalities})
    onnx_path = export_onnx(model.eval(), Path(out_dir) / "model.onnx", check_nodes=(1, 8, max_nodes))
    manifest = manifest_for(model, {"feature_hashes": layout.feature_hashes(), "class_names": list(class_names)},
                            onnx_path, name="spar-latency-student", version=f"random-{seed}",
                            node_range=(1, max_nodes))
    manifest.write(manifest_path_for(onnx_path))
    parameters = sum(p.numel() for p in model.parameters())
    shape = ", ".join(f"{k} {v}" for k, v in DEFAULT_STUDENT.items())
    return {"parameters": parameters,
            "description": f"random-weight student of the shipped architecture ({shape}; node table {max_nodes}; "
                           f"classify + localize heads; {parameters:,} parameters), ONNX with a dynamic node axis"}


def _model_key(layout: SiteLayout, max_nodes: int, seed: int) -> str:
    digest = hashlib.sha256(json.dumps({"max_nodes": max_nodes, "seed": seed, "hashes": layout.feature_hashes(),
                                        "position_dim": layout.position_dim}, sort_keys=True).encode())
    for module in _MODEL_SOURCES:
        spec = importlib.util.find_spec(module)
        origin = Path(spec.origin) if spec and spec.origin else None
        files = sorted(origin.parent.glob("*.py")) if origin and origin.name == "__init__.py" else [origin]
        for path in files:
            if path is not None and path.exists():
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


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


def _load_layout(path: str | Path) -> SiteLayout:
    try:
        return load_site_layout(path)
    except WireError as exc:
        raise BenchError(str(exc)) from None


def _window_s(layout: SiteLayout) -> float:
    lengths = {spec.features.window_s for spec in layout.modalities.values()}
    if len(lengths) != 1:
        raise BenchError(f"{layout.source}: modalities have different window lengths {sorted(lengths)}")
    return lengths.pop()


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    raise BenchError(f"{where}: cannot copy a {type(value).__name__} into the synthetic site")


def _backend_text(backend: Any) -> str:
    describe = getattr(backend, "device_description", None)
    return f"{getattr(backend, 'name', '?')} on {describe()}" if describe else getattr(backend, "name", "?")


def _load_text(load: tuple[float, float, float] | None) -> str:
    return "unknown" if load is None else " / ".join(f"{v:.2f}" for v in load)


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items()) or "defaults"


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _nan0(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _f(value: float | None, digits: int) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def _none_to_nan(value: Any) -> Any:
    """Inverse of _nan_to_none for StepResult fields: null floats come back as NaN (the CPU fields may
    legitimately be None, but NaN formats the same way)."""
    return float("nan") if value is None else value


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


# =========================================================================== command line
def add_latency_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``latency`` on an argparse subparsers object (``parser.add_subparsers()``)."""
    p = sub.add_parser("latency", help="end-to-end latency vs node count and window rate, up to saturation",
                       description="For each node count, run the aggregator (random-weight student model) fed by "
                       "simulated nodes through a loopback Mosquitto at rising window rates until it saturates; "
                       "report p50/p99 end-to-end latency, where the time goes, and what saturates first. Writes "
                       "latency.md, latency.json and latency.png. About 3 minutes with the defaults.")
    p.add_argument("--nodes", default=",".join(map(str, DEFAULT_NODES)),
                   help="comma-separated node counts (default: %(default)s)")
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in DEFAULT_RATES),
                   help="comma-separated offered windows/s, swept upwards (default: %(default)s)")
    p.add_argument("--windows-per-step", type=int, default=40, help="most windows per step (default: %(default)s)")
    p.add_argument("--max-seconds-per-step", type=float, default=4.0,
                   help="a step sends about this many seconds of windows (default: %(default)s)")
    p.add_argument("--budget", type=float, default=240.0, help="time budget in seconds (default: %(default)s)")
    p.add_argument("--site", type=Path, default=DEFAULT_SITE, help="base site layout (default: %(default)s)")
    p.add_argument("--codec", default="png", help="codec of the token messages (default: %(default)s)")
    p.add_argument("--backend", default="auto", help="auto | onnxruntime | tensorrt (default: auto)")
    p.add_argument("--model", default="student", choices=MODEL_KINDS,
                   help="student: random weights, shipped student architecture; tiny: the test model")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="where latency.md/.json/.png go (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=Path("benchmarks/.work/latency"),
                   help="cached model, sites, databases (default: %(default)s)")
    p.set_defaults(func=_cmd_latency)
    return p


def _cmd_latency(args: argparse.Namespace) -> int:
    report = run_latency_benchmark(
        _parse_list(args.nodes, int, "--nodes"), _parse_list(args.rates, float, "--rates"),
        windows_per_step=args.windows_per_step, max_seconds_per_step=args.max_seconds_per_step,
        budget_s=args.budget, workdir=args.workdir, base_site=args.site, backend=args.backend, codec=args.codec,
        model=args.model, progress=lambda text: print(f"... {text}", file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency.md").write_text(report.to_markdown())
    (args.out / "latency.json").write_text(report.to_json())
    report.plot(args.out / "latency.png")
    print(report.to_markdown())
    print(summary_line(report))
    print(f"report: {args.out / 'latency.md'}, plot: {args.out / 'latency.png'}")
    return 0


def _parse_list(text: str, kind: type, flag: str) -> list[Any]:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise BenchError(f"{flag}: give at least one value")
    return values
