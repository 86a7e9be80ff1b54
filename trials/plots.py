"""The two figures of a trial report: a 2x2 overview and a site map (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from trials.report import TrialReport

DETECTION_MAP_WINDOWS = 4  # windows drawn on a detection site map (more would hide each other)
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
    """Node positions, true target positions and the model's estimates (joined by a line); for an
    earthquake model, epicentres in km beside a panel of estimated against true depth."""
    plt = _pyplot()
    quake = report.hypocentres
    scale, unit = (1000.0, "km") if quake else (1.0, "m")
    fig, axes = plt.subplots(1, 2 if quake else 1, figsize=(12 if quake else 7, 6), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1]} if quake else None)
    ax = axes[0][0]
    if report.layout is not None:
        xy = np.array([n.position[:2] for n in report.layout.nodes]) / scale
        ax.scatter(xy[:, 0], xy[:, 1], marker="^", s=90, color="black", label="nodes", zorder=3)
        for node, (px, py) in zip(report.layout.nodes, xy, strict=True):
            ax.annotate(node.id, (px, py), textcoords="offset points", xytext=(5, 5), fontsize=8)
    shown = report.positions[-MAX_MAP_WINDOWS:]
    what = ("epicentre", "events") if quake else ("target", "windows with a target")
    if shown:
        true = np.array([t[:2] for t, _ in shown]) / scale
        est = np.array([e[:2] for _, e in shown]) / scale
        for (tx, ty), (ex, ey) in zip(true, est, strict=True):
            ax.plot([tx, ex], [ty, ey], color="tab:gray", linewidth=0.6, alpha=0.6)
        ax.scatter(true[:, 0], true[:, 1], s=18, color="tab:blue", label=f"true {what[0]}")
        ax.scatter(est[:, 0], est[:, 1], s=18, marker="x", color="tab:red", label="estimate")
        error = np.linalg.norm(true - est, axis=1)
        title = f"Site map: {len(shown)} {what[1]}, median {'epicentral ' if quake else ''}error " \
                f"{np.median(error):.{2 if quake else 1}f} {unit}"
    elif report.detections:
        title = _plot_detections(ax, report)
    elif report.unscored_estimates():
        est = np.array([e[:2] for e in report.unscored_estimates()[-MAX_MAP_WINDOWS:]]) / scale
        ax.scatter(est[:, 0], est[:, 1], s=18, marker="x", color="tab:red", label="estimate (no ground truth)")
        title = f"Site map: {len(est)} replayed windows, the model's {what[0]}s"
    else:
        title = "Site map (no localization output or no targets)"
    ax.set(xlabel=f"x ({unit})", ylabel=f"y ({unit})", title=title)
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=8, loc="best")
    if quake:
        _plot_depths(axes[0][1], shown, report.unscored_estimates())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_detections(ax, report: TrialReport) -> str:
    """The last few windows with a vehicle or a detection: true vehicles (circles), detections
    (crosses), matches joined."""
    shown = [w for w in report.detections if w.truth or w.detections][-DETECTION_MAP_WINDOWS:]
    for i, w in enumerate(shown):
        colour = f"C{i % 10}"
        for d, t in w.matches:
            (tx, ty), (dx, dy) = w.truth[t][1][:2], w.detections[d][2][:2]
            ax.plot([tx, dx], [ty, dy], color=colour, linewidth=0.8)
        if w.truth:
            ax.scatter(*np.array([p[:2] for _, p in w.truth]).T, s=40, facecolors="none", edgecolors=colour,
                       label=f"window {w.window}: {w.matched}/{len(w.truth)} found, {w.false} false")
        if w.detections:
            ax.scatter(*np.array([p[:2] for _, _, p in w.detections]).T, s=30, marker="x", color=colour)
    found = sum(w.matched for w in report.detections)
    total = sum(len(w.truth) for w in report.detections)
    return (f"Site map: vehicles (o) and detections (x), last {len(shown)} busy windows;\n{found}/{total} "
            "vehicles found in the trial")


def _plot_depths(ax, shown: list[tuple[list[float], list[float]]], unscored: list[list[float]]) -> None:
    """Estimated against true hypocentre depth (km, down is deeper), the diagonal is perfect; a replay
    (no truth) shows the estimated depths' histogram instead."""
    depths = np.array([(t[2], e[2]) for t, e in shown if len(t) > 2 and len(e) > 2]) / 1000.0
    if not len(depths) and unscored:
        ax.hist([e[2] / 1000.0 for e in unscored if len(e) > 2], bins=10, orientation="horizontal",
                color="tab:red")
        ax.invert_yaxis()
        ax.set(xlabel="windows", ylabel="estimated depth (km)", title="Estimated depths (no ground truth)")
        return
    if len(depths):
        ax.scatter(depths[:, 0], depths[:, 1], s=18, color="tab:red", marker="x")
        top = float(np.nanmax(np.abs(depths))) * 1.1 or 1.0
        ax.plot([0, top], [0, top], color="k", linewidth=0.8, linestyle="--", label="perfect")
        ax.set_xlim(0, top)
        ax.set_ylim(top, 0)
        ax.legend(fontsize=8, loc="best")
        ax.set_title(f"Depth: median error {np.median(np.abs(depths[:, 0] - depths[:, 1])):.2f} km")
    else:
        ax.set_title("Depth (no events scored)")
    ax.set(xlabel="true depth (km)", ylabel="estimated depth (km)")
