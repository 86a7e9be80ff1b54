"""Fault trials: a live site while the broker and the aggregator are killed (SIGKILL) and restarted.

The promise under test, message by message: every token message a node got a PUBACK for ends up in
exactly one stored result, however often the broker or the aggregator dies; no window is stored
twice; the SQLite file stays consistent. The pieces that keep it:

- the broker saves its state after every change (``autosave_on_changes``, interval 1), so a SIGKILL
  loses at most the message it is handling, whose PUBACK has then not gone out either (nodes resend
  unacknowledged messages after reconnecting);
- the aggregator acknowledges a message only once the result of its window is committed, so a
  killed aggregator's open windows come back from its persistent session;
- the result store keeps one row per window, so a window assembled again from redelivered messages
  is not stored twice.

The aggregator runs as its own process (``spar-aggregator run``), exactly as in the field, so it
can be SIGKILLed. The aggregator's deadline is set long (``deadline_fraction``): a broker outage
holds messages back by a few seconds, and a window should not close before they come (a message
later than its window is dropped as late and acknowledged). Its early close is off by default: it
closes a window once the missing messages are overdue by the 0.99 quantile of their learned lag,
so by design about one message in a hundred that would still have made the deadline comes late,
and this trial counts every acknowledged message that is not stored as lost (a soak with it on
lost 2 of 1,198 that way, both before the first fault). ``--early-close`` runs it; it holds off
while the broker link is down and for a deadline after it is back (before that hold existed, an
early close across a broker outage lost 5 to 14 acknowledged messages per run).

Two faults aim at paths the others reach only by chance (issue 19):

- **A kill between a window's close and its commit** (``gap_kills``): its messages are out of the
  assembler and not acknowledged, its result not on disk. On the real service that gap lasts
  milliseconds, so with gap kills the aggregator runs through ``testbed/held_commit_aggregator.py``:
  the real service whose result store waits ``commit_delay_s`` before every commit (for the whole
  trial, so every other fault meets those held windows too), with gauges on its own ``/metrics``
  naming the windows held. A gap kill polls them and SIGKILLs as soon as one is held; after the kill
  the trial reads SQLite to confirm the held window was not stored (the kill "landed in the gap"),
  and in the end that it was stored exactly once, complete.
- **A node that joins during the trial** (``join``): by default the trial runs the seven-node lot
  (``configs/trials/parking_lot_without_n08.toml``) and n08 joins in the first window, at its place
  in the full lot. Every aggregator start after that must restore n08 from SQLite
  (``edge_runtime/node_store.py``): the broker hands the backlog over before the retained births, so
  without it n08's backlog would be refused as ``unknown_node`` and acknowledged, i.e. lost. The
  trial checks the log for the restore at every start, the counters of every process (read before
  each kill, and from each stop) for ``unknown_node`` refusals, and that n08's messages are stored,
  from the backlog of the restarts too.

  From its birth on the aggregator awaits n08, which samples only from the next whole window, so
  the window its birth falls in waits for its deadline (``deadline_fraction`` x 2 s = 8 s) and is
  stored partial. The faults start only once that window is stored: a broker SIGKILL loses the
  messages it had delivered to the connected aggregator and not yet seen acknowledged (Mosquitto
  counts only *queued* messages, retained messages and subscriptions as changes for
  ``autosave_on_changes``; in-flight deliveries are not saved), so they then live only in the
  aggregator's open window, and an aggregator kill before that window is stored loses them although
  the nodes got their PUBACKs. Windows that complete within a second are stored long before the
  next fault; a window held open for 8 s across a broker kill and an aggregator kill is not.

This module runs the trial: the schedule, the broker and aggregator processes and the faults, and
the ``spar-bench faults`` command (``register``). What the trial proved is read back from SQLite and
written up by ``fault_report``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.cli_support import progress
from benchmarks.errors import BenchError
from benchmarks.experiment_ledger import versions
from benchmarks.fault_report import (
    FaultEvent,
    FaultReport,
    StoredRow,
    acked_keys,
    delivered_keys,
    drain,
    integrity_check,
    join_outcome,
    join_stored,
    join_windows,
    stored_rows,
    window_of,
)
from node_firmware_sim.errors import NodeError
from node_firmware_sim.field_runner import FieldConfig, FieldSummary, SourceSpec, run_field
from node_firmware_sim.link_model import LinkConfig
from node_firmware_sim.placement_events import EventPlan, PlacementEvent
from spar_wire.errors import WireError
from spar_wire.model_manifest import load_manifest
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.site_layout import NodeSpec, SiteLayout, load_site_layout
from testbed.aggregator_process import AggregatorProcess
from testbed.held_commit_aggregator import HELD_START, HELD_WINDOWS
from testbed.local_broker import BrokerSettings, LocalBroker
from testbed.machine import describe_machine

REPO = Path(__file__).resolve().parents[1]
FULL_SITE = REPO / "configs" / "sites" / "parking_lot.toml"
JOIN_SITE = REPO / "configs" / "trials" / "parking_lot_without_n08.toml"  # the lot before n08 is installed
DEFAULT_MODEL = REPO / "models" / "parking_lot" / "manifest.json"
JOIN_NODE = "n08"
HELD_COMMIT_ENTRY = ("-m", "testbed.held_commit_aggregator")
UNKNOWN_NODE_METRIC = 'spar_messages_rejected_total{reason="unknown_node"}'


def default_join() -> NodeSpec:
    """n08 where ``configs/sites/parking_lot.toml`` has it: the node the seven-node lot lacks."""
    return load_site_layout(FULL_SITE).node(JOIN_NODE)


@dataclass(frozen=True)
class FaultConfig:
    """One fault trial."""

    site: Path | None = None  # None: the seven-node lot when a node joins, else the full lot
    model: Path = DEFAULT_MODEL
    duration_s: float = 40.0  # trial time the nodes sample for (real time)
    broker_kills: int = 2  # SIGKILL + restart of Mosquitto, spread over the trial
    aggregator_kills: int = 1  # SIGKILL + restart of the aggregator process
    gap_kills: int = 1  # SIGKILL + restart while a closed window waits for its commit (see module doc)
    aggregator_restarts: int = 1  # SIGTERM (graceful stop with half-assembled windows) + start
    broker_down_s: float = 1.0  # how long the broker stays dead each time
    # With gap kills, every commit waits this long (the whole trial): long against the ~20 ms the
    # trial needs to see a held window on /metrics and kill, short against the 2 s window.
    commit_delay_s: float = 0.5
    gap_wait_s: float = 8.0  # a gap kill waits at most this long for a held window, then kills anyway
    join: NodeSpec | None = field(default_factory=default_join)  # a node the site lacks, joining; None: none
    join_at_s: float | None = None  # None: three quarters into the first window
    seed: int = 0
    deadline_fraction: float = 4.0  # x window length a window waits for stragglers (see module doc)
    # The aggregator's early close, the field default; off here (see the module doc), --early-close on.
    early_close: bool = False
    # Messages of a window arrive spread over ~1 s after it ends, so a fault hits half-assembled windows.
    link: LinkConfig = LinkConfig(delay_ms=500.0, jitter_ms=300.0)
    drain_timeout_s: float = 60.0  # after the nodes stop: wait this long for the last results
    ready_timeout_s: float = 60.0  # an aggregator process must be serving within this

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise BenchError(f"duration must be > 0 s, got {self.duration_s!r}")
        if min(self.broker_kills, self.aggregator_kills, self.gap_kills, self.aggregator_restarts) < 0:
            raise BenchError("kill and restart counts must be >= 0")
        if not 0 < self.broker_down_s < self.duration_s:
            raise BenchError(f"broker_down_s must be in (0, duration), got {self.broker_down_s!r}")
        if not (math.isfinite(self.commit_delay_s) and self.commit_delay_s >= 0):
            raise BenchError(f"commit_delay_s must be >= 0, got {self.commit_delay_s!r}")
        if self.gap_kills and self.commit_delay_s == 0:
            raise BenchError("kills between window close and commit need a commit delay > 0 to land there")
        if not (math.isfinite(self.gap_wait_s) and self.gap_wait_s > 0):
            raise BenchError(f"gap_wait_s must be > 0, got {self.gap_wait_s!r}")
        if self.join_at_s is not None and not (math.isfinite(self.join_at_s) and 0 < self.join_at_s < self.duration_s):
            raise BenchError(f"join_at_s must be inside the trial (0, {self.duration_s:g}), got {self.join_at_s!r}")
        if self.site is None:
            object.__setattr__(self, "site", JOIN_SITE if self.join is not None else FULL_SITE)

    def join_event(self, window_s: float) -> PlacementEvent | None:
        """The join as a field-runner event. By default three quarters into the first window: no
        window's messages are on their way yet, so only that window is awaited for the new node (which
        samples from the next one), and it is stored partial before the first fault (see the module doc)."""
        if self.join is None:
            return None
        at_s = 0.75 * window_s if self.join_at_s is None else self.join_at_s
        return PlacementEvent("join", self.join.id, at_s, self.join.position, self.join.description,
                              self.join.modalities)


def run_fault_trial(config: FaultConfig, workdir: Path,
                    progress: Callable[[str], None] = lambda line: None) -> FaultReport:
    """Run one fault trial in ``workdir`` (broker files, aggregator config, log and database)."""
    layout = load_site_layout(config.site)
    _schedule(config, _window_ns(layout) / 1e9)  # a schedule that cannot work fails before anything starts
    try:
        manifest = load_manifest(config.model)
    except WireError as exc:
        raise BenchError(str(exc)) from None
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / "results.sqlite3"
    for stale in workdir.glob(database.name + "*"):  # the -wal of an earlier run would be replayed into it
        stale.unlink()
    started = time.monotonic()
    broker = LocalBroker(BrokerSettings(autosave_on_changes=True, autosave_interval_s=1), workdir / "broker")
    log_path = workdir / "aggregator.log"
    entry = ((*HELD_COMMIT_ENTRY, "--commit-delay", str(config.commit_delay_s), "--hold-file",
              str(hold_file_of(workdir))) if config.gap_kills else None)
    hold_file_of(workdir).unlink(missing_ok=True)
    with broker:
        log_path.unlink(missing_ok=True)
        aggregator = AggregatorProcess(_write_aggregator_config(config, workdir, broker.port, database), log_path,
                                       ready_timeout_s=config.ready_timeout_s,
                                       **({"entry": entry} if entry else {}))
        try:
            aggregator.start()
            summary, events = _run_with_faults(config, layout, broker, aggregator, database, progress)
            window_ns = _window_ns(layout)
            expected = acked_keys(summary, window_ns)
            drain(database, expected, window_ns, summary.start_epoch_ns, config.drain_timeout_s)
            counts = _counters(aggregator.metrics_text() or "")
            exit_code = aggregator.stop()
            # Its own "stopped:" line only after a clean exit (otherwise the last one is an earlier process's).
            final = aggregator.final_counts() if exit_code == 0 else {}
            last_unknown = final.get("rejected.unknown_node", int(counts.get(UNKNOWN_NODE_METRIC, 0)))
        finally:
            aggregator.kill()
    report = _analyse(config, layout, summary, events, database, exit_code, counts)
    if report.join is not None:
        report.join = join_outcome(report.join, events, last_unknown, aggregator.log_text())
    report.model = f"{manifest.name}@{manifest.version} (`{_shown(config.model)}`, ONNX Runtime)"
    report.machine = describe_machine(versions("onnxruntime"))
    report.elapsed_s = round(time.monotonic() - started, 1)
    return report


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# --------------------------------------------------------------------------- the aggregator process
def _counters(metrics_text: str) -> dict[str, float]:
    """The spar_* counters of a /metrics page (histograms left out)."""
    counts: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("spar_") and not line.startswith(("spar_inference", "spar_added", "spar_end")):
            name, _, value = line.rpartition(" ")
            counts[name] = float(value)
    return counts


def _write_aggregator_config(config: FaultConfig, workdir: Path, port: int, database: Path) -> Path:
    path = workdir / "aggregator.toml"
    path.write_text(
        "[aggregator]\n"
        f'site = "{Path(config.site).resolve()}"\nmodel = "{Path(config.model).resolve()}"\n'
        f'database = "{database}"\nbackend = "onnxruntime"\nmetrics_port = 0\n'
        f"deadline_fraction = {config.deadline_fraction}\nearly_close = {str(config.early_close).lower()}\n"
        # The faults decide what survives: retention must not delete anything meanwhile.
        "retention_rows = 10000000\nretention_days = 3650\n"
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nreconnect_min_s = 0.5\nreconnect_max_s = 1.0\n')
    return path


# --------------------------------------------------------------------------- the trial
def _schedule(config: FaultConfig, window_s: float) -> list[tuple[float, str]]:
    """Fault times spread over the middle of the trial, the kinds interleaved, each 0.5 s after a
    window ended: the moment its messages are on their way and the window is half assembled. With
    a join, not before the window its birth falls in is stored (see the module doc). BenchError when
    the faults would come closer than 1.5 windows (each takes a second or two to recover)."""
    kinds = _interleave(config.broker_kills, config.aggregator_kills, config.aggregator_restarts, config.gap_kills)
    n = len(kinds)
    first, last = 0.15 * config.duration_s, 0.75 * config.duration_s
    join = config.join_event(window_s)
    if join is not None:
        # Its window ends, its messages arrive within about a second, it waits for its deadline; 1 s margin.
        stored_s = math.ceil(join.at_s / window_s - 1e-9) * window_s + 1.0 + config.deadline_fraction * window_s + 1.0
        first = max(first, stored_s)
    if n and (last - first) / n < 1.5 * window_s:
        raise BenchError(f"{n} faults between {first:g} s and {last:g} s of a {config.duration_s:g} s trial come "
                         f"closer than 1.5 windows ({1.5 * window_s:g} s): lengthen the trial or ask for fewer faults"
                         + (" (with a join they start once its window is stored)" if join else ""))
    times = [first + (last - first) * (i + 0.5) / n for i in range(n)]
    return [(max(1, round(t / window_s)) * window_s + 0.5, kind) for t, kind in zip(times, kinds, strict=True)]


def _interleave(brokers: int, aggregators: int, restarts: int = 0, gaps: int = 0) -> list[str]:
    """Every kind spread evenly over the sequence (by their fractional position)."""
    keyed = []
    for kind, count in (("broker", brokers), ("aggregator", aggregators), ("restart", restarts), ("gap", gaps)):
        keyed += [((i + 0.5) / count, kind) for i in range(count)]
    return [kind for _, kind in sorted(keyed)]


def _run_with_faults(config: FaultConfig, layout: SiteLayout, broker: LocalBroker, aggregator: AggregatorProcess,
                     database: Path, progress: Callable[[str], None]) -> tuple[FieldSummary, list[FaultEvent]]:
    mqtt = MqttSettings(host="127.0.0.1", port=broker.port, reconnect_min_s=0.5, reconnect_max_s=1.0)
    window_s = _window_ns(layout) / 1e9
    join = config.join_event(window_s)
    try:
        field_config = FieldConfig(layout=layout, source=SourceSpec("sine", config.seed),
                                   duration_s=config.duration_s, link=config.link, mqtt=mqtt, realtime=True,
                                   record_acks=True, ack_timeout_s=30.0, events=(join,) if join else ())
    except NodeError as exc:
        raise BenchError(f"the join does not fit the trial: {exc}") from None
    outcome: dict[str, Any] = {}

    def nodes() -> None:
        try:
            outcome["summary"] = run_field(field_config)
        except Exception as exc:  # noqa: BLE001 - re-raised in the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=nodes, name="fault-trial-nodes", daemon=True)
    begun = time.monotonic()
    thread.start()
    if join is not None:
        progress(f"t={join.at_s:5.1f} s: {join.node} joins")
    events = []
    for t_s, kind in _schedule(config, window_s):
        time.sleep(max(0.0, begun + t_s - time.monotonic()))
        if not thread.is_alive():
            break
        events.append(_inject(kind, t_s, config, broker, aggregator, database, window_s))
        event = events[-1]
        what = {"gap": "aggregator killed between close and commit "
                       f"({'landed in the gap' if event.in_gap else 'missed the gap'})"}.get(kind, f"{kind} killed")
        progress(f"t={t_s:5.1f} s: {what}, back after {event.recovered_s:.1f} s")
    thread.join(config.duration_s + 120.0)
    if "error" in outcome:
        raise BenchError(f"the nodes failed: {outcome['error']}") from outcome["error"]
    if "summary" not in outcome:
        raise BenchError("the nodes did not finish in time")
    return outcome["summary"], events


def _inject(kind: str, t_s: float, config: FaultConfig, broker: LocalBroker, aggregator: AggregatorProcess,
            database: Path, window_s: float) -> FaultEvent:
    begun = time.monotonic()
    event = FaultEvent(round(t_s, 2), kind)
    if kind == "broker":
        broker.kill()
        time.sleep(config.broker_down_s)
        broker.restart()
    elif kind == "aggregator":
        # Its counters just before the kill: a SIGKILLed process leaves none behind.
        event.unknown_node = int(_counters(aggregator.metrics_text() or "").get(UNKNOWN_NODE_METRIC, 0))
        aggregator.kill()
        event.down_ns = time.time_ns()
        aggregator.start()
    elif kind == "gap":
        _kill_in_gap(event, config, aggregator, database, window_s, hold_file_of(database.parent))
        aggregator.start()
    else:
        exit_code = aggregator.stop()
        if exit_code != 0:
            raise BenchError(f"the aggregator exited with {exit_code} on SIGTERM")
        event.down_ns = time.time_ns()
        event.unknown_node = aggregator.final_counts().get("rejected.unknown_node", 0)
        aggregator.start()
    event.recovered_s = round(time.monotonic() - begun, 2)
    return event


def hold_file_of(workdir: Path) -> Path:
    """The file whose presence holds the held-commit aggregator's commits (``--hold-file``)."""
    return Path(workdir) / "hold-commits"


def _kill_in_gap(event: FaultEvent, config: FaultConfig, aggregator: AggregatorProcess, database: Path,
                 window_s: float, hold_file: Path) -> None:
    """SIGKILL the aggregator as soon as its /metrics shows a window held before its commit (or after
    ``gap_wait_s`` without one); then read SQLite: the kill landed in the gap if that window is not
    stored (the commit had not happened, or did not survive).

    The hold file keeps the commit waiting from the scrape to the kill, so a slow scrape on a busy
    machine cannot let the commit slip in between (the check on SQLite still decides ``in_gap``)."""
    deadline = time.monotonic() + config.gap_wait_s
    counts: dict[str, float] = {}
    hold_file.touch()
    try:
        while time.monotonic() < deadline:
            counts = _counters(aggregator.metrics_text(timeout_s=1.0) or "")
            if counts.get(HELD_WINDOWS) and counts.get(HELD_START):
                if not _stored(database, counts[HELD_START], window_s):
                    event.held_start_s = counts[HELD_START]
                    break
                # A window an earlier process stored (its messages redelivered): killing now proves
                # nothing about the gap. Let that commit through, then hold the next one.
                hold_file.unlink(missing_ok=True)
                time.sleep(0.2)
                hold_file.touch()
            time.sleep(0.01)
        aggregator.kill()
    finally:
        hold_file.unlink(missing_ok=True)
    event.down_ns = time.time_ns()
    event.unknown_node = int(counts.get(UNKNOWN_NODE_METRIC, 0))
    if event.held_start_s is not None:
        event.in_gap = not _stored(database, event.held_start_s, window_s)


def _stored(database: Path, window_start_s: float, window_s: float) -> bool:
    """Whether SQLite holds the result of the window starting at ``window_start_s``."""
    starts = [row.start_ns for row in stored_rows(database, int(window_s * 1e9), 0)]
    return any(abs(start - window_start_s * 1e9) < window_s * 1e9 / 2 for start in starts)


# --------------------------------------------------------------------------- accounting
def _window_ns(layout: SiteLayout) -> int:
    """The site's window length in ns (``SiteLayout.window_s``: one length for every modality)."""
    return int(round(layout.window_s() * 1e9))


def _analyse(config: FaultConfig, layout: SiteLayout, summary: FieldSummary, events: list[FaultEvent],
             database: Path, exit_code: int | None, counts: dict[str, Any]) -> FaultReport:
    """What the trial proved: the nodes' acknowledgements and the faults against what SQLite holds."""
    window_ns = _window_ns(layout)
    acked = acked_keys(summary, window_ns)
    stored = stored_rows(database, window_ns, summary.start_epoch_ns)
    delivered = delivered_keys(stored)
    join = config.join_event(window_ns / 1e9)
    plan = EventPlan(layout, (join,) if join else (), config.duration_s)
    node_ids = tuple(plan.nodes_layout.node_ids)
    per_window: dict[int, list[StoredRow]] = {}
    for row in stored:
        per_window.setdefault(row.window, []).append(row)
    for event in events:
        if event.held_start_s is not None:
            event.held_window = window_of(int(event.held_start_s * 1e9), summary.start_epoch_ns, window_ns)
    # A window is fully acknowledged when every message of the nodes sampling it was: the joined
    # node's only from its first window on.
    fully_acked = [w for w in range(summary.windows)
                   if all((n, m, w) in acked for n in plan.receivers(w, node_ids)
                          for m in plan.nodes_layout.node(n).modalities)]
    partial = join_windows(plan, per_window)

    def once(w: int) -> bool:
        rows = per_window.get(w, [])
        return len(rows) == 1 and (rows[0].complete or w in partial)

    landed = [e for e in events if e.kind == "gap" and e.in_gap]
    total = summary.total()
    report = FaultReport(
        config={k: _shown(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
        events=events, windows=summary.windows, produced=total.messages, acked=len(acked),
        delivered=len(acked & delivered), lost=sorted(f"{n}/{m}/{w}" for n, m, w in acked - delivered),
        unacked_delivered=len(delivered - acked), result_rows=len(stored),
        duplicate_results=len(stored) - len(per_window), windows_fully_acked=len(fully_acked),
        complete_once=sum(once(w) for w in fully_acked),
        integrity=integrity_check(database), aggregator_exit=exit_code, aggregator_counts=counts,
        gap_landed=len(landed), gap_stored_once=sum(once(e.held_window) for e in landed if e.held_window is not None))
    if join is not None:
        report.join = join_stored(join, plan, window_ns, summary, events, stored, acked, delivered, partial)
    return report


# --------------------------------------------------------------------------- command line
def register(subparsers: Any) -> None:
    """Add ``spar-bench faults`` to ``subparsers`` (``parser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "faults", help="kill the broker and the aggregator during a live trial; prove nothing acknowledged is lost",
        description="A live parking-lot site (real-time nodes, private Mosquitto saving after every change, the "
        "aggregator as its own process) while Mosquitto and the aggregator are SIGKILLed and restarted, once "
        "between a window's close and its commit (the aggregator's commits are then held --commit-delay "
        "seconds), and node n08 joins before the first fault (the trial starts with the seven other nodes). "
        "Every token message a node got a PUBACK for must be in exactly one stored result; no window may be "
        "stored twice; SQLite's integrity_check must pass; every aggregator start after the join must restore "
        "n08 from SQLite and refuse none of its messages as unknown_node. Exit code 1 when any of that fails. "
        "Writes faults.md/.json.")
    p.add_argument("--duration", type=float, default=40.0, help="trial seconds, real time (default: %(default)s)")
    p.add_argument("--broker-kills", type=int, default=2, help="broker SIGKILLs (default: %(default)s)")
    p.add_argument("--aggregator-kills", type=int, default=1, help="aggregator SIGKILLs (default: %(default)s)")
    p.add_argument("--gap-kills", type=int, default=1,
                   help="aggregator SIGKILLs between a window's close and its commit (default: %(default)s)")
    p.add_argument("--commit-delay", type=float, default=0.5,
                   help="with gap kills: seconds every commit is held, for the whole trial (default: %(default)s)")
    p.add_argument("--aggregator-restarts", type=int, default=1,
                   help="graceful aggregator restarts, SIGTERM then start (default: %(default)s)")
    p.add_argument("--broker-down", type=float, default=1.0,
                   help="seconds the broker stays dead each time (default: %(default)s)")
    p.add_argument("--early-close", action="store_true",
                   help="run the aggregator with its early window close (the field default; off here because "
                   "by design it makes about 1 %% of messages late, which this trial counts as lost)")
    p.add_argument("--no-join", action="store_true",
                   help="no joining node: the full eight-node lot from the start (default: n08 joins)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model manifest (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0, help="source seed (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="where faults.md/.json go (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=Path("benchmarks/.work/faults"),
                   help="broker files, aggregator log and database (default: %(default)s)")
    p.set_defaults(func=_cmd_faults)


def _cmd_faults(args: argparse.Namespace) -> int:
    join = {"join": None} if args.no_join else {}
    config = FaultConfig(model=args.model, duration_s=args.duration, broker_kills=args.broker_kills,
                         aggregator_kills=args.aggregator_kills, gap_kills=args.gap_kills,
                         commit_delay_s=args.commit_delay, aggregator_restarts=args.aggregator_restarts,
                         broker_down_s=args.broker_down, seed=args.seed, early_close=args.early_close, **join)
    workdir = args.workdir
    joining = "no join" if config.join is None else f"{config.join.id} joins"
    print(f"fault trial: {args.duration:g} s, {args.broker_kills} broker and {args.aggregator_kills} aggregator "
          f"kills, {args.gap_kills} between close and commit, {args.aggregator_restarts} graceful restarts, "
          f"{joining}; work files in {workdir}", file=sys.stderr)
    report = run_fault_trial(config, workdir, progress=progress)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.md").write_text(report.to_markdown())
    (args.out / "faults.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(report.to_markdown())
    if report.lost:
        print(f"lost: {', '.join(report.lost[:20])}", file=sys.stderr)
    return 0 if report.passed else 1
