"""What a fault trial proved, read back from the result store: every acknowledged message in
exactly one stored result, no window stored twice, SQLite consistent, and what became of the node
that joined; and the report that says so (``FaultReport.to_markdown``).

``fault_trial`` runs the trial (processes, faults, schedule) and hands its events and the nodes'
acknowledgements to the functions here; they only read: SQLite opened read-only, the aggregator's
log text, its counters. Keys are (node, modality, window index), window 0 starting at the trial's
epoch.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from node_firmware_sim.field_runner import FieldSummary
from node_firmware_sim.placement_events import EventPlan, PlacementEvent

AGGREGATOR_KINDS = ("aggregator", "gap", "restart")  # faults that end an aggregator process


@dataclass
class FaultEvent:
    """One fault the trial injected, and what was seen around it."""

    t_s: float  # trial time the fault was injected
    kind: str  # "broker" | "aggregator" | "gap" (SIGKILL each) | "restart" (aggregator SIGTERM, then start)
    recovered_s: float = 0.0  # until the broker listened again / the new aggregator process served
    down_ns: int = 0  # aggregator kinds: wall clock once the old process was gone
    unknown_node: int | None = None  # aggregator kinds: the ended process's unknown_node refusals (its counters)
    held_start_s: float | None = None  # gap: window_start_ns / 1e9 of the newest window held before its commit
    held_window: int | None = None  # gap: that window's index in the trial
    in_gap: bool = False  # gap: a window was held and was not in SQLite after the kill


@dataclass
class JoinReport:
    """What became of the node that joined. ``passed`` when it was restored at every aggregator start
    after the join, its messages are stored after a restart, and nothing of it was refused unknown."""

    node: str
    at_s: float  # trial time of the join (its birth)
    first_window: int  # the first window it samples
    acked: int  # its token messages acknowledged to it
    delivered: int  # of those, in a stored result
    starts_after: int  # aggregator processes started after the join
    restored: int  # aggregator starts whose log says they restored it from SQLite
    with_node: int  # processes started after the join that stored a result with it present
    backlog: int  # its messages stored by a new process from windows that ended before that restart
    unknown_node: int  # messages refused as unknown_node, summed over every process's counters
    unknown_log_lines: int  # log lines naming it as unknown ("no birth and not in the site layout")
    join_windows: int  # windows before its first that still list it (awaited from its birth on: partial)

    @property
    def passed(self) -> bool:
        return (self.starts_after >= 1 and self.restored == self.starts_after and self.with_node >= 1
                and self.unknown_node == 0 and self.unknown_log_lines == 0
                and self.acked > 0 and self.delivered == self.acked)


@dataclass
class FaultReport:
    """What a fault trial proved. ``lost`` and ``duplicate_results`` must be 0, ``integrity`` "ok"."""

    config: dict[str, Any]
    events: list[FaultEvent]
    windows: int  # windows the nodes sampled
    produced: int  # token messages the nodes encoded
    acked: int  # of those, acknowledged by the broker to the node (PUBACK)
    delivered: int  # acknowledged messages found in a stored result
    lost: list[str]  # acknowledged but in no result ("node/modality/window")
    unacked_delivered: int  # in a result although the node saw no PUBACK (lost PUBACK, resent)
    result_rows: int
    duplicate_results: int  # rows beyond one per window
    windows_fully_acked: int  # windows whose every message was acknowledged
    complete_once: int  # of those, stored exactly once and complete (a join window: once, see JoinReport)
    integrity: str  # PRAGMA integrity_check
    aggregator_exit: int | None  # exit code of the last aggregator process after SIGTERM
    aggregator_counts: dict[str, Any] = field(default_factory=dict)  # the last process's counters
    gap_landed: int = 0  # gap kills with a window held and not in SQLite at the kill
    gap_stored_once: int = 0  # of the windows those held, stored exactly once and complete in the end
    join: JoinReport | None = None
    model: str = ""  # name@version of the aggregator's model
    machine: str = ""  # describe_machine(): date, CPU, cores, memory, OS, versions
    elapsed_s: float = 0.0

    @property
    def passed(self) -> bool:
        # Not vacuous: most messages must have been acknowledged (a trial where nodes got no PUBACK
        # would otherwise lose "nothing"), and asked-for gap kills must have hit a held window.
        gap_kills = sum(e.kind == "gap" for e in self.events)
        return (not self.lost and self.duplicate_results == 0 and self.integrity == "ok"
                and self.complete_once == self.windows_fully_acked and self.aggregator_exit == 0
                and self.acked >= 0.9 * self.produced and self.windows_fully_acked > 0
                and (gap_kills == 0 or self.gap_landed >= 1) and self.gap_stored_once == self.gap_landed
                and (self.join is None or self.join.passed))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed,
                "join_passed": None if self.join is None else self.join.passed}

    def to_markdown(self) -> str:
        kinds = ("broker", "aggregator", "gap", "restart")
        kills = {kind: sum(e.kind == kind for e in self.events) for kind in kinds}
        recover = {kind: max((e.recovered_s for e in self.events if e.kind == kind), default=0.0) for kind in kinds}
        rows = [
            ("broker SIGKILL + restart", f"{kills['broker']} (back within {recover['broker']:.1f} s)"),
            ("aggregator SIGKILL + restart", f"{kills['aggregator']} (serving again within "
                                             f"{recover['aggregator']:.1f} s)"),
            ("aggregator SIGKILL between window close and commit", f"{kills['gap']} (serving again within "
                                                                   f"{recover['gap']:.1f} s)"),
            ("… landed in the gap (window held, not in SQLite at the kill)", f"{self.gap_landed} / {kills['gap']}"),
            ("… held windows stored once, complete, after the restart", f"{self.gap_stored_once} / {self.gap_landed}"),
            ("aggregator SIGTERM + restart", f"{kills['restart']} (serving again within "
                                             f"{recover['restart']:.1f} s)"),
            ("windows sampled", self.windows),
            ("token messages produced", self.produced),
            ("acknowledged to nodes (PUBACK)", self.acked),
            ("acknowledged and in a stored result", self.delivered),
            ("**acknowledged but lost**", len(self.lost)),
            ("in a result without a PUBACK seen (resent)", self.unacked_delivered),
            ("result rows / duplicate rows", f"{self.result_rows} / {self.duplicate_results}"),
            ("fully acknowledged windows stored once, complete", f"{self.complete_once} / {self.windows_fully_acked}"),
            ("SQLite integrity_check", self.integrity),
            ("aggregator exit code after SIGTERM", self.aggregator_exit),
        ]
        verdict = "**passed**" if self.passed else "**FAILED**"
        early = "on" if self.config["early_close"] else "off"
        out = [f"Fault trial of {self.config['duration_s']:g} s: {verdict}", "",
               f"machine: {self.machine}", "",
               f"model: {self.model}; site `{self.config['site']}`; aggregator deadline "
               f"{self.config['deadline_fraction']:g} windows, early close {early}; "
               f"{self.elapsed_s:.0f} s in all", "",
               "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
        if kills["gap"]:
            landed = [e for e in self.events if e.kind == "gap"]
            out += ["", f"Kills between close and commit: the aggregator ran as `testbed/held_commit_aggregator.py` "
                    f"(the real service, each commit held {self.config['commit_delay_s']:g} s, for every fault of "
                    "the trial); each gap kill came as soon as its `/metrics` showed a held window. Held windows: "
                    + ", ".join(f"{e.held_window} at {e.t_s:g} s ({'in the gap' if e.in_gap else 'missed'})"
                                for e in landed) + "."]
        if self.join is not None:
            j = self.join
            join_rows = [
                ("joined at (trial time) / first window it samples", f"{j.at_s:g} s / {j.first_window}"),
                ("aggregator starts after the join / restored it from SQLite", f"{j.starts_after} / {j.restored}"),
                ("… of those processes, stored a result with it present", f"{j.with_node} / {j.starts_after}"),
                ("its messages acknowledged / in a stored result", f"{j.acked} / {j.delivered}"),
                ("its messages stored from a restart's backlog", j.backlog),
                ("**refused as unknown_node** (counters of every process) / log lines naming it",
                 f"{j.unknown_node} / {j.unknown_log_lines}"),
                ("windows before its first listing it (partial: awaited from its birth on)", j.join_windows),
            ]
            out += ["", f"Joined node {j.node}: {'**passed**' if j.passed else '**FAILED**'}", "",
                    "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in join_rows)]
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- accounting
class StoredRow(NamedTuple):
    """One stored result, as the accounting needs it."""

    window: int  # index in the trial (window 0 starts at the trial's epoch)
    complete: bool
    present: frozenset[tuple[str, str]]  # (node, modality) pairs it holds
    nodes: tuple[str, ...]  # the node set the aggregator assembled it with (awaited or not)
    start_ns: int  # window_start_ns (the nodes' stamps, median)
    created_ns: int  # when it was committed (the store's wall clock)


def acked_keys(summary: FieldSummary, window_ns: int) -> set[tuple[str, str, int]]:
    """(node, modality, window) of every token message a node got a PUBACK for."""
    keys = set()
    for node, s in summary.nodes.items():
        for modality, start_ns in s.acked_frames or ():
            keys.add((node, modality, window_of(start_ns, summary.start_epoch_ns, window_ns)))
    return keys


def window_of(start_ns: int, epoch_ns: int, window_ns: int) -> int:
    """The trial's index of the window starting at ``start_ns`` (nearest, as node stamps jitter)."""
    return int(round((start_ns - epoch_ns) / window_ns))


def stored_rows(database: Path, window_ns: int, epoch_ns: int) -> list[StoredRow]:
    """Every stored row, oldest first, read like any other reader would."""
    if not database.exists():
        return []
    try:
        conn = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return []
    try:
        rows = conn.execute("SELECT payload, created_ns FROM results ORDER BY id").fetchall()
    except sqlite3.Error:
        return []
    finally:
        conn.close()
    stored = []
    for payload, created_ns in rows:
        result = json.loads(payload)
        present = frozenset((node, modality) for modality, nodes in result["present"].items() for node in nodes)
        stored.append(StoredRow(window_of(result["window_start_ns"], epoch_ns, window_ns), bool(result["complete"]),
                                present, tuple(result["nodes"]), int(result["window_start_ns"]), int(created_ns)))
    return stored


def delivered_keys(stored: list[StoredRow]) -> set[tuple[str, str, int]]:
    """(node, modality, window) of every message some stored result holds."""
    return {(node, modality, row.window) for row in stored for node, modality in row.present}


def drain(database: Path, expected: set[tuple[str, str, int]], window_ns: int, epoch_ns: int,
           timeout_s: float) -> None:
    """Wait until every acknowledged message is in a stored result (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if expected <= delivered_keys(stored_rows(database, window_ns, epoch_ns)):
            return
        time.sleep(0.25)


def _first_window(plan: EventPlan, node: str) -> int:
    """The first window a joined node samples (it is awaited from its birth, one window earlier)."""
    return min(w for w in range(plan.windows) if node in plan.receivers(w, (node,)))


def join_windows(plan: EventPlan, per_window: dict[int, list[StoredRow]]) -> set[int]:
    """Windows before a joined node's first that were assembled with it: from its birth on the
    aggregator awaits it, while it samples only from the next whole window, so the window its
    birth falls in (or, if the birth overtook the previous window's messages, that one) is partial."""
    out = set()
    for node in plan.joined:
        first = _first_window(plan, node)
        out |= {w for w, rows in per_window.items() if w < first and any(node in row.nodes for row in rows)}
    return out


def join_stored(join: PlacementEvent, plan: EventPlan, window_ns: int, summary: FieldSummary,
                 events: list[FaultEvent], stored: list[StoredRow], acked: set[tuple[str, str, int]],
                 delivered: set[tuple[str, str, int]], partial_windows: set[int]) -> JoinReport:
    """The joined node's part that SQLite shows (the log and counters come in ``join_outcome``)."""
    node = join.node
    first = _first_window(plan, node)
    restarts = [e for e in events if e.kind in AGGREGATOR_KINDS and e.t_s > join.at_s]
    # Process i (started after restart i) committed the rows created between its start and the next restart.
    spans = [(e.down_ns, later.down_ns) for e, later in zip(restarts, restarts[1:], strict=False)]
    spans += [(restarts[-1].down_ns, 2**63)] if restarts else []
    with_node = sum(any(down <= row.created_ns < end and any(n == node for n, _ in row.present) for row in stored)
                    for down, end in spans)
    # Backlog: stored by a process started after a restart, from a window that had ended before it.
    backlog = set()
    for event in restarts:
        for row in stored:
            if row.created_ns > event.down_ns and row.start_ns + window_ns <= event.down_ns:
                backlog |= {(n, m, row.window) for n, m in row.present if n == node}
    mine = {key for key in acked if key[0] == node}
    return JoinReport(node=node, at_s=join.at_s, first_window=first, acked=len(mine), delivered=len(mine & delivered),
                      starts_after=len(restarts), restored=0, with_node=with_node, backlog=len(backlog),
                      unknown_node=0, unknown_log_lines=0,
                      join_windows=sum(w < first for w in partial_windows))


def join_outcome(join: JoinReport, events: list[FaultEvent], last_unknown: int, log_text: str) -> JoinReport:
    """Add what the aggregator log and every process's counters say about the joined node. The site's
    layout nodes are never unknown, so any unknown_node refusal in this trial is about it."""
    restored = len(re.findall(rf"restored node {re.escape(join.node)} \(joined in the field\)", log_text))
    unknown_lines = len(re.findall(rf"not in the site layout: {re.escape(join.node)}\b", log_text))
    unknown = last_unknown + sum(e.unknown_node or 0 for e in events if e.kind in AGGREGATOR_KINDS)
    return dataclasses.replace(join, restored=restored, unknown_node=unknown, unknown_log_lines=unknown_lines)


def integrity_check(database: Path) -> str:
    """SQLite's ``PRAGMA integrity_check`` of the result store ("ok"), or the error opening it."""
    try:
        conn = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"error: {exc}"
