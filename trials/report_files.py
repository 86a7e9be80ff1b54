"""Everything ``spar-trial report`` leaves in a trial folder: the report's text files and its plots.

The report (``trials.report``) is data and text; the plots (``trials.plots``) read it. This module
joins them, so neither imports the other at run time.
"""

from __future__ import annotations

from pathlib import Path

from trials.plots import plot_site_map, plot_trial
from trials.report import TrialReport


def write_report(report: TrialReport) -> list[Path]:
    """report.md, report.json, trial.png and site_map.png in the trial folder; returns their paths."""
    paths = report.write_text_files()
    paths.append(plot_trial(report, report.folder / "trial.png"))
    paths.append(plot_site_map(report, report.folder / "site_map.png"))
    return paths
