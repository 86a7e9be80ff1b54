"""What the aggregator made of a trial's placement events: from which window it used a joined node or
a new position, and the task metric before and after each event (``spar-trial report``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from node_firmware_sim.placement_events import PlacementEvent
from testbed.report_format import short_number

POSITION_TOLERANCE_M = 1e-3  # float32 in the placement tensor vs float64 in the event


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
        cells = " | ".join(f"{short_number(o.before.get(m))} | {short_number(o.after.get(m))}" for m in metrics)
        lines.append(f"| {o.kind} {o.node} at ({', '.join(f'{v:g}' for v in o.position)}) | {o.at_s:g} s "
                     f"(window {o.event_window}) | {first} | {until} | {o.partial_between} | {o.before_windows} | "
                     f"{cells} | {o.after_windows} |")
    return [*lines, ""]
