"""``spar-bench bandwidth``: bytes on the wire vs task metric per codec (SPAR's Table 5, live).

One trial per codec through the real broker and aggregator on a perfect link, same seed for all:
bytes per window are the MQTT payloads the nodes sent, the metric is the shipped model's against
the simulator's truth. The reference is raw float32. The knee is the cheapest codec whose worst
relative metric loss is within ``tolerance`` (target: <= 5 % of float32's bytes at <= 1 % loss).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.cli_support import add_series_args, progress, series_base, write_report
from benchmarks.errors import BenchError
from spar_wire.codecs import CodecSpec
from spar_wire.errors import WireError
from testbed.machine import describe_machine
from testbed.report_format import percent
from trials.series import METRICS, SeriesRow, compared_metrics, run_series, worst_relative_loss
from trials.trial import TrialConfig, model_label

# Paper Table 5's codecs and qualities, plus lower qualities: on this data the metric is still flat
# at q50, and the knee is where it stops being flat.
DEFAULT_CODECS = ("raw32", "raw", "png", "webp:lossless", "webp:95", "webp:85", "webp:75", "webp:50", "webp:30",
                  "webp:15", "jpeg:95", "jpeg:85", "jpeg:75", "jpeg:50", "jpeg:30", "jpeg:15")
TARGET_BYTES = 0.05  # of float32
TARGET_LOSS = 0.01  # relative metric loss


@dataclass
class BandwidthReport:
    rows: list[SeriesRow]
    metrics: list[str]
    machine: str
    budget: str
    tolerance: float = TARGET_LOSS

    @property
    def reference(self) -> SeriesRow:
        return self.rows[0]

    def share(self, row: SeriesRow) -> float:
        return row.headline["bytes_per_window"] / self.reference.headline["bytes_per_window"]

    def knee(self) -> SeriesRow | None:
        """The cheapest codec within tolerance of the reference, None if none is."""
        ok = [r for r in self.rows if worst_relative_loss(r, self.reference, self.metrics) <= self.tolerance]
        return min(ok, key=lambda r: r.headline["bytes_per_window"]) if ok else None

    def target_met(self) -> bool:
        knee = self.knee()
        return knee is not None and self.share(knee) <= TARGET_BYTES

    def to_markdown(self) -> str:
        knee = self.knee()
        lines = ["# Bandwidth vs task metric per codec (`spar-bench bandwidth`)", "", self.machine, "",
                 f"Budget: {self.budget}. Reference: {self.reference.name}. Relative loss: how much worse than the "
                 "reference (accuracy lower, distance larger), as a fraction of it.", "",
                 "| codec | bytes/window | % of float32 | " + " | ".join(self.metrics)
                 + " | worst rel. loss | token completeness |",
                 "|---|---:|---:|" + "---:|" * len(self.metrics) + "---:|---:|"]
        for r in self.rows:
            marks = " **(knee)**" if r is knee else ""
            lines.append(f"| {r.name}{marks} | {r.headline['bytes_per_window']:,.0f} | {percent(self.share(r))} | "
                         + " | ".join(f"{r.metric(m):.3f}" for m in self.metrics)
                         + f" | {percent(worst_relative_loss(r, self.reference, self.metrics), signed=True)} | "
                         f"{percent(r.headline['token_completeness'])} |")
        lines += ["", self.verdict(), "", "![bandwidth](bandwidth.png)", ""]
        return "\n".join(lines)

    def verdict(self) -> str:
        knee = self.knee()
        if knee is None:
            return (f"No codec stays within {100 * self.tolerance:g} % relative metric loss of "
                    f"{self.reference.name}: target (<= {100 * TARGET_BYTES:g} % of float32 bytes at <= "
                    f"{100 * self.tolerance:g} % loss) **not met**.")
        loss = worst_relative_loss(knee, self.reference, self.metrics)
        return (f"Knee: **{knee.name}** at {percent(self.share(knee))} of float32's bytes "
                f"({knee.headline['bytes_per_window']:,.0f} B/window), worst relative metric loss "
                f"{percent(loss, signed=True)}. Target (<= {100 * TARGET_BYTES:g} % "
                f"of float32 bytes at <= {100 * self.tolerance:g} % loss): "
                f"**{'met' if self.target_met() else 'not met'}**.")

    def to_json(self) -> str:
        return json.dumps({"machine": self.machine, "budget": self.budget, "reference": self.reference.name,
                           "knee": self.knee().name if self.knee() else None, "target_met": self.target_met(),
                           "rows": [{"codec": r.name, "share_of_float32": self.share(r),
                                     "worst_relative_loss": worst_relative_loss(r, self.reference, self.metrics),
                                     **r.headline} for r in self.rows]}, indent=2, default=str) + "\n"

    def plot(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(self.metrics), figsize=(5.5 * len(self.metrics), 4.5), squeeze=False)
        knee = self.knee()
        for ax, metric in zip(axes[0], self.metrics, strict=True):
            for r in self.rows:
                x, y = r.headline["bytes_per_window"], r.metric(metric)
                family = r.name.split("-")[0]
                ax.scatter(x, y, s=60 if r is knee else 25, marker="*" if r is knee else "o",
                           color={"jpeg": "tab:orange", "webp": "tab:blue", "png": "tab:green"}.get(family, "tab:gray"),
                           zorder=3)
                ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
            ref = self.reference.metric(metric)
            band = ref * (1 - self.tolerance) if METRICS[metric] else ref * (1 + self.tolerance)
            ax.axhline(ref, color="black", linewidth=0.8, label=f"{self.reference.name}")
            ax.axhline(band, color="black", linestyle=":", linewidth=0.8, label=f"{100 * self.tolerance:g} % loss")
            ax.axvline(TARGET_BYTES * self.reference.headline["bytes_per_window"], color="tab:red", linestyle="--",
                       linewidth=0.8, label=f"{100 * TARGET_BYTES:g} % of float32")
            ax.set(xscale="log", xlabel="bytes per window on the wire", ylabel=metric, title=metric)
            ax.legend(fontsize=7)
        fig.suptitle(self.verdict().replace("**", ""), fontsize=8, wrap=True)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def run_bandwidth(base: TrialConfig, codecs: tuple[str, ...] = DEFAULT_CODECS, *, tolerance: float = TARGET_LOSS,
                  progress: Callable[[str], None] = lambda text: None, reuse: bool = True) -> BandwidthReport:
    """One trial per codec (the first is the reference); ``base`` sets everything else."""
    if len(codecs) < 2:
        raise BenchError("give at least two codecs: the first is the reference")
    try:
        labels = [CodecSpec.parse(c).label for c in codecs]
    except WireError as exc:
        raise BenchError(f"codec: {exc}") from None
    # A perfect link has no timing effects: the deadline stays at its real-time length.
    rows = run_series(base, [(label, {"codec": codec, "scale_deadline": False})
                             for label, codec in zip(labels, codecs, strict=True)], progress, reuse=reuse)
    metrics = compared_metrics(rows)
    if not metrics:
        raise BenchError("the model's outputs give no metric against this scenario's truth")
    windows = rows[0].headline["windows_sampled"]
    budget = (f"{windows} windows of {base.scenario} per codec, seed {base.seed}, perfect link, timeline "
              f"{base.speed:g}x, model {model_label(base.model)}")
    return BandwidthReport(rows, metrics, describe_machine(), budget, tolerance)



# --------------------------------------------------------------------------- command line
def register(subparsers: Any) -> None:
    """Add ``spar-bench bandwidth`` to ``subparsers`` (``parser.add_subparsers()``)."""
    bw = subparsers.add_parser(
        "bandwidth", help="bytes on the wire vs task metric per codec (paper Table 5, live)",
        description="One trial per codec through a private broker and the real aggregator running "
        "the shipped model on a perfect link, same seed for all: bytes per window on the wire, "
        "share of float32, task metric against the simulator's truth, and the knee (cheapest codec "
        "within --tolerance of float32). Writes bandwidth.md/.json/.png. About 4 min with defaults.")
    bw.add_argument("--codecs", default=",".join(DEFAULT_CODECS),
                    help="comma-separated codecs, the first is the reference (default: %(default)s)")
    bw.add_argument("--tolerance", type=float, default=0.01,
                    help="relative metric loss the knee may have (default: %(default)s)")
    add_series_args(bw, "bandwidth", speed=10.0, codec=None)
    bw.set_defaults(func=_cmd_bandwidth)


def _cmd_bandwidth(args: argparse.Namespace) -> int:
    codecs = tuple(c.strip() for c in args.codecs.split(",") if c.strip())
    report = run_bandwidth(series_base(args), codecs, tolerance=args.tolerance, reuse=not args.fresh,
                           progress=progress)
    write_report(report, args.out, "bandwidth")
    return 0

