"""Placement events of a field trial: nodes joining or moving while it runs, and what they did to it.

The events come from a TOML file (``spar-trial run --events FILE``)::

    [[events]]
    at_s = 8.5                   # trial seconds after the start
    kind = "join"                # a node the site layout does not list powers on
    node = "n08"
    position = [1.0, 15.0]       # metres, the site's dimension
    description = "west edge"    # optional; the birth's placement text

    [[events]]
    at_s = 14.5
    kind = "move"                # a running node re-announces itself at a new place
    node = "n03"
    position = [27.0, 10.0]

``check_events`` refuses, before anything starts, what the field or the aggregator could not do;
``analyze_events`` reads a trial folder's stored results and says, per event, from which window the
aggregator used the joined node or the new position, and the task metric before and after.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.errors import BenchError
from node_firmware_sim.errors import NodeError
from node_firmware_sim.field_runner import EventPlan, PlacementEvent
from node_firmware_sim.toml_file import read_toml
from spar_wire.site_layout import SiteLayout

EVENT_KEYS = ("at_s", "kind", "node", "position", "description", "modalities")
POSITION_TOLERANCE_M = 1e-3  # float32 in the placement tensor vs float64 in the event


# --------------------------------------------------------------------------- configuration
def load_events(path: str | Path) -> tuple[PlacementEvent, ...]:
    """The ``[[events]]`` of a TOML file; BenchError naming the file, the event and the field."""
    try:
        data = read_toml(path)
    except NodeError as exc:
        raise BenchError(str(exc)) from None
    unknown = sorted(set(data) - {"events"})
    if unknown:
        raise BenchError(f"{path}: unknown top-level key(s) {unknown}; expected only [[events]] tables")
    raw = data.get("events")
    if not isinstance(raw, list) or not raw:
        raise BenchError(f"{path}: expected one or more [[events]] tables")
    return tuple(parse_event(entry, f"{path}: events[{i}]") for i, entry in enumerate(raw))


def parse_event(entry: Any, where: str = "event") -> PlacementEvent:
    """One event from a mapping (a TOML table, or config.json's record of it)."""
    if isinstance(entry, PlacementEvent):
        return entry
    if not isinstance(entry, dict):
        raise BenchError(f"{where}: expected a table with {', '.join(EVENT_KEYS)}, got {entry!r}")
    unknown = sorted(set(entry) - set(EVENT_KEYS))
    if unknown:
        raise BenchError(f"{where}: unknown key(s) {unknown}; known: {', '.join(EVENT_KEYS)}")
    missing = [k for k in ("at_s", "kind", "node", "position") if k not in entry]
    if missing:
        raise BenchError(f"{where}: missing {', '.join(missing)}")
    try:
        return PlacementEvent(**entry)
    except NodeError as exc:
        raise BenchError(f"{where}: {exc}") from None


def check_events(events: tuple[PlacementEvent, ...], layout: SiteLayout, duration_s: float,
                 max_nodes: int) -> EventPlan:
    """The events checked against the site, the trial's duration and the model's node limit.

    ``max_nodes``: the most nodes the model takes (its manifest's node range): the aggregator would
    refuse the birth of a node beyond it, so a trial that joins one is refused before it starts.
    """
    try:
        plan = EventPlan(layout, events, duration_s)
    except NodeError as exc:
        raise BenchError(f"events: {exc}") from None
    total = len(plan.nodes_layout.nodes)
    if total > max_nodes:
        raise BenchError(f"events: joining {', '.join(plan.joined)} makes {total} nodes, but the model takes at "
                         f"most {max_nodes} (the aggregator would refuse the birth); use a site with fewer nodes")
    return plan


# --------------------------------------------------------------------------- analysis
@dataclass
class EventOutcome:
    """One event as the aggregator saw it. Windows are trial window indices (window k: [k W, (k+1) W))."""

    kind: str
    node: str
    at_s: float
    position: tuple[float, ...]
    event_window: int  # the window in progress at the event
    first_window: int | None  # first stored window whose tensor holds the joined node / the new position
    windows_until: int | None  # first_window - event_window (None: never)
    partial_between: int  # stored windows from the event up to first_window that were partial
    before_windows: int  # stored windows scored before the event (since the previous event)
    after_windows: int  # stored windows scored from first_window to the next event
    before: dict[str, float]  # headline metrics of those windows
    after: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def analyze_events(events: list[PlacementEvent], matched: list[tuple[dict[str, Any], dict[str, Any]]],
                   window_s: float, score: Any) -> list[EventOutcome]:
    """Per event (in time order), from the (stored result, truth record) pairs of the trial.

    ``score(pairs)``: the headline metrics of some pairs (the report's scoring).
    """
    ordered = sorted(events, key=lambda e: e.at_s)
    by_window = sorted(matched, key=lambda pair: pair[1]["window"])
    starts = [int(e.at_s // window_s) for e in ordered] + [math.inf]
    outcomes = []
    for i, event in enumerate(ordered):
        begin, end = (starts[i - 1] if i else 0), starts[i + 1]
        first = next((t["window"] for r, t in by_window if t["window"] >= starts[i]
                      and _includes(event, r)), None)
        between = [r for r, t in by_window if starts[i] <= t["window"] < (first if first is not None else end)]
        before = [(r, t) for r, t in by_window if begin <= t["window"] < starts[i]]
        after = [] if first is None else [(r, t) for r, t in by_window if first <= t["window"] < end]
        outcomes.append(EventOutcome(
            kind=event.kind, node=event.node, at_s=event.at_s, position=event.position, event_window=starts[i],
            first_window=first, windows_until=None if first is None else first - starts[i],
            partial_between=sum(1 for r in between if not r.get("complete")),
            before_windows=len(before), after_windows=len(after), before=score(before), after=score(after)))
    return outcomes


def _includes(event: PlacementEvent, result: dict[str, Any]) -> bool:
    """Whether this stored window used the event: the joined node's tokens / the moved node's new place."""
    if event.kind == "join":
        return any(event.node in nodes for nodes in result.get("present", {}).values())
    position = result_positions(result).get(event.node)
    return position is not None and np.allclose(position, event.position, atol=POSITION_TOLERANCE_M)


def result_positions(result: dict[str, Any]) -> dict[str, list[float]]:
    """Node id -> position (metres) the window's placement tensor used (the stored result's
    ``positions`` [N, d_S], in the node order of ``nodes``)."""
    return dict(zip(result.get("nodes", []), result.get("positions", []), strict=False))


# --------------------------------------------------------------------------- formatting
def events_markdown(outcomes: list[EventOutcome], metrics: tuple[str, ...], window_s: float) -> list[str]:
    """The report's "Placement events" section."""
    if not outcomes:
        return []
    head = "| event | at | first window with it | windows until used | partial meanwhile | windows before | "
    head += " | ".join(f"{m} before | {m} after" for m in metrics) + " | windows after |"
    lines = ["## Placement events", "",
             f"Window k covers [k x {window_s:g} s, (k+1) x {window_s:g} s) of trial time. \"First window with "
             "it\": the first stored window whose placement tensor holds the joined node's tokens or the moved "
             "node's new position; \"windows until used\" counts from the window in progress at the event. "
             "Metrics before: stored windows from the previous event to this one; after: from the first window "
             "with it to the next event.", "",
             head, "|" + "---|" * 2 + "---:|" * (4 + 2 * len(metrics)) + "---:|"]
    for o in outcomes:
        first = "never" if o.first_window is None else str(o.first_window)
        until = "n/a" if o.windows_until is None else str(o.windows_until)
        cells = " | ".join(f"{_fmt(o.before.get(m))} | {_fmt(o.after.get(m))}" for m in metrics)
        lines.append(f"| {o.kind} {o.node} at ({', '.join(f'{v:g}' for v in o.position)}) | {o.at_s:g} s "
                     f"(window {o.event_window}) | {first} | {until} | {o.partial_between} | {o.before_windows} | "
                     f"{cells} | {o.after_windows} |")
    return [*lines, ""]


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


# --------------------------------------------------------------------------- paired comparison
# Settings that must match for a control trial to see the same world as the trial with events.
SAME_WORLD = ("site", "scenario", "model", "seed", "duration_s", "codec", "scenario_params", "link")


def compare_with_control(events_folder: Path, control_folder: Path) -> list[str]:
    """Markdown: each event's "after" windows scored in the trial with events and in a control trial
    (same seed, site, model and link, no events), so the change in quality is paired window by window
    rather than a comparison of different vehicles before and after."""
    from benchmarks.trial_report import analyze_trial, scores_of_windows

    with_events, control = analyze_trial(events_folder), analyze_trial(control_folder)
    differs = [k for k in SAME_WORLD if with_events.config.get(k) != control.config.get(k)]
    if differs:
        raise BenchError(f"{control_folder} is not a control of {events_folder}: {', '.join(differs)} differ")
    if control.config.get("events"):
        raise BenchError(f"{control_folder} has placement events of its own; a control trial has none")
    if not with_events.events:
        raise BenchError(f"{events_folder} has no placement events to compare")
    metrics = tuple(sorted({m for o in with_events.events for m in o.after}))
    head = "| event | windows | " + " | ".join(f"{m} with the event | {m} control" for m in metrics) + " |"
    lines = ["## Placement events against a control trial", "",
             f"Control: `{control_folder}` (same seed, site, model and link; no events). The same stored windows "
             "are scored in both trials: before = from the previous event to this one, after = from the first "
             "window using the event to the next event.", "", head, "|---|---:|" + "---:|" * (2 * len(metrics))]
    ends = [o.event_window for o in with_events.events[1:]] + [None]
    begins = [0] + [o.event_window for o in with_events.events[:-1]]
    for outcome, begin, end in zip(with_events.events, begins, ends, strict=True):
        label = f"{outcome.kind} {outcome.node}"
        spans = [("before", begin, outcome.event_window)]
        if outcome.first_window is not None:
            spans.append(("after", outcome.first_window, end))
        for name, lo, hi in spans:
            ours, theirs = scores_of_windows(with_events, lo, hi), scores_of_windows(control, lo, hi)
            cells = " | ".join(f"{_fmt(ours[1].get(m))} | {_fmt(theirs[1].get(m))}" for m in metrics)
            lines.append(f"| {label}, {name} | {lo}–{'end' if hi is None else hi - 1} ({ours[0]}/{theirs[0]}) | "
                         f"{cells} |")
    return [*lines, ""]
