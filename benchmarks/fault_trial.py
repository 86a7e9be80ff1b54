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
holds messages back by a few seconds, and a window should not close before they come.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.aggregator_process import AggregatorProcess
from benchmarks.errors import BenchError
from benchmarks.local_broker import BrokerSettings, LocalBroker
from node_firmware_sim.field_runner import FieldConfig, FieldSummary, SourceSpec, run_field
from node_firmware_sim.link_model import LinkConfig
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.site_layout import SiteLayout, load_site_layout

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SITE = REPO / "configs" / "sites" / "parking_lot.toml"
DEFAULT_MODEL = REPO / "models" / "parking_lot" / "manifest.json"


@dataclass(frozen=True)
class FaultConfig:
    """One fault trial."""

    site: Path = DEFAULT_SITE
    model: Path = DEFAULT_MODEL
    duration_s: float = 40.0  # trial time the nodes sample for (real time)
    broker_kills: int = 2  # SIGKILL + restart of Mosquitto, spread over the trial
    aggregator_kills: int = 1  # SIGKILL + restart of the aggregator process
    aggregator_restarts: int = 1  # SIGTERM (graceful stop with half-assembled windows) + start
    broker_down_s: float = 1.0  # how long the broker stays dead each time
    seed: int = 0
    deadline_fraction: float = 4.0  # x window length a window waits for stragglers (see module doc)
    # Messages of a window arrive spread over ~1 s after it ends, so a fault hits half-assembled windows.
    link: LinkConfig = LinkConfig(delay_ms=500.0, jitter_ms=300.0)
    drain_timeout_s: float = 60.0  # after the nodes stop: wait this long for the last results
    ready_timeout_s: float = 60.0  # an aggregator process must be serving within this

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise BenchError(f"duration must be > 0 s, got {self.duration_s!r}")
        if min(self.broker_kills, self.aggregator_kills, self.aggregator_restarts) < 0:
            raise BenchError("kill and restart counts must be >= 0")
        if not 0 < self.broker_down_s < self.duration_s:
            raise BenchError(f"broker_down_s must be in (0, duration), got {self.broker_down_s!r}")


@dataclass
class FaultEvent:
    t_s: float  # trial time the fault was injected
    kind: str  # "broker" | "aggregator" (both SIGKILL) | "restart" (aggregator SIGTERM, then start)
    recovered_s: float = 0.0  # until the broker listened again / the new aggregator process served


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
    complete_once: int  # of those, stored exactly once and complete
    integrity: str  # PRAGMA integrity_check
    aggregator_exit: int | None  # exit code of the last aggregator process after SIGTERM
    aggregator_counts: dict[str, Any] = field(default_factory=dict)  # the last process's counters
    elapsed_s: float = 0.0

    @property
    def passed(self) -> bool:
        # Not vacuous: most messages must have been acknowledged (a trial where nodes got no PUBACK
        # would otherwise lose "nothing").
        return (not self.lost and self.duplicate_results == 0 and self.integrity == "ok"
                and self.complete_once == self.windows_fully_acked and self.aggregator_exit == 0
                and self.acked >= 0.9 * self.produced and self.windows_fully_acked > 0)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}

    def to_markdown(self) -> str:
        kinds = ("broker", "aggregator", "restart")
        kills = {kind: sum(e.kind == kind for e in self.events) for kind in kinds}
        recover = {kind: max((e.recovered_s for e in self.events if e.kind == kind), default=0.0) for kind in kinds}
        rows = [
            ("broker SIGKILL + restart", f"{kills['broker']} (back within {recover['broker']:.1f} s)"),
            ("aggregator SIGKILL + restart", f"{kills['aggregator']} (serving again within "
                                             f"{recover['aggregator']:.1f} s)"),
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
        lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
        verdict = "**passed**" if self.passed else "**FAILED**"
        return "\n".join([f"Fault trial of {self.config['duration_s']:g} s: {verdict}", "", *lines]) + "\n"


def run_fault_trial(config: FaultConfig, workdir: Path,
                    progress: Callable[[str], None] = lambda line: None) -> FaultReport:
    """Run one fault trial in ``workdir`` (broker files, aggregator config, log and database)."""
    layout = load_site_layout(config.site)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / "results.sqlite3"
    for stale in workdir.glob(database.name + "*"):  # the -wal of an earlier run would be replayed into it
        stale.unlink()
    started = time.monotonic()
    broker = LocalBroker(BrokerSettings(autosave_on_changes=True, autosave_interval_s=1), workdir / "broker")
    with broker:
        (workdir / "aggregator.log").unlink(missing_ok=True)
        aggregator = AggregatorProcess(_write_aggregator_config(config, workdir, broker.port, database),
                                       workdir / "aggregator.log", ready_timeout_s=config.ready_timeout_s)
        try:
            aggregator.start()
            summary, events = _run_with_faults(config, layout, broker, aggregator, progress)
            window_ns = _window_ns(layout)
            expected = _acked_keys(summary, window_ns)
            _drain(database, expected, window_ns, summary.start_epoch_ns, config.drain_timeout_s)
            counts = _counters(aggregator.metrics_text() or "")
            exit_code = aggregator.stop()
        finally:
            aggregator.kill()
    report = _analyse(config, layout, summary, events, database, exit_code, counts)
    report.elapsed_s = round(time.monotonic() - started, 1)
    return report


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
        f"deadline_fraction = {config.deadline_fraction}\n"
        # The faults decide what survives: retention must not delete anything meanwhile.
        "retention_rows = 10000000\nretention_days = 3650\n"
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nreconnect_min_s = 0.5\nreconnect_max_s = 1.0\n')
    return path


# --------------------------------------------------------------------------- the trial
def _schedule(config: FaultConfig, window_s: float) -> list[tuple[float, str]]:
    """Fault times spread over the middle of the trial, the kinds interleaved, each 0.5 s after a
    window ended: the moment its messages are on their way and the window is half assembled."""
    kinds = _interleave(config.broker_kills, config.aggregator_kills, config.aggregator_restarts)
    n = len(kinds)
    first, last = 0.15 * config.duration_s, 0.75 * config.duration_s
    times = [first + (last - first) * (i + 0.5) / n for i in range(n)]
    return [(max(1, round(t / window_s)) * window_s + 0.5, kind) for t, kind in zip(times, kinds, strict=True)]


def _interleave(brokers: int, aggregators: int, restarts: int = 0) -> list[str]:
    """Every kind spread evenly over the sequence (by their fractional position)."""
    keyed = []
    for kind, count in (("broker", brokers), ("aggregator", aggregators), ("restart", restarts)):
        keyed += [((i + 0.5) / count, kind) for i in range(count)]
    return [kind for _, kind in sorted(keyed)]


def _run_with_faults(config: FaultConfig, layout: SiteLayout, broker: LocalBroker, aggregator: AggregatorProcess,
                     progress: Callable[[str], None]) -> tuple[FieldSummary, list[FaultEvent]]:
    mqtt = MqttSettings(host="127.0.0.1", port=broker.port, reconnect_min_s=0.5, reconnect_max_s=1.0)
    field_config = FieldConfig(layout=layout, source=SourceSpec("sine", config.seed), duration_s=config.duration_s,
                               link=config.link, mqtt=mqtt, realtime=True, record_acks=True, ack_timeout_s=30.0)
    outcome: dict[str, Any] = {}

    def nodes() -> None:
        try:
            outcome["summary"] = run_field(field_config)
        except Exception as exc:  # noqa: BLE001 - re-raised in the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=nodes, name="fault-trial-nodes", daemon=True)
    begun = time.monotonic()
    thread.start()
    events = []
    for t_s, kind in _schedule(config, _window_ns(layout) / 1e9):
        time.sleep(max(0.0, begun + t_s - time.monotonic()))
        if not thread.is_alive():
            break
        events.append(_inject(kind, t_s, config, broker, aggregator))
        progress(f"t={t_s:5.1f} s: {kind} killed, back after {events[-1].recovered_s:.1f} s")
    thread.join(config.duration_s + 120.0)
    if "error" in outcome:
        raise BenchError(f"the nodes failed: {outcome['error']}") from outcome["error"]
    if "summary" not in outcome:
        raise BenchError("the nodes did not finish in time")
    return outcome["summary"], events


def _inject(kind: str, t_s: float, config: FaultConfig, broker: LocalBroker,
            aggregator: AggregatorProcess) -> FaultEvent:
    begun = time.monotonic()
    if kind == "broker":
        broker.kill()
        time.sleep(config.broker_down_s)
        broker.restart()
    elif kind == "aggregator":
        aggregator.kill()
        aggregator.start()
    else:
        exit_code = aggregator.stop()
        if exit_code != 0:
            raise BenchError(f"the aggregator exited with {exit_code} on SIGTERM")
        aggregator.start()
    return FaultEvent(round(t_s, 2), kind, round(time.monotonic() - begun, 2))


# --------------------------------------------------------------------------- accounting
def _window_ns(layout: SiteLayout) -> int:
    return int(round(next(iter(layout.modalities.values())).features.window_s * 1e9))


def _acked_keys(summary: FieldSummary, window_ns: int) -> set[tuple[str, str, int]]:
    keys = set()
    for node, s in summary.nodes.items():
        for modality, start_ns in s.acked_frames or ():
            keys.add((node, modality, _window_of(start_ns, summary.start_epoch_ns, window_ns)))
    return keys


def _window_of(start_ns: int, epoch_ns: int, window_ns: int) -> int:
    return int(round((start_ns - epoch_ns) / window_ns))


def _stored(database: Path, window_ns: int, epoch_ns: int) -> list[tuple[int, bool, set[tuple[str, str]]]]:
    """(window, complete, {(node, modality)}) per stored row, read like any other reader would."""
    if not database.exists():
        return []
    conn = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute("SELECT payload FROM results ORDER BY id").fetchall()
    except sqlite3.Error:
        return []
    finally:
        conn.close()
    stored = []
    for (payload,) in rows:
        result = json.loads(payload)
        present = {(node, modality) for modality, nodes in result["present"].items() for node in nodes}
        stored.append((_window_of(result["window_start_ns"], epoch_ns, window_ns), bool(result["complete"]), present))
    return stored


def _delivered(stored: list[tuple[int, bool, set[tuple[str, str]]]]) -> set[tuple[str, str, int]]:
    return {(node, modality, window) for window, _, present in stored for node, modality in present}


def _drain(database: Path, expected: set[tuple[str, str, int]], window_ns: int, epoch_ns: int,
           timeout_s: float) -> None:
    """Wait until every acknowledged message is in a stored result (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if expected <= _delivered(_stored(database, window_ns, epoch_ns)):
            return
        time.sleep(0.25)


def _analyse(config: FaultConfig, layout: SiteLayout, summary: FieldSummary, events: list[FaultEvent],
             database: Path, exit_code: int | None, counts: dict[str, Any]) -> FaultReport:
    window_ns = _window_ns(layout)
    acked = _acked_keys(summary, window_ns)
    stored = _stored(database, window_ns, summary.start_epoch_ns)
    delivered = _delivered(stored)
    pairs = {(node.id, modality) for node in layout.nodes for modality in node.modalities}
    per_window: dict[int, list[bool]] = {}
    for window, complete, _ in stored:
        per_window.setdefault(window, []).append(complete)
    fully_acked = [w for w in range(summary.windows) if all((n, m, w) in acked for n, m in pairs)]
    total = summary.total()
    return FaultReport(
        config={k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
        events=events, windows=summary.windows, produced=total.messages, acked=len(acked),
        delivered=len(acked & delivered), lost=sorted(f"{n}/{m}/{w}" for n, m, w in acked - delivered),
        unacked_delivered=len(delivered - acked), result_rows=len(stored),
        duplicate_results=len(stored) - len(per_window), windows_fully_acked=len(fully_acked),
        complete_once=sum(per_window.get(w) == [True] for w in fully_acked),
        integrity=_integrity(database), aggregator_exit=exit_code, aggregator_counts=counts)


def _integrity(database: Path) -> str:
    try:
        conn = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"error: {exc}"


# --------------------------------------------------------------------------- command line
def add_faults_parser(sub: Any) -> None:
    """``spar-bench faults``."""
    p = sub.add_parser(
        "faults", help="kill the broker and the aggregator during a live trial; prove nothing acknowledged is lost",
        description="A live parking-lot site (real-time nodes, private Mosquitto saving after every change, the "
        "aggregator as its own process) while Mosquitto and the aggregator are SIGKILLed and restarted. Every "
        "token message a node got a PUBACK for must be in exactly one stored result; no window may be stored "
        "twice; SQLite's integrity_check must pass. Exit code 1 when any of that fails. Writes faults.md/.json.")
    p.add_argument("--duration", type=float, default=40.0, help="trial seconds, real time (default: %(default)s)")
    p.add_argument("--broker-kills", type=int, default=2, help="broker SIGKILLs (default: %(default)s)")
    p.add_argument("--aggregator-kills", type=int, default=1, help="aggregator SIGKILLs (default: %(default)s)")
    p.add_argument("--aggregator-restarts", type=int, default=1,
                   help="graceful aggregator restarts, SIGTERM then start (default: %(default)s)")
    p.add_argument("--broker-down", type=float, default=1.0,
                   help="seconds the broker stays dead each time (default: %(default)s)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model manifest (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0, help="source seed (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="where faults.md/.json go (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=Path("benchmarks/.work/faults"),
                   help="broker files, aggregator log and database (default: %(default)s)")
    p.set_defaults(func=_cmd_faults)


def _cmd_faults(args: Any) -> int:
    config = FaultConfig(model=args.model, duration_s=args.duration, broker_kills=args.broker_kills,
                         aggregator_kills=args.aggregator_kills, aggregator_restarts=args.aggregator_restarts,
                         broker_down_s=args.broker_down, seed=args.seed)
    workdir = args.workdir
    print(f"fault trial: {args.duration:g} s, {args.broker_kills} broker and {args.aggregator_kills} aggregator "
          f"kills, {args.aggregator_restarts} graceful restarts; work files in {workdir}", file=sys.stderr)
    report = run_fault_trial(config, workdir, progress=lambda line: print(f"... {line}", file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.md").write_text(report.to_markdown())
    (args.out / "faults.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(report.to_markdown())
    if report.lost:
        print(f"lost: {', '.join(report.lost[:20])}", file=sys.stderr)
    return 0 if report.passed else 1
