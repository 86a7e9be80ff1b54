"""The live terminal view of a running trial (``spar-trial run --live``, ``make demo``).

Reads the aggregator's counters and latest results a few times a second (nothing here slows the
trial down: the view runs in rich's refresh thread and only takes snapshots). On a terminal it is
a rich ``Live`` panel; elsewhere (CI logs, pipes) it prints one status line every few seconds.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from testbed.report_format import percent_of
from trials.detections import detections_of
from trials.trial import TrialMonitor

RATE_WINDOW_S = 3.0  # messages/s and bytes/s are averaged over this many seconds
SHOWN_RESULTS = 6


@dataclass(frozen=True)
class Detection:
    """One result joined with its truth, for display."""

    window: int | None
    nodes_present: int
    n_nodes: int
    complete: bool
    true_class: str | None
    estimated_class: str | None
    true_position: tuple[float, ...] | None
    estimated_position: tuple[float, ...] | None
    hypocentre: bool = False  # positions are earthquake hypocentres (x, y, depth), shown in km
    vehicles: int | None = None  # a detector's window: true vehicles, and what it detected
    detected: int | None = None

    @property
    def error_m(self) -> float | None:
        if self.true_position is None or self.estimated_position is None:
            return None
        return float(np.linalg.norm(np.subtract(self.true_position, self.estimated_position)))


@dataclass(frozen=True)
class LiveSnapshot:
    stage: str
    elapsed_s: float
    windows_done: int
    windows_total: int
    nodes_online: int
    nodes_total: int
    messages_per_s: float
    kbytes_per_s: float
    stored: int
    complete: int
    partial: int
    late: int
    rejected: int
    added_latency_ms: float | None  # window closed -> result, median of the recent results
    detections: tuple[Detection, ...]


class LiveState:
    """Turns a monitor's aggregator into snapshots: rates over a sliding window, recent results."""

    def __init__(self, monitor: TrialMonitor):
        self.monitor = monitor
        self._traffic: collections.deque[tuple[float, int, int]] = collections.deque()
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=SHOWN_RESULTS)
        self._lock = threading.Lock()

    def snapshot(self) -> LiveSnapshot:
        m = self.monitor
        agg = m.aggregator
        now = time.monotonic()
        if agg is None:
            return LiveSnapshot(m.stage, now - m.started, 0, m.windows_total, 0, len(m.layout.nodes), 0.0, 0.0,
                                0, 0, 0, 0, 0, None, ())
        with self._lock:
            messages, nbytes = agg.processor.traffic()
            self._traffic.append((now, messages, nbytes))
            while len(self._traffic) > 2 and now - self._traffic[0][0] > RATE_WINDOW_S:
                self._traffic.popleft()
            t0, m0, b0 = self._traffic[0]
            span = max(now - t0, 1e-6)
            last = agg.worker.last_result
            if last is not None and (not self._recent or self._recent[-1] is not last):
                self._recent.append(last)
            recent = list(self._recent)
        assembler = dict(agg.assembler.counts)
        counts = agg.processor.snapshot_counts()
        nodes = agg.registry.nodes()
        added = [r["latency_ms"]["queue"] + r["latency_ms"]["inference"] for r in recent]
        return LiveSnapshot(
            stage=m.stage, elapsed_s=now - m.started, windows_done=m.windows_done, windows_total=m.windows_total,
            nodes_online=sum(1 for n in nodes if n.online), nodes_total=len(nodes),
            messages_per_s=(messages - m0) / span if span > 0.5 else 0.0,
            kbytes_per_s=(nbytes - b0) / span / 1e3 if span > 0.5 else 0.0,
            stored=agg.worker.snapshot_counts().get("results", 0), complete=assembler.get("windows_complete", 0),
            partial=assembler.get("windows_partial", 0), late=assembler.get("late", 0),
            rejected=sum(v for k, v in counts.items() if k.startswith("rejected.")),
            added_latency_ms=float(np.median(added)) if added else None,
            detections=tuple(self._detection(r) for r in reversed(recent)))

    def _detection(self, result: dict[str, Any]) -> Detection:
        m = self.monitor
        agg = m.aggregator
        truth = m.truth_for(int(result["window_start_ns"]), agg.assembler.window_ns) if agg else None
        names = list(agg.manifest.class_names) if agg else []
        true_class = true_position = None
        if truth is not None:
            label = truth["label"]
            true_class = names[label] if 0 <= label < len(names) else str(label)
            if truth["targets"]:
                true_position = tuple(truth["targets"][0]["position"])
        outputs = result.get("outputs", {})
        estimate = outputs.get("position", outputs.get("hypocentre"))
        return Detection(window=truth["window"] if truth else None, nodes_present=int(result.get("nodes_present", 0)),
                         n_nodes=len(result.get("nodes", ())), complete=bool(result.get("complete")),
                         true_class=true_class, estimated_class=result.get("class"), true_position=true_position,
                         estimated_position=tuple(estimate) if estimate is not None else None,
                         hypocentre="hypocentre" in outputs,
                         vehicles=len(truth["targets"]) if truth is not None else None,
                         detected=len(detections_of(outputs)) if "detection_logits" in outputs else None)


# --------------------------------------------------------------------------- rendering
def render(snapshot: LiveSnapshot, title: str) -> Any:
    """A rich renderable of one snapshot."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    s = snapshot
    stats = Table.grid(padding=(0, 3))
    for _ in range(4):
        stats.add_column()
    closed = s.complete + s.partial
    stats.add_row(f"[b]nodes online[/b] {s.nodes_online}/{s.nodes_total}",
                  f"[b]messages/s[/b] {s.messages_per_s:,.1f}", f"[b]kB/s[/b] {s.kbytes_per_s:,.1f}",
                  f"[b]windows[/b] {s.windows_done}/{s.windows_total} sent")
    stats.add_row(f"[b]results[/b] {s.stored}",
                  f"[b]complete[/b] {s.complete}/{closed} ({percent_of(s.complete, closed)})",
                  f"[b]late msgs[/b] {s.late}  [b]rejected[/b] {s.rejected}",
                  "[b]added latency[/b] " + ("-" if s.added_latency_ms is None else f"{s.added_latency_ms:.1f} ms"))
    detections = Table(title="latest results (true -> estimated)", expand=True, title_justify="left")
    quake = any(d.hypocentre for d in s.detections)
    for column in ("window", "nodes", "class", "hypocentre (km)" if quake else "position (m)", "error"):
        detections.add_column(column, justify="right" if column in ("window", "nodes", "error") else "left")
    for d in s.detections:
        ok = d.true_class is not None and d.true_class == d.estimated_class
        mark = "[green]✓[/green]" if ok else ("[red]✗[/red]" if d.true_class is not None else "")
        detections.add_row("-" if d.window is None else str(d.window),
                           f"{d.nodes_present}/{d.n_nodes}" + ("" if d.complete else " [yellow]partial[/yellow]"),
                           f"{d.true_class or '?'} -> {d.estimated_class or '-'} {mark}",
                           f"{_place(d.true_position, d.hypocentre)} -> {_place(d.estimated_position, d.hypocentre)}",
                           _error(d))
    header = f"{title}   [dim]{s.stage} · {s.elapsed_s:.0f} s[/dim]"
    return Panel(Group(stats, detections), title=header, title_align="left")


def status_line(snapshot: LiveSnapshot) -> str:
    """The plain-text form, for logs."""
    s = snapshot
    line = (f"[{s.elapsed_s:5.0f} s] windows {s.windows_done}/{s.windows_total} · nodes {s.nodes_online}/"
            f"{s.nodes_total} online · {s.messages_per_s:.1f} msg/s · {s.kbytes_per_s:.1f} kB/s · results "
            f"{s.stored} ({s.complete} complete, {s.partial} partial) · late {s.late}")
    if s.detections:
        d = s.detections[0]
        if d.detected is not None:
            line += f" · latest: {'?' if d.vehicles is None else d.vehicles} vehicle(s) -> {d.detected} detected"
        elif d.hypocentre and d.true_position is None:  # a replay: no truth to compare with
            line += f" · latest: hypocentre {_place(d.estimated_position, True)}"
        elif d.hypocentre:
            line += f" · latest: hypocentre {_place(d.true_position, True)} -> {_place(d.estimated_position, True)}"
        else:
            line += f" · latest: {d.true_class or '?'} -> {d.estimated_class or '-'}"
        line += "" if d.error_m is None else f", {_error(d)} off"
    return line


class LiveView:
    """Context manager showing a monitor live (rich on a terminal, status lines otherwise)."""

    def __init__(self, monitor: TrialMonitor, title: str, *, console: Any | None = None,
                 refresh_per_second: float = 4.0, line_interval_s: float = 5.0):
        from rich.console import Console

        self.state = LiveState(monitor)
        self.title = title
        self.console = console or Console()
        self.refresh_per_second = refresh_per_second
        self.line_interval_s = line_interval_s
        self._live: Any | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(get_renderable=lambda: render(self.state.snapshot(), self.title),
                              console=self.console, refresh_per_second=self.refresh_per_second, transient=False)
            self._live.__enter__()
        else:
            self._thread = threading.Thread(target=self._print_lines, name="live-lines", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._live is not None:
            self._live.__exit__(*exc_info)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self.console.print(status_line(self.state.snapshot()), highlight=False, soft_wrap=True)

    def _print_lines(self) -> None:
        while not self._stop.wait(self.line_interval_s):
            self.console.print(status_line(self.state.snapshot()), highlight=False, soft_wrap=True)


def _place(position: tuple[float, ...] | None, hypocentre: bool) -> str:
    """(x, y) in metres, or a hypocentre as (x, y) km and its depth."""
    if position is None or not all(math.isfinite(v) for v in position):
        return "-"
    if hypocentre and len(position) >= 3:
        return f"({position[0] / 1000:.1f}, {position[1] / 1000:.1f}) km, {position[2] / 1000:.1f} km deep"
    return "(" + ", ".join(f"{v:.1f}" for v in position[:2]) + ")"


def _error(d: Detection) -> str:
    if d.error_m is None:
        return ""
    return f"{d.error_m / 1000:.1f} km" if d.hypocentre else f"{d.error_m:.1f} m"
