"""``spar-trial run``: one simulated field trial, end to end, on this machine.

A broker (a private Mosquitto, the embedded amqtt broker, or one you give), the real aggregator
(``edge_runtime.service.Aggregator`` with its SQLite store) and every node of the site through the
lossy link model, for a set duration. Everything a report needs is written to the trial folder as
the trial runs, so the report can be rebuilt later (``spar-trial report``) and a Ctrl-C still
leaves a consistent folder:

    config.json      what was asked for (and the seed: trials are reproducible)
    link.jsonl       every link decision (node, modality, seq, bytes, outcome, delivery times)
    truth.jsonl      the simulator's ground truth per window
    results.sqlite3  the aggregator's results, exactly as it stores them in the field
    field.json       the nodes' counters (messages, bytes, outage buffer, PUBACKs)
    aggregator.json  the aggregator's counters (accepted, rejected by reason, late, duplicates, ...)

Placement events (``TrialConfig.events``; see ``node_firmware_sim.placement_events``) let nodes join or move
while the trial runs; they are checked against the site and the model before anything starts.

``speed`` > 1 compresses the whole timeline (windows, link delays, outages and the aggregator's
deadline alike), for benchmarks that need many windows; a field-like trial runs at 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.config import AggregatorConfig
from edge_runtime.errors import AggregatorError
from node_firmware_sim.errors import NodeError
from node_firmware_sim.field_runner import FieldConfig, FieldSummary, SourceSpec, run_field
from node_firmware_sim.firmware import FirmwareConfig
from node_firmware_sim.link_model import LinkConfig, load_link_config
from node_firmware_sim.placement_events import PlacementEvent, check_events, parse_event
from node_firmware_sim.scenarios import SCENARIOS
from spar_wire.codecs import CodecSpec
from spar_wire.errors import WireError
from spar_wire.model_manifest import load_manifest
from spar_wire.mqtt_settings import PROTOCOLS, MqttSettings
from spar_wire.site_layout import SiteLayout, load_site_layout
from trials.errors import TrialError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SITE = REPO / "configs" / "sites" / "parking_lot.toml"
DEFAULT_MODEL = REPO / "models" / "parking_lot" / "manifest.json"
# The shipped model of each scenario that has one (a trial of another scenario names its --model).
SHIPPED_MODELS = {"parking_lot": DEFAULT_MODEL,
                  "earthquakes": REPO / "models" / "ridgecrest_like" / "manifest.json"}
# A busy lot (the parking-lot scenario with max_vehicles > 1) runs the multi-vehicle detector.
BUSY_LOT_MODEL = REPO / "models" / "parking_lot_multi" / "manifest.json"

# The files of a trial folder (see the module docstring).
CONFIG_FILE, LINK_LOG, TRUTH_LOG = "config.json", "link.jsonl", "truth.jsonl"
DATABASE, FIELD_FILE, AGGREGATOR_FILE = "results.sqlite3", "field.json", "aggregator.json"


@dataclass(frozen=True)
class TrialConfig:
    """One trial. Paths may be relative to the working directory."""

    out: Path  # trial folder (created; refused when it already holds a trial, unless overwrite)
    site: Path = DEFAULT_SITE
    scenario: str = "parking_lot"
    scenario_params: dict[str, Any] = field(default_factory=dict)
    model: Path = DEFAULT_MODEL  # manifest.json of the model the aggregator runs
    link: Path | None = None  # link config TOML; None: a perfect link
    link_config: LinkConfig | None = None  # or the link itself (benchmarks sweep these)
    duration_s: float = 60.0  # trial time
    codec: str = "webp:85"
    seed: int = 0
    speed: float = 1.0  # trial seconds per wall-clock second
    broker: str = "auto"  # auto | mosquitto | amqtt | HOST:PORT of a running broker
    protocol: str | None = None  # MQTT protocol for HOST:PORT ("5" or "3.1.1"; default "5")
    backend: str = "auto"  # auto | onnxruntime | tensorrt
    deadline_fraction: float = 0.5  # the aggregator closes a window this x window length after its first message
    # Compress the deadline with the timeline (speed != 1). Off for series whose links have no timing
    # effects: a deadline of a few tens of ms would then measure this machine's load, not the link.
    scale_deadline: bool = True
    # The aggregator closes a window once nothing more will come (its learned arrival lags) instead of
    # always waiting for the deadline; off: the deadline-only policy, for comparisons.
    early_close: bool = True
    clock_offset_std_ms: float = 0.0
    overwrite: bool = False
    # Nodes joining or moving during the trial (PlacementEvent, or mappings with its fields).
    events: tuple[PlacementEvent, ...] = ()
    # A recordings TOML (node_firmware_sim.scenarios.recording_replay) replayed instead of the
    # scenario: no ground truth, so the report lists the model's outputs instead of scoring them.
    recordings: Path | None = None

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise TrialError(f"unknown scenario {self.scenario!r}; known: {', '.join(sorted(SCENARIOS))}")
        for name in ("duration_s", "speed", "deadline_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise TrialError(f"{name} must be a finite number > 0, got {value!r}")
        if self.clock_offset_std_ms < 0:
            raise TrialError(f"clock_offset_std_ms must be >= 0, got {self.clock_offset_std_ms!r}")
        if self.link is not None and self.link_config is not None:
            raise TrialError("give link (a TOML file) or link_config, not both")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise TrialError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        try:
            CodecSpec.parse(self.codec)
        except WireError as exc:
            raise TrialError(f"codec: {exc}") from None
        try:
            events = tuple(parse_event(e, f"events[{i}]") for i, e in enumerate(self.events))
        except NodeError as exc:
            raise TrialError(str(exc)) from None
        object.__setattr__(self, "events", events)
        for event in events:  # the rest needs the site: check_events, before the trial starts
            if event.at_s >= self.duration_s:
                raise TrialError(f"{event.kind} of node {event.node} at {event.at_s:g} s: the trial lasts "
                                 f"{self.duration_s:g} s; an event must happen during it")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("out", "site", "model", "link", "recordings"):
            data[key] = None if data[key] is None else str(data[key])
        return data


@dataclass
class TrialOutcome:
    """What ``run_trial`` hands back: the folder, and how the run ended."""

    folder: Path
    field: FieldSummary | None  # None when interrupted before the nodes finished
    interrupted: bool
    broker: str  # "mosquitto 127.0.0.1:PORT" / "amqtt ..." / "external HOST:PORT"
    wall_s: float


class TrialMonitor:
    """Live state of a running trial for a view: progress, ground truth by window, recent results.

    The field runner calls ``on_progress``/``on_truth`` from the trial thread; a view thread reads
    ``snapshot``. Everything here is cheap and bounded (the last ``keep`` windows of truth).
    """

    def __init__(self, layout: SiteLayout, config: TrialConfig, keep: int = 256):
        self.layout = layout
        self.config = config
        self.aggregator: Any | None = None
        self.started = time.monotonic()
        self.windows_done = 0
        self.windows_total = 0
        self.stage = "starting"
        self._truth: dict[int, dict[str, Any]] = {}
        self._keep = keep
        self._lock = threading.Lock()

    def on_progress(self, done: int, total: int) -> None:
        self.windows_done, self.windows_total = done, total

    def on_truth(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._truth[record["window_start_ns"]] = record
            if len(self._truth) > self._keep:
                del self._truth[min(self._truth)]

    def truth_for(self, window_start_ns: int, window_ns: int) -> dict[str, Any] | None:
        """The truth record whose window start is nearest ``window_start_ns`` (within half a window)."""
        with self._lock:
            if not self._truth:
                return None
            nearest = min(self._truth, key=lambda start: abs(start - window_start_ns))
            return self._truth[nearest] if abs(nearest - window_start_ns) <= window_ns // 2 else None


def run_trial(config: TrialConfig, monitor: TrialMonitor | None = None,
              progress: Callable[[str], None] = lambda text: None) -> TrialOutcome:
    """Run one trial and leave its files in ``config.out`` (see the module docstring).

    Ctrl-C (KeyboardInterrupt) during the trial stops the nodes, lets the aggregator store what it
    received, and returns with ``interrupted=True``; the folder is as complete as the trial was.
    """
    layout = monitor.layout if monitor is not None else load_layout(config.site)
    link = config.link_config or (_load_link(config.link) if config.link else LinkConfig())
    if config.events:
        try:
            check_events(config.events, layout, config.duration_s, _max_nodes(config.model))
        except NodeError as exc:
            raise TrialError(str(exc)) from None
    if config.recordings is not None:
        _check_recordings(config.recordings, layout)
    folder = _prepare_folder(config)
    monitor = monitor or TrialMonitor(layout, config)
    started = time.monotonic()
    field_summary, interrupted = None, False
    with contextlib.ExitStack() as stack:
        broker_label, mqtt = _open_broker(config, folder, stack)
        progress(f"broker: {broker_label}")
        aggregator = _start_aggregator(config, folder, mqtt, stack)
        if aggregator.dashboard is not None:
            progress(f"dashboard: {aggregator.metrics.url}/ (live while the trial runs)")
        monitor.aggregator = aggregator
        monitor.stage = "running"
        field_config = _field_config(config, layout, link, mqtt, folder)
        try:
            field_summary = run_field(field_config, monitor.on_progress, monitor.on_truth)
        except KeyboardInterrupt:
            interrupted = True
            progress("interrupted: stopping the nodes, storing what arrived")
        monitor.stage = "draining"
        expected = field_summary.total().published if field_summary else None
        _wait_for_ingest(aggregator, expected, settle_s=max(0.3, 1.0 / config.speed))
        aggregator.stop(flush_open=True)
        _write_json(folder / AGGREGATOR_FILE, _aggregator_counts(aggregator))
        if field_summary is not None:
            _write_json(folder / FIELD_FILE, field_summary.to_dict())
    monitor.stage = "interrupted" if interrupted else "done"
    return TrialOutcome(folder, field_summary, interrupted, broker_label, time.monotonic() - started)


# --------------------------------------------------------------------------- set-up
def load_layout(path: Path) -> SiteLayout:
    """The site layout, or a TrialError saying what is wrong with the file."""
    try:
        return load_site_layout(path)
    except WireError as exc:
        raise TrialError(str(exc)) from None


def _check_recordings(path: Path, layout: SiteLayout) -> None:
    """Refuse unreadable recordings before a broker and an aggregator are started for them."""
    import logging

    from node_firmware_sim.scenarios import recording_replay

    replay_log = logging.getLogger(recording_replay.__name__)
    replay_log.disabled = True  # the trial's own load warns about the same files
    try:
        recording_replay.load_recordings(path, layout)
    except NodeError as exc:
        raise TrialError(str(exc)) from None
    finally:
        replay_log.disabled = False


def _load_link(path: Path) -> LinkConfig:
    try:
        return load_link_config(path)
    except NodeError as exc:
        raise TrialError(str(exc)) from None


def _prepare_folder(config: TrialConfig) -> Path:
    """The trial folder, emptied of an earlier trial only when ``overwrite`` says so."""
    folder = Path(config.out)
    if (folder / CONFIG_FILE).exists():
        if not config.overwrite:
            raise TrialError(f"{folder} already holds a trial; choose another --out or pass --overwrite")
        for name in (CONFIG_FILE, LINK_LOG, TRUTH_LOG, DATABASE, FIELD_FILE, AGGREGATOR_FILE,
                     DATABASE + "-wal", DATABASE + "-shm"):
            (folder / name).unlink(missing_ok=True)
    # A broker's persistence left by an earlier trial here would resume that trial's sessions and
    # hand their queued messages to this one.
    shutil.rmtree(folder / "broker", ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / CONFIG_FILE, {**config.to_dict(), "model_sha256": model_digest(config.model)})
    return folder


def model_label(manifest_path: Path) -> str:
    """``name version (folder, budget)`` from a manifest, for results files: a figure must say which
    model it was measured with."""
    try:
        data = json.loads(Path(manifest_path).read_text())
        model, training = data["model"], data.get("training", {})
    except (OSError, ValueError, KeyError, TypeError):
        return f"{Path(manifest_path).parent.name} (manifest unreadable)"
    budget = f", `{training['budget']}` budget" if "budget" in training else ""
    return f"{model.get('name', '?')} {model.get('version', '?')} ({Path(manifest_path).parent.name}{budget})"


def model_digest(manifest_path: Path) -> str | None:
    """The sha256 of the model artifact as its manifest records it (None when unreadable): a
    retrained model under the same path is a different trial."""
    try:
        return json.loads(Path(manifest_path).read_text())["artifact"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _open_broker(config: TrialConfig, folder: Path, stack: contextlib.ExitStack) -> tuple[str, MqttSettings]:
    """Start (or point at) the broker; returns its label and the clients' MQTT settings."""
    if ":" in config.broker:
        host, _, port = config.broker.rpartition(":")
        if not port.isdigit():
            raise TrialError(f"broker must be auto, mosquitto, amqtt or HOST:PORT, got {config.broker!r}")
        protocol = config.protocol or "5"
        return f"external {host}:{port} (MQTT {protocol})", MqttSettings(host=host, port=int(port), protocol=protocol)
    from testbed.broker_choice import start_broker
    from testbed.errors import TestbedError

    try:
        broker = start_broker(config.broker, workdir=folder / "broker")
    except TestbedError as exc:  # the trial's own error type: spar-trial reports it and exits 2
        raise TrialError(str(exc)) from None
    stack.callback(broker.close)
    kind = "mosquitto" if broker.protocol == "5" else "amqtt (embedded)"
    return (f"{kind} {broker.host}:{broker.port}",
            MqttSettings(host=broker.host, port=broker.port, protocol=broker.protocol, max_inflight=100))


def _start_aggregator(config: TrialConfig, folder: Path, mqtt: MqttSettings, stack: contextlib.ExitStack) -> Any:
    from edge_runtime.service import Aggregator

    # A fresh client id per trial: against a long-running broker, a persistent session left by an
    # earlier trial would otherwise hand us that trial's queued messages.
    client_id = f"trial-{uuid.uuid4().hex[:8]}"
    try:
        agg_config = AggregatorConfig(
            site=Path(config.site), model=Path(config.model), database=folder / DATABASE, backend=config.backend,
            # The deadline is wall-clock time on the aggregator: compress it with the timeline.
            deadline_fraction=config.deadline_fraction / (config.speed if config.scale_deadline else 1.0),
            # port 0: a free loopback port for the dashboard (and /metrics) while the trial runs
            early_close=config.early_close, metrics_port=0,
            client_id=client_id, mqtt=mqtt)
        aggregator = Aggregator(agg_config).start()
    except AggregatorError as exc:
        raise TrialError(f"aggregator: {exc}") from None
    stack.callback(_quiet_stop, aggregator)
    return aggregator


def _max_nodes(manifest_path: Path) -> int:
    """The most nodes the model takes (a join beyond it would be refused by the aggregator)."""
    try:
        return load_manifest(manifest_path).node_range[1]
    except WireError as exc:
        raise TrialError(f"model: {exc}") from None


def _quiet_stop(aggregator: Any) -> None:
    # The end of a trial is a last stop: windows still open give their partial results now.
    with contextlib.suppress(Exception):  # stopped already on the normal path; stop() is idempotent
        aggregator.stop(flush_open=True)


def _field_config(config: TrialConfig, layout: SiteLayout, link: LinkConfig, mqtt: MqttSettings,
                  folder: Path) -> FieldConfig:
    try:
        return FieldConfig(
            layout=layout, source=SourceSpec(config.scenario, config.seed, dict(config.scenario_params),
                                             str(config.recordings) if config.recordings else None),
            duration_s=config.duration_s, link=link, firmware=FirmwareConfig(codec=CodecSpec.parse(config.codec)),
            clock_offset_std_s=config.clock_offset_std_ms / 1000.0, mqtt=mqtt, realtime=True, speed=config.speed,
            link_log=str(folder / LINK_LOG), truth_log=str(folder / TRUTH_LOG), events=config.events)
    except NodeError as exc:
        raise TrialError(str(exc)) from None


# --------------------------------------------------------------------------- ending
def _wait_for_ingest(aggregator: Any, expected: int | None, settle_s: float, timeout_s: float = 15.0) -> None:
    """Wait until the aggregator has taken every message the broker acknowledged to the nodes.

    Stopping the aggregator disconnects its subscriber first; anything still in flight would stay
    queued in the broker and be missing from the trial. ``expected`` (copies published, None when
    unknown) ends the wait early; otherwise the traffic must be quiet for ``settle_s``.
    """
    deadline = time.monotonic() + timeout_s
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        messages, _ = aggregator.processor.traffic()
        # Lifecycle traffic (births, states, the aggregator's own topics) is not token data.
        lifecycle = sum(v for k, v in aggregator.processor.snapshot_counts().items()
                        if k in ("birth", "state") or k.startswith(("ignored.", "refused.")))
        if expected is not None and messages - lifecycle >= expected:
            return
        if messages != last:
            last, quiet_since = messages, time.monotonic()
        elif time.monotonic() - quiet_since >= (settle_s if expected is None else max(2.0, settle_s)):
            return  # quiet for long enough: whatever is missing is not coming
        time.sleep(0.02)


def _aggregator_counts(aggregator: Any) -> dict[str, Any]:
    messages, nbytes = aggregator.processor.traffic()
    return {"received_messages": messages, "received_bytes": nbytes,
            "processor": aggregator.processor.snapshot_counts(), "assembler": dict(aggregator.assembler.counts),
            "worker": aggregator.worker.snapshot_counts(), "window_s": aggregator.assembler.window_ns / 1e9,
            "model": f"{aggregator.manifest.name}@{aggregator.manifest.version}",
            "backend": getattr(aggregator.backend, "name", type(aggregator.backend).__name__)}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")

