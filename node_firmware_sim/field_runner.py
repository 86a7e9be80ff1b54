"""Field runner: every node of a site, fed by one source, through the lossy link, to a broker.

Per window k (trial time t = (k + 1) x window length, when the window has been sampled):
source.window(k) -> per node and modality: firmware.encode -> uplink.send (outage buffer, link
model) -> delivery scheduler -> MQTT publish at the delivery time. In real time the loop waits for
the wall clock; as fast as possible it runs on the simulated clock. ``run_field_parallel`` splits
the nodes over several processes.

Placement events (``PlacementEvent``) change the site while the trial runs: a node the layout does
not list joins (powers on, connects, publishes its birth, then sends every window that starts after
it), or a running node moves (publishes a new birth with its new position). The physics follows the
nodes through one source for the whole trial, built on the site plus a receiver at every joined node
and at every place a node moves to: the vehicles, quakes and ground truth stay one world across the
events (re-creating the source at each event would redraw them), and each node reads its signals
from the receiver where it stands in that window.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import queue
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from node_firmware_sim.delivery_scheduler import DeliveryScheduler
from node_firmware_sim.errors import NodeError
from node_firmware_sim.firmware import EncodedFrame, FirmwareConfig, NodeFirmware
from node_firmware_sim.link_model import LinkConfig, LinkModel, LinkStats
from node_firmware_sim.mqtt_publisher import NodePublisher
from node_firmware_sim.placement_events import EventPlan, PlacementEvent
from node_firmware_sim.scenarios import make_scenario
from node_firmware_sim.scenarios.base import Source, SourceWindow, episode_rng
from node_firmware_sim.uplink import NodeUplink
from spar_wire.errors import WireError
from spar_wire.mqtt_settings import MqttSettings, publish_outcome, with_credentials
from spar_wire.site_layout import NodeSpec, SiteLayout
from spar_wire.topics import birth_topic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSpec:
    """How to build the source in any process: a scenario by name, or a recordings file."""

    scenario: str = "sine"
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    recordings: str | None = None  # TOML of recordings to replay instead of a scenario

    def build(self, layout: SiteLayout) -> Source:
        if self.recordings is not None:
            from node_firmware_sim.scenarios.recording_replay import load_recordings

            return load_recordings(self.recordings, layout)
        return make_scenario(self.scenario, layout, self.seed, **self.params)


@dataclass(frozen=True)
class FieldConfig:
    layout: SiteLayout
    source: SourceSpec
    duration_s: float
    link: LinkConfig = LinkConfig()
    firmware: FirmwareConfig = FirmwareConfig()
    clock_offset_std_s: float = 0.0  # each node's clock offset ~ N(0, this), seeded per node
    mqtt: MqttSettings | None = None  # None: no broker, link and encoding only (dry run)
    realtime: bool = False
    speed: float = 1.0  # real time only: trial seconds per wall-clock second (> 1 compresses the timeline)
    node_ids: tuple[str, ...] | None = None  # subset of the site's nodes (None = all)
    link_log: str | None = None  # JSON-lines log of every link decision
    truth_log: str | None = None  # JSON-lines ground truth per window
    start_epoch_ns: int | None = None  # true time of window 0 (default: now, whole seconds)
    ack_timeout_s: float = 30.0
    record_acks: bool = False  # list every acknowledged frame in NodeSummary.acked_frames (fault trials)
    credentials_dir: str | None = None  # site security folder: each node connects as itself (its id)
    events: tuple[PlacementEvent, ...] = ()  # nodes joining or moving during the trial
    plan: EventPlan = field(init=False, repr=False, compare=False)  # the events checked against the site

    def __post_init__(self) -> None:
        if not (isinstance(self.duration_s, (int, float)) and math.isfinite(self.duration_s)
                and self.duration_s > 0):
            raise NodeError(f"duration must be > 0 seconds, got {self.duration_s!r}")
        if not (isinstance(self.speed, (int, float)) and math.isfinite(self.speed) and self.speed > 0):
            raise NodeError(f"speed must be a finite number > 0, got {self.speed!r}")
        object.__setattr__(self, "plan", EventPlan(self.layout, tuple(self.events), self.duration_s))
        for node in self.node_ids or ():
            try:
                self.plan.nodes_layout.node(node)
            except WireError as exc:
                raise NodeError(exc.detail) from None

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes this runner simulates: the site's and the joined ones (or ``node_ids``)."""
        return self.node_ids or tuple(self.plan.nodes_layout.node_ids)


@dataclass
class NodeSummary:
    node: str
    clock_offset_s: float = 0.0
    windows: int = 0
    messages: int = 0  # frames the firmware produced
    bytes: int = 0  # their size on the wire
    missing_traces: int = 0  # source windows with no recording for a modality of this node
    buffered: int = 0  # frames that waited in the outage buffer
    buffer_dropped: int = 0  # frames lost from a full outage buffer
    unsent: int = 0  # frames still in the buffer when the trial ended
    link: LinkStats = field(default_factory=LinkStats)
    published: int = 0  # copies handed to MQTT, duplicates included
    acked: int = 0  # of those, acknowledged by the broker (PUBACK)
    publish_failed: int = 0  # of those, refused by the MQTT client (queue full): no PUBACK to count
    acked_frames: list[tuple[str, int]] | None = None  # (modality, window start) per PUBACK, if recorded


@dataclass
class FieldSummary:
    nodes: dict[str, NodeSummary]
    windows: int
    window_s: float
    elapsed_s: float
    realtime: bool
    link_log: str | None = None
    start_epoch_ns: int = 0  # node time stamped on window 0 (true clock)
    wall_start_ns: int = 0  # wall clock at trial time 0; window k is complete at + (k + 1) W / speed
    speed: float = 1.0
    requested_windows: int = 0  # what the duration asked for (more than ``windows``: the recordings ended)
    source_notes: list[str] = field(default_factory=list)  # a replay's warnings (flat components, corrupt records)

    def total(self) -> NodeSummary:
        total = NodeSummary("total")
        for s in self.nodes.values():
            for name in ("windows", "messages", "bytes", "missing_traces", "buffered",
                         "buffer_dropped", "unsent", "published", "acked", "publish_failed"):
                setattr(total, name, getattr(total, name) + getattr(s, name))
            total.link.add(s.link)
        return total

    def to_dict(self) -> dict[str, Any]:
        return {"windows": self.windows, "window_s": self.window_s, "elapsed_s": self.elapsed_s,
                "realtime": self.realtime, "link_log": self.link_log, "start_epoch_ns": self.start_epoch_ns,
                "wall_start_ns": self.wall_start_ns, "speed": self.speed, "requested_windows": self.requested_windows,
                "nodes": {k: asdict(v) for k, v in self.nodes.items()}, "total": asdict(self.total()),
                "source_notes": list(self.source_notes)}

    def format_table(self) -> str:
        head = (f"{'node':<10}{'msgs':>7}{'kB':>9}{'lost':>6}{'burst':>6}{'queue':>6}{'dup':>5}"
                f"{'buffered':>9}{'dropped':>8}{'unsent':>7}{'published':>10}{'acked':>7}")
        rows = [head, "-" * len(head)]
        for s in [*self.nodes.values(), self.total()]:
            rows.append(f"{s.node:<10}{s.messages:>7}{s.bytes / 1000:>9.1f}{s.link.lost:>6}"
                        f"{s.link.burst_lost:>6}{s.link.queue_full:>6}{s.link.duplicated:>5}"
                        f"{s.buffered:>9}{s.buffer_dropped:>8}{s.unsent:>7}{s.published:>10}{s.acked:>7}")
        total = self.total()
        injected = total.link.lost + total.link.burst_lost + total.link.queue_full + total.buffer_dropped
        rows.append(f"{self.windows} windows of {self.window_s:g} s in {self.elapsed_s:.1f} s; "
                    f"injected loss {injected}/{max(total.messages, 1)} messages "
                    f"({100 * injected / max(total.messages, 1):.1f} %)")
        if self.requested_windows > self.windows:
            rows.append(f"ended with the recordings after {self.windows} of {self.requested_windows} windows")
        silent = [s.node for s in self.nodes.values() if s.messages == 0]
        if silent:
            rows.append(f"sent nothing (no recording or no signal): {', '.join(silent)}")
        rows += [f"replay: {note}" for note in self.source_notes]
        return "\n".join(rows)


def run_field(config: FieldConfig, progress: Callable[[int, int], None] | None = None,
              on_truth: Callable[[dict[str, Any]], None] | None = None) -> FieldSummary:
    """Run one trial in this process. ``progress(done, total)`` is called after each window,
    ``on_truth(record)`` with each window's ground truth (the truth log's record) before it is sent."""
    plan = config.plan
    source = config.source.build(plan.physics_layout)
    requested = max(1, math.ceil(config.duration_s / source.window_s - 1e-9))
    # A replay lasts as long as its recordings (its ``windows``); a scenario has no end.
    available = getattr(source, "windows", None)
    windows = min(requested, available) if isinstance(available, int) else requested
    if windows < requested:
        log.warning("the recordings last %d windows of %g s; the trial ends there, not after %d", windows,
                    source.window_s, requested)
    # This runner's share of the events (run_field_parallel splits the nodes, and their events with them).
    events = [e for e in plan.events if e.node in config.nodes]
    with contextlib.ExitStack() as stack:
        link_log = stack.enter_context(open(config.link_log, "w")) if config.link_log else None
        truth_log = stack.enter_context(open(config.truth_log, "w")) if config.truth_log else None
        link = LinkModel(config.link, config.source.seed, log=link_log)
        scheduler = DeliveryScheduler(realtime=config.realtime, speed=config.speed)
        stack.callback(scheduler.close)
        starting = tuple(n for n in config.nodes if n not in plan.joined)
        nodes = _start_nodes(config, starting, link, scheduler, stack)
        # Trial time 0 is now, once every node is connected: window k is sampled over
        # [k W, (k+1) W) and sent at (k+1) W, on the wall clock in real time.
        started = scheduler.epoch = time.monotonic()
        wall_start_ns = time.time_ns()
        start_ns = config.start_epoch_ns if config.start_epoch_ns is not None else wall_start_ns
        for k in range(windows):
            t_s = (k + 1) * source.window_s  # the window is complete: the node sends it now
            # Events before this send time are set up now; one exactly at it comes after this window.
            while events and events[0].at_s < t_s:
                _apply_event(config, events.pop(0), nodes, link, scheduler, stack)
            if config.realtime:
                _sleep_until(started + t_s / config.speed)
            receivers = plan.receivers(k, tuple(nodes))
            window = source.window(k, tuple(receivers.values()))
            truth = _truth_record(window, start_ns, source.window_s)
            if truth_log is not None:
                truth_log.write(json.dumps(truth) + "\n")
            if on_truth is not None:
                on_truth(truth)
            window = plan.nodes_window(window, receivers)
            # Every node encodes first, then all send: real nodes finish a window at the same moment,
            # and one simulated node's encoding time must not delay the next node's transmission.
            window_start_ns = start_ns + int(round(k * source.window_s * 1e9))
            frames = {name: nodes[name].encode_window(window, window_start_ns) for name in receivers}
            for name, frame in frames.items():
                nodes[name].send(frame, t_s)
            if not config.realtime:
                scheduler.run_due(t_s)
            if progress:
                progress(k + 1, windows)
        end_s = windows * source.window_s
        for node in nodes.values():
            node.uplink.flush(end_s)
        scheduler.drain()
        summaries = {name: node.finish(link, config.ack_timeout_s) for name, node in nodes.items()}
    return FieldSummary(summaries, windows, source.window_s, time.monotonic() - started,
                        config.realtime, config.link_log, start_ns, wall_start_ns, config.speed, requested,
                        list(getattr(source, "notes", [])))


def _apply_event(config: FieldConfig, event: PlacementEvent, nodes: dict[str, _RunningNode], link: LinkModel,
                 scheduler: DeliveryScheduler, stack: contextlib.ExitStack) -> None:
    """A join powers a node on (its connection publishes the birth); a move re-announces the node.

    The birth goes out through the delivery scheduler at ``at_s``: ordered by trial time with the
    token messages, it follows every message sent before it even when this loop runs late (rendering
    a window takes time), and the aggregator sees the node set change where the trial says it does.
    """
    if event.kind == "join":
        # The node exists now (its frames wait in its outage buffer until it is connected).
        nodes.update(_start_nodes(config, (event.node,), link, scheduler, stack, connect=False))
        publisher = nodes[event.node].publisher
        if publisher is not None:
            scheduler.schedule(event.at_s, publisher.start)
        return
    publisher = nodes[event.node].publisher
    if publisher is not None:
        spec = publisher.node
        description = spec.description if event.description is None else event.description
        moved = replace(spec, position=event.position, description=description)
        scheduler.schedule(event.at_s, lambda: publisher.relocate(moved))


def run_field_parallel(config: FieldConfig, procs: int,
                       progress: Callable[[int, int], None] | None = None) -> FieldSummary:
    """Split the nodes over ``procs`` processes; merge their summaries and link logs."""
    nodes = config.nodes
    procs = max(1, min(procs, len(nodes)))
    if procs == 1:
        return run_field(config, progress)
    ctx = multiprocessing.get_context("spawn")
    updates: Any = ctx.Queue()
    parts = []
    for i in range(procs):
        part_log = f"{config.link_log}.part{i}" if config.link_log else None
        part_truth = config.truth_log if i == 0 else None  # the source is the same in every part
        part = replace(config, node_ids=nodes[i::procs], link_log=part_log, truth_log=part_truth)
        process = ctx.Process(target=_child, args=(part, i, updates), daemon=True)
        process.start()
        parts.append((process, part))
    started = time.monotonic()
    summaries: dict[str, NodeSummary] = {}
    done = [0] * procs
    finished, result = 0, None
    while finished < procs:
        try:
            kind, index, payload = updates.get(timeout=1.0)
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p, _ in parts):
                raise NodeError("a field-runner process died; see its output above") from None
            continue
        if kind == "progress":
            done[index] = payload[0]
            if progress:
                progress(min(done), payload[1])
        elif kind == "error":
            raise NodeError(f"field-runner process failed: {payload}")
        else:
            finished += 1
            result = payload
            summaries.update(payload.nodes)
    for process, _ in parts:
        process.join(timeout=10)
    if config.link_log:
        _merge_logs(config.link_log, [p.link_log for _, p in parts])
    assert result is not None
    ordered = {n: summaries[n] for n in nodes}
    # Each process took its own start time; the first one's stands for the trial.
    return FieldSummary(ordered, result.windows, result.window_s, time.monotonic() - started,
                        config.realtime, config.link_log, result.start_epoch_ns, result.wall_start_ns, config.speed,
                        result.requested_windows, result.source_notes)


class FieldPublisher(NodePublisher):
    """A node's MQTT session that can also re-announce the node at a new place (a move)."""

    def relocate(self, node: NodeSpec) -> None:
        """Publish a new birth for ``node`` (this node at its new place) on this connection.

        Retained like the first birth, so a subscriber that comes later sees the new place; a
        reconnect re-announces ``self.node``, so it carries the new place too.
        """
        self.node = node
        self._client.publish(birth_topic(self.layout.site_id, node.id), self.birth().to_json(), qos=1, retain=True)


# --------------------------------------------------------------------------- internals
class _RunningNode:
    """One node in a trial: firmware, uplink, MQTT session and counters."""

    def __init__(self, config: FieldConfig, node_id: str, link: LinkModel, scheduler: DeliveryScheduler,
                 publisher: Any | None):
        offset = 0.0
        if config.clock_offset_std_s > 0:
            rng = episode_rng(config.source.seed, f"clock:{node_id}")
            offset = float(rng.normal(0, config.clock_offset_std_s))
        self.firmware = NodeFirmware(config.plan.nodes_layout, node_id,
                                     replace(config.firmware, clock_offset_s=offset))
        self.publisher = publisher
        publish = (lambda f: publisher.publish_token(f.modality, f.frame)) if publisher else None
        connected = (lambda: publisher.connected) if publisher else (lambda: True)
        self.uplink = NodeUplink(node_id, link, scheduler, publish,
                                 buffer_size=config.firmware.outage_buffer_messages, connected=connected,
                                 record_acks=config.record_acks,
                                 outcome=publisher.outcome if publisher else publish_outcome)
        self.summary = NodeSummary(node_id, clock_offset_s=offset)

    def encode_window(self, window: SourceWindow, true_start_ns: int) -> list[EncodedFrame]:
        """This node's frames of one window (one per modality with a trace)."""
        node = self.firmware.node
        self.summary.windows += 1
        frames = []
        for modality in node.modalities:
            samples = window.signals.get((node.id, modality))
            if samples is None:
                self.summary.missing_traces += 1
                continue
            frame = self.firmware.encode(modality, samples, true_start_ns)
            self.summary.messages += 1
            self.summary.bytes += len(frame.frame)
            frames.append(frame)
        return frames

    def send(self, frames: list[EncodedFrame], t_s: float) -> None:
        self.uplink.collect_acks()
        self.uplink.flush(t_s)
        for frame in frames:
            self.uplink.send(frame, t_s)

    def finish(self, link: LinkModel, ack_timeout_s: float) -> NodeSummary:
        s = self.summary
        counters = self.uplink.counters
        self.uplink.collect_acks(wait_s=ack_timeout_s)
        s.acked, s.publish_failed, s.acked_frames = counters.acked, counters.failed, counters.acked_frames
        if self.publisher is not None:
            self.publisher.stop()
        s.buffered, s.buffer_dropped = counters.buffered, counters.buffer_dropped
        s.unsent, s.published = len(self.uplink.buffer), counters.published
        s.link = link.stats(s.node)
        return s


def _start_nodes(config: FieldConfig, node_ids: tuple[str, ...], link: LinkModel, scheduler: DeliveryScheduler,
                 stack: contextlib.ExitStack, *, connect: bool = True) -> dict[str, _RunningNode]:
    """The nodes' firmware, uplinks and MQTT sessions (connected now, or later by the caller)."""
    nodes = {}
    for node_id in node_ids:
        publisher = None
        if config.mqtt is not None:
            settings = config.mqtt
            if config.credentials_dir is not None:
                settings = with_credentials(settings, config.credentials_dir, node_id)
            publisher = FieldPublisher(config.plan.nodes_layout, node_id, settings)
            stack.callback(_quiet_stop, publisher)
            if connect:
                publisher.start()
        nodes[node_id] = _RunningNode(config, node_id, link, scheduler, publisher)
    return nodes


def _quiet_stop(publisher: Any) -> None:
    with contextlib.suppress(Exception):  # already stopped by finish() on the normal path
        publisher.stop()


def _truth_record(window: SourceWindow, start_ns: int, window_s: float) -> dict[str, Any]:
    truth = window.truth
    return {
        "window": window.index, "window_start_ns": start_ns + int(round(window.index * window_s * 1e9)),
        "label": truth.label, "targets": [{"class_id": t.class_id, "position": list(t.position)}
                                          for t in truth.targets],
        "extras": truth.extras,
    }


def _sleep_until(monotonic_deadline: float) -> None:
    remaining = monotonic_deadline - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


def _child(config: FieldConfig, index: int, updates: Any) -> None:
    try:
        summary = run_field(config, lambda d, t: updates.put(("progress", index, (d, t))))
        updates.put(("done", index, summary))
    except Exception as exc:  # noqa: BLE001 - report to the parent instead of dying silently
        updates.put(("error", index, f"{type(exc).__name__}: {exc}"))


def _merge_logs(target: str, parts: list[str | None]) -> None:
    lines = []
    for part in parts:
        if part and Path(part).exists():
            lines += Path(part).read_text().splitlines()
            Path(part).unlink()
    lines.sort(key=lambda line: (json.loads(line)["t_send_s"], line))
    Path(target).write_text("".join(line + "\n" for line in lines))
