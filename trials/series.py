"""A series of trials that differ in one setting (codec, link), scored against the first.

``spar-bench bandwidth`` and ``spar-bench lossy`` are such series. Every trial of a series uses the
same seed, so the nodes sample the same signals: differences in the task metric come from the
setting under test, not from different windows (a paired comparison).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from testbed.metric_loss import relative_loss
from trials.report import HEADLINE_METRICS, analyze_trial
from trials.report_files import write_report
from trials.trial import CONFIG_FILE, FIELD_FILE, TrialConfig, model_digest, run_trial

# Task metrics a series compares, and whether larger is better.
METRICS = {"classify/accuracy": True, "classify/macro_f1": True, "localize/mean_distance": False,
           "localize/median_distance": False, "detect/mAP@4": True, "quake/hypocentre_median": False}


@dataclass
class SeriesRow:
    name: str
    headline: dict[str, Any]  # TrialReport.headline()
    folder: Path

    def metric(self, name: str) -> float:
        return float(self.headline.get(f"metric/{name}", math.nan))


def run_series(base: TrialConfig, variants: list[tuple[str, dict[str, Any]]],
               progress: Callable[[str], None] = lambda text: None, *, reuse: bool = True) -> list[SeriesRow]:
    """One trial per (name, TrialConfig changes), in ``base.out / <name>``; returns their headlines.

    With ``reuse``, a finished trial already in its folder with the same configuration is read
    instead of run again, so an interrupted or extended series only runs what is missing.
    """
    rows = []
    for i, (name, changes) in enumerate(variants, 1):
        config = replace(base, out=Path(base.out) / _folder_name(name), overwrite=True, **changes)
        if reuse and _finished(config):
            report = analyze_trial(config.out)
            progress(f"[{i}/{len(variants)}] {name}: reused {config.out}")
        else:
            progress(f"[{i}/{len(variants)}] {name}")
            report = analyze_trial(run_trial(config).folder)
            write_report(report)
            progress(f"[{i}/{len(variants)}] {name}: {report.summary_line()}")
        rows.append(SeriesRow(name, report.headline(), Path(config.out)))
    return rows


def _finished(config: TrialConfig) -> bool:
    """A complete trial with exactly this configuration is in ``config.out``."""
    folder = Path(config.out)
    try:
        stored = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    wanted = {**config.to_dict(), "model_sha256": model_digest(config.model)}
    same = json.loads(json.dumps(wanted, default=str)) == stored
    return same and (folder / FIELD_FILE).exists() and (folder / "report.json").exists()


def compared_metrics(rows: list[SeriesRow]) -> list[str]:
    """The headline metrics (one per task) every row has a finite value for."""
    return [m for m in HEADLINE_METRICS if rows and all(math.isfinite(r.metric(m)) for r in rows)]


def worst_relative_loss(row: SeriesRow, reference: SeriesRow, metrics: list[str]) -> float:
    """The largest relative loss over ``metrics`` (the knee and the targets use the worst one)."""
    losses = [relative_loss(row.metric(m), reference.metric(m), METRICS[m]) for m in metrics]
    finite = [x for x in losses if math.isfinite(x)]
    return max(finite) if finite else math.nan


def _folder_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
