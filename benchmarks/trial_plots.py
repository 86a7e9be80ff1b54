"""The two figures of a trial report: a 2x2 overview and a site map (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from benchmarks.trial_report import TrialReport

MAX_MAP_WINDOWS = 200  # the site map shows the last this many estimates: more is a smear


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trial(report: TrialReport, path: Path) -> Path:
    """Bytes per node by modality; injected vs observed loss per node; latency histogram; completeness."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    nodes = sorted({r.node for r in report.traffic})
    modalities = sorted({r.modality for r in report.traffic})
    x = np.arange(len(nodes))

    ax = axes[0, 0]
    bottom = np.zeros(len(nodes))
    for modality in modalities:
        kb = np.array([sum(r.bytes for r in report.traffic if r.node == n and r.modality == modality) / 1e3
                       for n in nodes])
        ax.bar(x, kb, bottom=bottom, label=modality)
        bottom += kb
    ax.set(xticks=x, xticklabels=nodes, ylabel="kB sent", title="Bytes on the wire per node")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    injected, observed = [], []
    for n in nodes:
        rows = [r for r in report.traffic if r.node == n]
        extra = report.node_counters.get(n, {})
        produced = sum(r.sent for r in rows) + extra.get("buffer_dropped", 0) + extra.get("unsent", 0)
        lost = sum(r.lost for r in rows) + extra.get("buffer_dropped", 0) + extra.get("unsent", 0)
        injected.append(100 * lost / max(produced, 1))
        observed.append(100 * (1 - sum(r.observed for r in rows) / max(produced, 1)))
    ax.bar(x - 0.2, injected, 0.4, label="injected (link + buffer)")
    ax.bar(x + 0.2, observed, 0.4, label="observed (not in a stored window)")
    ax.set(xticks=x, xticklabels=nodes, ylabel="% of frames", title="Loss per node")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    if report.latency_ms:
        ax.hist(report.latency_ms, bins=40, color="tab:gray")
        for q, style in ((50, "-"), (99, "--")):
            value = report.percentile(q)
            ax.axvline(value, color="tab:red", linestyle=style, label=f"p{q} {value:.0f} ms")
        ax.legend(fontsize=8)
    ax.set(xlabel="ms", ylabel="windows", title="End-to-end latency (sample complete -> result)")

    ax = axes[1, 1]
    counts = report.nodes_present
    if counts:
        keys = sorted(counts)
        ax.bar([str(k) for k in keys], [counts[k] for k in keys], color="tab:green")
    ax.set(xlabel="nodes present", ylabel="stored windows",
           title=f"Window completeness ({report.windows_complete}/{report.windows_sampled} complete)")

    fig.suptitle(f"{report.config['scenario']} trial: {report.summary_line()}", fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_site_map(report: TrialReport, path: Path) -> Path:
    """Node positions, true target positions and the model's estimates (joined by a line)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    if report.layout is not None:
        xy = np.array([n.position[:2] for n in report.layout.nodes])
        ax.scatter(xy[:, 0], xy[:, 1], marker="^", s=90, color="black", label="nodes", zorder=3)
        for node, (px, py) in zip(report.layout.nodes, xy, strict=True):
            ax.annotate(node.id, (px, py), textcoords="offset points", xytext=(5, 5), fontsize=8)
    shown = report.positions[-MAX_MAP_WINDOWS:]
    if shown:
        true = np.array([t[:2] for t, _ in shown])
        est = np.array([e[:2] for _, e in shown])
        for (tx, ty), (ex, ey) in zip(true, est, strict=True):
            ax.plot([tx, ex], [ty, ey], color="tab:gray", linewidth=0.6, alpha=0.6)
        ax.scatter(true[:, 0], true[:, 1], s=18, color="tab:blue", label="true target")
        ax.scatter(est[:, 0], est[:, 1], s=18, marker="x", color="tab:red", label="estimate")
        error = np.linalg.norm(true - est, axis=1)
        title = f"Site map: {len(shown)} windows with a target, median error {np.median(error):.1f} m"
    else:
        title = "Site map (no localization output or no targets)"
    ax.set(xlabel="x (m)", ylabel="y (m)", title=title)
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
