"""The report of ``spar-bench latency``: markdown, JSON (and back), the plot, and the one-line summary.

Rendering only: the figures come from the sweep (``latency_bench``) as :class:`LatencyReport`;
the saturation thresholds quoted in "How to read it" are the ones ``latency_classify`` applies.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.latency_classify import (
    ACHIEVED_FRACTION,
    BUSY_SATURATED,
    GENERATOR_FRACTION,
    GROWTH_MIN_MS,
    GROWTH_PERIODS,
)
from benchmarks.latency_results import NodeSweep, StepResult
from benchmarks.load_sites import ModelInfo


@dataclass
class LatencyReport:
    """A whole latency run: where it ran, with what, and one NodeSweep per node count."""

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
        """``latency.md``: where each N saturates, every step, and how to read the columns."""
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


def _load_text(load: tuple[float, float, float] | None) -> str:
    """A load average as "1-min / 5-min / 15-min" ("unknown" where the OS has none)."""
    return "unknown" if load is None else " / ".join(f"{v:.2f}" for v in load)


def _settings_text(settings: dict[str, Any]) -> str:
    """The aggregator settings that shape latency, as "name value, ..."."""
    return ", ".join(f"{k} {v}" for k, v in settings.items()) or "defaults"


def _f(value: float | None, digits: int) -> str:
    """A table cell: the number with ``digits`` decimals, or a dash when it is unknown (None or NaN)."""
    return "–" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def _none_to_nan(value: Any) -> Any:
    """Inverse of _nan_to_none for StepResult fields: null floats come back as NaN (the CPU fields may
    legitimately be None, but NaN formats the same way)."""
    return float("nan") if value is None else value


def _nan_to_none(value: Any) -> Any:
    """``value`` with every non-finite float (nested in dicts and lists too) as None: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value

