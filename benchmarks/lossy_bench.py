"""``spar-bench lossy``: window completeness and task metric under lossy links (SPAR's Table 6, live).

One trial per link condition through the real broker and aggregator, same seed for all: independent
loss 0/5/10/20/40 %, Gilbert-Elliott burst loss, random node outages (the outage buffer replays
late) and delay jitter beyond the aggregator's deadline. Loss-only conditions do not depend on
timing and run on a strongly compressed timeline; outages and jitter run closer to real time,
since what they do depends on arrival times against the deadline. Target: 20 % message loss costs
<= 5 % relative metric.

Then the window-close policies side by side (issue 20): two real-time trials on the field-like link
of ``configs/links/lossy.toml`` (20 % loss, 40 +- 15 ms, 2 % held back 150 ms, 1 % duplicated), same
seed, one with early close (a window closes once every missing message is lost or overdue by its
learned arrival lag) and one deadline-only: end-to-end latency p50/p99 against the targets (150 /
400 ms), and the messages the stored windows hold (early close may cost at most 1 % of them).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.cli_support import add_series_args, progress, series_base, write_report
from node_firmware_sim.link_model import BurstLoss, LinkConfig, load_link_config
from testbed.machine import describe_machine
from testbed.report_format import percent
from trials.series import SeriesRow, compared_metrics, run_series, worst_relative_loss
from trials.trial import TrialConfig, model_label

TARGET_LOSS = 0.20
TARGET_RELATIVE = 0.05
FIELD_LINK = Path(__file__).resolve().parents[1] / "configs" / "links" / "lossy.toml"
TARGET_P50_MS, TARGET_P99_MS = 150.0, 400.0  # window end -> result stored, on FIELD_LINK
TARGET_MESSAGES_KEPT = 0.99  # early close keeps >= 99 % of the messages deadline-only stores


@dataclass(frozen=True)
class Condition:
    name: str
    link: LinkConfig
    timing: bool = False  # runs at the slower timing speed
    independent_loss: float | None = None  # for the loss curve

    def describe(self) -> str:
        c = self.link
        parts = []
        if c.loss:
            parts.append(f"{100 * c.loss:g} % independent loss")
        if c.burst:
            parts.append(f"burst loss (mean {100 * c.burst.mean_loss:.0f} %, bursts of "
                         f"{1 / c.burst.p_bad_to_good:.1f} msgs)")
        if c.outage_rate_per_hour:
            parts.append(f"outages {c.outage_rate_per_hour:g}/h/node of {c.outage_mean_s:g} s mean")
        if c.jitter_ms:
            parts.append(f"delay {c.delay_ms:g} ms ± {c.jitter_ms:g} ms")
        return ", ".join(parts) or "perfect link"


def default_conditions() -> list[Condition]:
    losses = [Condition(f"loss {round(100 * p)} %", LinkConfig(loss=p), independent_loss=p)
              for p in (0.0, 0.05, 0.10, 0.20, 0.40)]
    return [*losses,
            Condition("burst", LinkConfig(burst=BurstLoss(p_good_to_bad=0.05, p_bad_to_good=0.3, loss_bad=0.8))),
            # About 10 % downtime per node: 18 outages an hour of 20 s mean.
            Condition("node outages", LinkConfig(outage_rate_per_hour=18.0, outage_mean_s=20.0), timing=True),
            # The aggregator's deadline is 1 s after a window's first message: a 2 s jitter
            # (|N(400 ms, 2 s)|-ish) puts a good share of messages past it.
            Condition("jitter > deadline", LinkConfig(delay_ms=400.0, jitter_ms=1000.0), timing=True)]


@dataclass
class LossyReport:
    conditions: list[Condition]
    rows: list[SeriesRow]
    metrics: list[str]
    machine: str
    budget: str
    extra: dict[str, Any] = field(default_factory=dict)
    close_rows: list[SeriesRow] = field(default_factory=list)  # early close, deadline only (real time)
    close_budget: str = ""

    def row(self, name: str) -> SeriesRow | None:
        return next((r for r in self.rows if r.name == name), None)

    def target_row(self) -> SeriesRow | None:
        return next((r for c, r in zip(self.conditions, self.rows, strict=True)
                     if c.independent_loss is not None and math.isclose(c.independent_loss, TARGET_LOSS)), None)

    def verdict(self) -> str:
        row = self.target_row()
        if row is None:
            return "No 20 % loss condition in this run."
        loss = worst_relative_loss(row, self.rows[0], self.metrics)
        return (f"At {100 * TARGET_LOSS:g} % independent message loss the worst relative metric loss is "
                f"{percent(loss, signed=True)} (target <= {100 * TARGET_RELATIVE:g} %: "
                f"**{'met' if loss <= TARGET_RELATIVE else 'not met'}**).")

    def to_markdown(self) -> str:
        ref = self.rows[0]
        lines = ["# Task metric under lossy links (`spar-bench lossy`)", "", self.machine, "",
                 f"Budget: {self.budget}. Reference: {ref.name}. Completeness: windows with every node's every "
                 "modality; token completeness: frames in a stored window / frames the nodes made.", "",
                 "| condition | link | injected loss | observed loss | late | complete windows | token completeness | "
                 + " | ".join(self.metrics) + " | worst rel. loss |",
                 "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(self.metrics) + "---:|"]
        for c, r in zip(self.conditions, self.rows, strict=True):
            h = r.headline
            lines.append(f"| {r.name} | {c.describe()} | {percent(h['injected_loss'])} | "
                         f"{percent(h['observed_loss'])} | {h['late']} | {percent(h['completeness'], digits=0)} | "
                         f"{percent(h['token_completeness'])} | "
                         + " | ".join(f"{r.metric(m):.3f}" for m in self.metrics)
                         + f" | {percent(worst_relative_loss(r, ref, self.metrics), signed=True)} |")
        lines += ["", self.verdict(), "", "![lossy](lossy.png)", ""]
        return "\n".join(lines + self._close_section())

    def close_verdict(self) -> str:
        """Early close against its targets, or why there is nothing to say."""
        if len(self.close_rows) != 2:
            return "Window-close policies not compared in this run."
        early, deadline = (r.headline for r in self.close_rows)
        kept = early["token_completeness"] / deadline["token_completeness"] if deadline["token_completeness"] else 0
        checks = [f"p50 {early['latency_p50_ms']:.0f} ms (target <= {TARGET_P50_MS:.0f}: "
                  f"**{'met' if early['latency_p50_ms'] <= TARGET_P50_MS else 'not met'}**)",
                  f"p99 {early['latency_p99_ms']:.0f} ms (target <= {TARGET_P99_MS:.0f}: "
                  f"**{'met' if early['latency_p99_ms'] <= TARGET_P99_MS else 'not met'}**)",
                  f"messages kept {percent(kept)} of deadline-only's (target >= {100 * TARGET_MESSAGES_KEPT:.0f} %: "
                  f"**{'met' if kept >= TARGET_MESSAGES_KEPT else 'not met'}**)"]
        return "Early close: " + "; ".join(checks) + "."

    def _close_section(self) -> list[str]:
        if len(self.close_rows) != 2:
            return []
        lines = ["", "## Closing windows: early close vs deadline only", "", self.close_budget, "",
                 "| policy | windows stored | complete | closed early | token completeness | late | "
                 "end-to-end p50 | p99 | " + " | ".join(self.metrics) + " |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(self.metrics)]
        for row in self.close_rows:
            h = row.headline
            lines.append(f"| {row.name} | {h['windows_stored']} | {percent(h['completeness'], digits=0)} | "
                         f"{h.get('closed_early', 0)} | {percent(h['token_completeness'])} | {h['late']} | "
                         f"{h['latency_p50_ms']:.0f} ms | {h['latency_p99_ms']:.0f} ms | "
                         + " | ".join(f"{row.metric(m):.3f}" for m in self.metrics) + " |")
        return [*lines, "", self.close_verdict(), ""]

    def to_json(self) -> str:
        return json.dumps({"machine": self.machine, "budget": self.budget, "verdict": self.verdict(),
                           "close_budget": self.close_budget, "close_verdict": self.close_verdict(),
                           "close_rows": [{"policy": r.name, **r.headline} for r in self.close_rows],
                           "rows": [{"condition": r.name, "link": c.describe(),
                                     "worst_relative_loss": worst_relative_loss(r, self.rows[0], self.metrics),
                                     **r.headline} for c, r in zip(self.conditions, self.rows, strict=True)]},
                          indent=2, default=str) + "\n"

    def plot(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(self.metrics) + 1, figsize=(5 * (len(self.metrics) + 1), 4.2), squeeze=False)
        pairs = list(zip(self.conditions, self.rows, strict=True))
        curve = [(c, r) for c, r in pairs if c.independent_loss is not None]
        others = [(c, r) for c, r in pairs if c.independent_loss is None]
        panels = [("completeness", "complete windows")] + [(m, m) for m in self.metrics]
        for ax, (key, label) in zip(axes[0], panels, strict=True):
            def value(row: SeriesRow, key: str = key) -> float:
                return row.headline[key] if key == "completeness" else row.metric(key)
            ax.plot([100 * r.headline["observed_loss"] for _, r in curve], [value(r) for _, r in curve], "o-",
                    label="independent loss")
            for c, r in others:
                ax.scatter(100 * r.headline["observed_loss"], value(r), marker="s", zorder=3)
                ax.annotate(c.name, (100 * r.headline["observed_loss"], value(r)), textcoords="offset points",
                            xytext=(4, 3), fontsize=7)
            ax.set(xlabel="observed message loss (%)", ylabel=label, title=label)
            ax.legend(fontsize=7)
        fig.suptitle(self.verdict().replace("**", ""), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def run_lossy(base: TrialConfig, conditions: list[Condition] | None = None, *, timing_speed: float = 4.0,
              progress: Callable[[str], None] = lambda text: None, reuse: bool = True,
              close_duration_s: float = 0.0) -> LossyReport:
    """One trial per condition (the first is the reference); ``base.speed`` for the loss-only ones.
    With ``close_duration_s`` > 0, also the two real-time window-close trials of that length."""
    conditions = conditions or default_conditions()
    # Loss-only conditions keep the real-time deadline (1 s): compressed to tens of ms it would
    # measure this machine's load; outages and jitter compress it with their delays.
    variants = [(c.name, {"link_config": c.link, "link": None, "speed": timing_speed if c.timing else base.speed,
                          "scale_deadline": c.timing}) for c in conditions]
    rows = run_series(base, variants, progress, reuse=reuse)
    metrics = compared_metrics(rows)
    budget = (f"{rows[0].headline['windows_sampled']} windows of {base.scenario} per condition, seed {base.seed}, "
              f"codec {base.codec}, timeline {base.speed:g}x (outages and jitter {timing_speed:g}x), "
              f"model {model_label(base.model)}")
    report = LossyReport(conditions, rows, metrics, describe_machine(), budget)
    if close_duration_s > 0:
        link = load_link_config(FIELD_LINK)
        common = {"link_config": link, "link": None, "speed": 1.0, "scale_deadline": False,
                  "duration_s": close_duration_s}
        report.close_rows = run_series(base, [("early close", {**common, "early_close": True}),
                                              ("deadline only", {**common, "early_close": False})],
                                       progress, reuse=reuse)
        report.close_budget = (f"{close_duration_s:g} s of {base.scenario} in real time per policy, seed {base.seed}, "
                               f"codec {base.codec}, link {FIELD_LINK.name}, deadline "
                               f"{base.deadline_fraction:g} x window, model {model_label(base.model)}.")
    return report


# --------------------------------------------------------------------------- command line
def register(subparsers: Any) -> None:
    """Add ``spar-bench lossy`` to ``subparsers`` (``parser.add_subparsers()``)."""
    lo = subparsers.add_parser(
        "lossy", help="completeness and task metric under lossy links (paper Table 6, live)",
        description="One trial per link condition (independent loss 0/5/10/20/40 %%, burst loss, "
        "node outages, jitter beyond the deadline) through a private broker and the real "
        "aggregator, same seed for all: injected vs observed loss, late messages, window "
        "completeness and task metric; then early close vs deadline-only window closing in real time. "
        "Writes lossy.md/.json/.png. About 10 min with defaults.")
    lo.add_argument("--timing-speed", type=float, default=4.0,
                    help="timeline compression of the outage and jitter conditions (default: %(default)s)")
    lo.add_argument("--close-duration", type=float, default=120.0,
                    help="seconds of each of the two real-time trials comparing early close with deadline-only "
                    "window closing on configs/links/lossy.toml; 0 skips them (default: %(default)s)")
    add_series_args(lo, "lossy", speed=10.0, codec="webp:85")
    lo.set_defaults(func=_cmd_lossy)


def _cmd_lossy(args: argparse.Namespace) -> int:
    report = run_lossy(series_base(args, codec=args.codec), timing_speed=args.timing_speed, reuse=not args.fresh,
                       close_duration_s=args.close_duration, progress=progress)
    write_report(report, args.out, "lossy")
    return 0
