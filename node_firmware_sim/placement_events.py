"""Placement events of a field trial: nodes joining or moving while it runs.

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
``EventPlan`` says what the events imply window by window for the nodes the field runs. What the
aggregator made of them is scored by ``trials.event_report``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from node_firmware_sim.errors import NodeError
from node_firmware_sim.scenarios.base import SourceWindow, site_window_s
from node_firmware_sim.toml_file import read_toml
from spar_wire.errors import WireError
from spar_wire.numbers import is_finite_number, is_finite_vector
from spar_wire.site_layout import NodeSpec, SiteLayout
from spar_wire.topics import check_id

EVENT_KINDS = ("join", "move")
EVENT_KEYS = ("at_s", "kind", "node", "position", "description", "modalities")


@dataclass(frozen=True)
class PlacementEvent:
    """A node joining the site, or moving, at trial time ``at_s`` (seconds after the trial started).

    join: a node the site layout does not list powers on at ``at_s``: it connects, publishes its birth
    (``position``, ``description`` and the site's feature hashes) and sends every window that starts
    at or after ``at_s`` (its first full window). move: a running node publishes a new birth with
    ``position`` at ``at_s``; its signals come from the new place from the window in progress at
    ``at_s`` on, the window the aggregator (which applies a birth to every window it closes after it)
    first assembles with the new position.
    """

    kind: str  # "join" | "move"
    node: str
    at_s: float
    position: tuple[float, ...]  # metres in the site frame, the site's dimension (2 or 3)
    description: str | None = None  # placement text of the birth; None: "" for a join, unchanged for a move
    modalities: tuple[str, ...] = ()  # join only: what the node senses; () = every modality of the site

    def __post_init__(self) -> None:
        where = f"{self.kind} event of node {self.node!r}"
        if self.kind not in EVENT_KINDS:
            raise NodeError(f"event of node {self.node!r}: kind must be one of {EVENT_KINDS}, got {self.kind!r}")
        try:
            check_id(self.node, "node")
        except WireError as exc:
            raise NodeError(f"{self.kind} event: {exc.detail}") from None
        if not is_finite_number(self.at_s) or self.at_s <= 0:
            raise NodeError(f"{where}: at_s must be a finite number of seconds > 0, got {self.at_s!r}")
        if not is_finite_vector(self.position, (2, 3)):
            raise NodeError(f"{where}: position must be 2 or 3 finite numbers (metres), got {self.position!r}")
        if self.description is not None and not isinstance(self.description, str):
            raise NodeError(f"{where}: description must be a string, got {self.description!r}")
        if not isinstance(self.modalities, (list, tuple)) or not all(isinstance(m, str) for m in self.modalities):
            raise NodeError(f"{where}: modalities must be a list of modality names, got {self.modalities!r}")
        if self.kind == "move" and self.modalities:
            raise NodeError(f"{where}: a moved node keeps its modalities; give modalities only for a join")
        # TOML and JSON give lists: keep the event hashable and its numbers plain floats.
        object.__setattr__(self, "at_s", float(self.at_s))
        object.__setattr__(self, "position", tuple(float(v) for v in self.position))
        object.__setattr__(self, "modalities", tuple(self.modalities))


@dataclass(frozen=True)
class _Placement:
    """Where a node's signals come from from window ``first_window`` on."""

    first_window: int
    receiver: str  # node id in the physics layout


class EventPlan:
    """The placement events of one trial, checked against the site; what they imply window by window.

    ``nodes_layout``: the site plus every joined node (what the firmware and the births know).
    ``physics_layout``: ``nodes_layout`` plus one receiver per move, at the new place (what the
    source renders; receiver ids contain ``~``, which no node id may, so they never collide).
    NodeError names the event and what is wrong with it.
    """

    def __init__(self, layout: SiteLayout, events: tuple[PlacementEvent, ...], duration_s: float):
        self.window_s = site_window_s(layout)
        self.windows = max(1, math.ceil(duration_s / self.window_s - 1e-9))
        self.events = tuple(sorted(events, key=lambda e: e.at_s))  # stable: same-time events keep their order
        self._placements = {n.id: [_Placement(0, n.id)] for n in layout.nodes}
        joined: list[NodeSpec] = []
        receivers: list[NodeSpec] = []
        specs = {n.id: n for n in layout.nodes}
        for number, event in enumerate(self.events, 1):
            self._check(layout, event, duration_s, specs)
            if event.kind == "join":
                spec = NodeSpec(event.node, event.position, event.modalities or tuple(layout.modalities),
                                event.description or "")
                joined.append(spec)
                specs[event.node] = spec
                self._placements[event.node] = [_Placement(math.ceil(event.at_s / self.window_s - 1e-9), event.node)]
            else:
                receiver = NodeSpec(f"{event.node}~move{number}", event.position, specs[event.node].modalities)
                receivers.append(receiver)
                self._placements[event.node].append(_Placement(int(event.at_s // self.window_s), receiver.id))
        self.nodes_layout = replace(layout, nodes=(*layout.nodes, *joined))
        self.physics_layout = replace(layout, nodes=(*layout.nodes, *joined, *receivers))
        self.joined = tuple(n.id for n in joined)

    def _check(self, layout: SiteLayout, event: PlacementEvent, duration_s: float, known: dict[str, NodeSpec]) -> None:
        where = f"{event.kind} of node {event.node} at {event.at_s:g} s"
        if event.at_s >= duration_s:
            raise NodeError(f"{where}: the trial lasts {duration_s:g} s; an event must happen during it")
        if len(event.position) != layout.position_dim:
            raise NodeError(f"{where}: a {len(event.position)}-D position in a site with "
                            f"{layout.position_dim}-D positions")
        if event.kind == "join":
            if event.node in known:
                listed = "the site layout lists it" if event.node in layout.node_ids else "it joined earlier"
                raise NodeError(f"{where}: node {event.node} already exists ({listed}); a join needs a new id")
            unknown = sorted(set(event.modalities) - set(layout.modalities))
            if unknown:
                raise NodeError(f"{where}: modalities {unknown} are not the site's {sorted(layout.modalities)}")
            first = math.ceil(event.at_s / self.window_s - 1e-9)
            if first >= self.windows:
                raise NodeError(f"{where}: its first full window would start at {first * self.window_s:g} s, "
                                f"after the trial's last window ({self.windows} windows of {self.window_s:g} s)")
        elif event.node not in known:
            raise NodeError(f"{where}: no node {event.node} in site {layout.site_id} and no earlier join of it")
        same = [e for e in self.events if e.node == event.node and e.at_s == event.at_s]
        if len(same) > 1:
            raise NodeError(f"{where}: {len(same)} events for one node at the same time")

    def receivers(self, window: int, nodes: tuple[str, ...]) -> dict[str, str]:
        """Node id -> the physics receiver it reads in ``window``, for the ``nodes`` that sample it."""
        out = {}
        for node in nodes:
            current = [p for p in self._placements[node] if p.first_window <= window]
            if current:
                out[node] = current[-1].receiver
        return out

    def nodes_window(self, window: SourceWindow, receivers: dict[str, str]) -> SourceWindow:
        """The physics window with each node's signals under its own id."""
        owner = {receiver: node for node, receiver in receivers.items()}
        return replace(window, signals={(owner[receiver], modality): samples
                                        for (receiver, modality), samples in window.signals.items()
                                        if receiver in owner})


# --------------------------------------------------------------------------- configuration
def load_events(path: str | Path) -> tuple[PlacementEvent, ...]:
    """The ``[[events]]`` of a TOML file; NodeError naming the file, the event and the field."""
    data = read_toml(path)
    unknown = sorted(set(data) - {"events"})
    if unknown:
        raise NodeError(f"{path}: unknown top-level key(s) {unknown}; expected only [[events]] tables")
    raw = data.get("events")
    if not isinstance(raw, list) or not raw:
        raise NodeError(f"{path}: expected one or more [[events]] tables")
    return tuple(parse_event(entry, f"{path}: events[{i}]") for i, entry in enumerate(raw))


def parse_event(entry: Any, where: str = "event") -> PlacementEvent:
    """One event from a mapping (a TOML table, or config.json's record of it)."""
    if isinstance(entry, PlacementEvent):
        return entry
    if not isinstance(entry, dict):
        raise NodeError(f"{where}: expected a table with {', '.join(EVENT_KEYS)}, got {entry!r}")
    unknown = sorted(set(entry) - set(EVENT_KEYS))
    if unknown:
        raise NodeError(f"{where}: unknown key(s) {unknown}; known: {', '.join(EVENT_KEYS)}")
    missing = [k for k in ("at_s", "kind", "node", "position") if k not in entry]
    if missing:
        raise NodeError(f"{where}: missing {', '.join(missing)}")
    try:
        return PlacementEvent(**entry)
    except NodeError as exc:
        raise NodeError(f"{where}: {exc}") from None


def check_events(events: tuple[PlacementEvent, ...], layout: SiteLayout, duration_s: float,
                 max_nodes: int) -> EventPlan:
    """The events checked against the site, the trial's duration and the model's node limit.

    ``max_nodes``: the most nodes the model takes (its manifest's node range): the aggregator would
    refuse the birth of a node beyond it, so a trial that joins one is refused before it starts.
    """
    try:
        plan = EventPlan(layout, events, duration_s)
    except NodeError as exc:
        raise NodeError(f"events: {exc}") from None
    total = len(plan.nodes_layout.nodes)
    if total > max_nodes:
        raise NodeError(f"events: joining {', '.join(plan.joined)} makes {total} nodes, but the model takes at "
                         f"most {max_nodes} (the aggregator would refuse the birth); use a site with fewer nodes")
    return plan
