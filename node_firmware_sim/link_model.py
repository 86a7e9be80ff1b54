"""Lossy link between a node's firmware and the broker.

Every message a node sends goes through :meth:`LinkModel.transmit`, which decides, from the node's
own seeded random stream, whether it is lost (independent or Gilbert–Elliott burst loss), queued
behind a bandwidth cap, delayed with jitter, held back (reordering) or duplicated. During a node
outage the link is down and the firmware keeps the message in its outage buffer instead.

Decisions depend only on (seed, node, that node's sequence of calls), never on thread timing or
on other nodes, so a trial with the same seed, config and traffic decides exactly the same way;
every decision is also written to a JSON-lines log, which :class:`ScriptedLink` replays verbatim.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from node_firmware_sim.errors import NodeError
from node_firmware_sim.scenarios.base import episode_rng
from node_firmware_sim.toml_file import read_toml

# Outcomes of one transmit call.
DELIVERED = "delivered"
LOST = "lost"  # independent loss
BURST_LOST = "burst_lost"  # lost while the Gilbert–Elliott chain was in its bad state
QUEUE_FULL = "queue_full"  # the bandwidth-capped uplink queue was full
OUTCOMES = (DELIVERED, LOST, BURST_LOST, QUEUE_FULL)


@dataclass(frozen=True)
class BurstLoss:
    """Gilbert–Elliott loss: a two-state Markov chain stepped once per message per node.

    Stationary share of the bad state = p_good_to_bad / (p_good_to_bad + p_bad_to_good); mean
    burst length in the bad state = 1 / p_bad_to_good messages.
    """

    p_good_to_bad: float = 0.05
    p_bad_to_good: float = 0.3
    loss_good: float = 0.0
    loss_bad: float = 0.8

    @property
    def stationary_bad(self) -> float:
        return self.p_good_to_bad / (self.p_good_to_bad + self.p_bad_to_good)

    @property
    def mean_loss(self) -> float:
        bad = self.stationary_bad
        return (1 - bad) * self.loss_good + bad * self.loss_bad


@dataclass(frozen=True)
class Outage:
    """A scheduled outage: the node's uplink is down in [start_s, start_s + duration_s)."""

    node: str  # node id, or "*" for every node
    start_s: float  # trial time
    duration_s: float


@dataclass(frozen=True)
class LinkConfig:
    loss: float = 0.0  # independent loss probability per message
    burst: BurstLoss | None = None  # Gilbert–Elliott burst loss on top of `loss`
    delay_ms: float = 0.0  # base one-way delay
    jitter_ms: float = 0.0  # standard deviation of a Gaussian added to the delay (>= 0 overall)
    reorder: float = 0.0  # probability that a message is held back by reorder_ms extra
    reorder_ms: float = 100.0
    duplicate: float = 0.0  # probability that a message arrives twice
    bandwidth_kbps: float = 0.0  # uplink cap per node in kbit/s; 0 = unlimited
    queue_limit_bytes: int = 262_144  # bytes waiting behind the cap before new ones are dropped
    outages: tuple[Outage, ...] = ()
    outage_rate_per_hour: float = 0.0  # random outages per node (Poisson)
    outage_mean_s: float = 30.0  # mean duration of a random outage (exponential)

    def __post_init__(self) -> None:
        for name in ("loss", "reorder", "duplicate"):
            _check_probability(name, getattr(self, name))
        if self.burst is not None:
            for name in ("p_good_to_bad", "p_bad_to_good", "loss_good", "loss_bad"):
                _check_probability(f"burst.{name}", getattr(self.burst, name))
            if self.burst.p_good_to_bad + self.burst.p_bad_to_good == 0:
                raise NodeError("link: burst.p_good_to_bad + burst.p_bad_to_good must be > 0")
        for name in ("delay_ms", "jitter_ms", "reorder_ms", "bandwidth_kbps", "outage_rate_per_hour"):
            _check_non_negative(name, getattr(self, name))
        if self.outage_mean_s <= 0 or self.queue_limit_bytes <= 0:
            raise NodeError("link: outage_mean_s and queue_limit_bytes must be > 0")
        for outage in self.outages:
            if outage.start_s < 0 or outage.duration_s <= 0:
                raise NodeError(f"link: outage {outage} needs start_s >= 0 and duration_s > 0")

    @property
    def expected_loss(self) -> float:
        """Long-run share of messages lost by the loss processes (not counting outages, queue)."""
        burst = self.burst.mean_loss if self.burst else 0.0
        return 1 - (1 - self.loss) * (1 - burst)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_link_config(path: str | Path) -> LinkConfig:
    """Read a link config TOML (see configs/links/). Unknown keys are errors, named."""
    return parse_link_config(read_toml(path).get("link", {}), source=str(path))


def parse_link_config(table: dict[str, Any], source: str = "<link>") -> LinkConfig:
    if not isinstance(table, dict):
        raise NodeError(f"{source}: [link] must be a table")
    table = dict(table)
    known = set(LinkConfig.__dataclass_fields__)
    unknown = sorted(set(table) - known)
    if unknown:
        raise NodeError(f"{source}: [link]: unknown field '{unknown[0]}'; known: {', '.join(sorted(known))}")
    try:
        if "burst" in table:
            table["burst"] = BurstLoss(**_table(table["burst"], "burst"))
        if "outages" in table:
            table["outages"] = tuple(Outage(**_table(o, "outages")) for o in table["outages"])
        config = LinkConfig(**table)
    except TypeError as exc:
        raise NodeError(f"{source}: [link]: {exc}") from None
    except NodeError as exc:
        raise NodeError(f"{source}: {exc}") from None
    _check_types(config, source)
    return config


@dataclass
class LinkEvent:
    """One transmit decision, as logged."""

    node: str
    modality: str
    seq: int
    t_send_s: float
    nbytes: int
    outcome: str
    deliveries_s: list[float] = field(default_factory=list)  # arrival times at the broker


@dataclass
class LinkStats:
    sent: int = 0
    delivered: int = 0  # messages with at least one delivery
    copies: int = 0  # deliveries, duplicates included
    lost: int = 0
    burst_lost: int = 0
    queue_full: int = 0
    duplicated: int = 0
    reordered: int = 0
    bytes_sent: int = 0

    def add(self, other: LinkStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class LinkModel:
    """Per-node lossy links with one seed. Thread-safe: one lock per node."""

    def __init__(self, config: LinkConfig, seed: int, *, log: IO[str] | None = None):
        self.config = config
        self.seed = seed
        self._log = log
        self._log_lock = threading.Lock()
        self._nodes: dict[str, _NodeLink] = {}
        self._nodes_lock = threading.Lock()

    def transmit(self, node: str, modality: str, seq: int, nbytes: int, t_send_s: float) -> LinkEvent:
        """Decide the fate of one message sent at trial time ``t_send_s``.

        The caller must check :meth:`is_up` first: a message sent while the link is down belongs
        in the firmware's outage buffer, not here.
        """
        link = self._node(node)
        with link.lock:
            event = link.decide(modality, seq, nbytes, t_send_s)
        self._write(event)
        return event

    def is_up(self, node: str, t_s: float) -> bool:
        """False while ``node`` is in an outage at trial time ``t_s``."""
        link = self._node(node)
        with link.lock:
            return link.outages.is_up(t_s)

    def outage_intervals(self, node: str, until_s: float) -> list[tuple[float, float]]:
        """[(start, end)] of the node's outages that begin before ``until_s``."""
        link = self._node(node)
        with link.lock:
            return link.outages.intervals(until_s)

    def stats(self, node: str | None = None) -> LinkStats:
        """Counters for one node, or summed over all nodes."""
        with self._nodes_lock:
            # A node that never sent (a replay without its recording) has nothing counted: zeros.
            links = ([self._nodes[node]] if node in self._nodes else []) if node else list(self._nodes.values())
        total = LinkStats()
        for link in links:
            total.add(link.stats)
        return total

    def _node(self, node: str) -> _NodeLink:
        with self._nodes_lock:
            if node not in self._nodes:
                self._nodes[node] = _NodeLink(self.config, self.seed, node)
            return self._nodes[node]

    def _write(self, event: LinkEvent) -> None:
        if self._log is not None:
            with self._log_lock:
                self._log.write(json.dumps(asdict(event), separators=(",", ":")) + "\n")


class ScriptedLink(LinkModel):
    """Replays a logged trial: the same outcomes and delivery times for the same messages."""

    def __init__(self, events: Iterable[LinkEvent], config: LinkConfig | None = None, seed: int = 0):
        super().__init__(config or LinkConfig(), seed)
        self._script = {(e.node, e.modality, e.seq): e for e in events}

    def transmit(self, node: str, modality: str, seq: int, nbytes: int, t_send_s: float) -> LinkEvent:
        try:
            logged = self._script[(node, modality, seq)]
        except KeyError:
            raise NodeError(f"link replay: no logged decision for {node}/{modality} seq {seq}; "
                            "the trial differs from the logged one") from None
        shift = t_send_s - logged.t_send_s
        event = LinkEvent(node, modality, seq, t_send_s, nbytes, logged.outcome,
                          [t + shift for t in logged.deliveries_s])
        link = self._node(node)
        with link.lock:
            link.count(event, reordered=False)
        return event


def read_link_log(path: str | Path) -> list[LinkEvent]:
    """Parse a JSON-lines link log written by a trial."""
    events = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            try:
                events.append(LinkEvent(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as exc:
                raise NodeError(f"{path}:{line_no}: not a link event: {exc}") from None
    return events


# --------------------------------------------------------------------------- internals
class _NodeLink:
    """One node's uplink state: random stream, burst chain, queue, outages, counters."""

    def __init__(self, config: LinkConfig, seed: int, node: str):
        self.config = config
        self.node = node
        self.rng = episode_rng(seed, f"link:{node}")
        self.bad_state = False
        self.busy_until_s = 0.0
        self.last_delivery_s = 0.0
        self.lock = threading.Lock()
        self.stats = LinkStats()
        self.outages = _OutageSchedule(config, episode_rng(seed, f"outage:{node}"), node)

    def decide(self, modality: str, seq: int, nbytes: int, t_send_s: float) -> LinkEvent:
        cfg = self.config
        # Draw every random number every time, whatever the outcome: then one decision never
        # shifts the stream of the next, and statistics of each process stay independent.
        u_loss, u_burst_step, u_burst_loss, u_reorder, u_dup = self.rng.random(5)
        jitter = self.rng.standard_normal(2) * cfg.jitter_ms / 1000.0
        outcome = DELIVERED
        if cfg.burst is not None:
            p_switch = cfg.burst.p_bad_to_good if self.bad_state else cfg.burst.p_good_to_bad
            self.bad_state = self.bad_state != (u_burst_step < p_switch)
            burst_loss = cfg.burst.loss_bad if self.bad_state else cfg.burst.loss_good
            if u_burst_loss < burst_loss:
                outcome = BURST_LOST
        if u_loss < cfg.loss:
            outcome = LOST
        deliveries: list[float] = []
        reordered = False
        if outcome == DELIVERED:
            departure = self._serialise(nbytes, t_send_s)
            if departure is None:
                outcome = QUEUE_FULL
            else:
                delay = cfg.delay_ms / 1000.0
                first = departure + max(0.0, delay + jitter[0])
                if u_reorder < cfg.reorder:
                    first += cfg.reorder_ms / 1000.0
                    reordered = True
                deliveries.append(first)
                if u_dup < cfg.duplicate:
                    deliveries.append(departure + max(0.0, delay + abs(jitter[1])) + 0.001)
        event = LinkEvent(self.node, modality, seq, t_send_s, nbytes, outcome, sorted(deliveries))
        self.count(event, reordered)
        return event

    def count(self, event: LinkEvent, reordered: bool) -> None:
        s = self.stats
        s.sent += 1
        s.bytes_sent += event.nbytes
        s.copies += len(event.deliveries_s)
        s.delivered += bool(event.deliveries_s)
        s.duplicated += len(event.deliveries_s) > 1
        s.reordered += reordered
        s.lost += event.outcome == LOST
        s.burst_lost += event.outcome == BURST_LOST
        s.queue_full += event.outcome == QUEUE_FULL

    def _serialise(self, nbytes: int, t_send_s: float) -> float | None:
        """Departure time behind the bandwidth cap, or None when the queue is full."""
        rate_bytes_s = self.config.bandwidth_kbps * 1000.0 / 8.0
        if rate_bytes_s <= 0:
            return t_send_s
        start = max(t_send_s, self.busy_until_s)
        if (start - t_send_s) * rate_bytes_s + nbytes > self.config.queue_limit_bytes:
            return None
        self.busy_until_s = start + nbytes / rate_bytes_s
        return self.busy_until_s


class _OutageSchedule:
    """Scheduled outages of one node plus random ones drawn lazily as trial time advances."""

    def __init__(self, config: LinkConfig, rng: np.random.Generator, node: str):
        self.fixed = [(o.start_s, o.start_s + o.duration_s) for o in config.outages
                      if o.node in (node, "*")]
        self.rate_per_s = config.outage_rate_per_hour / 3600.0
        self.mean_s = config.outage_mean_s
        self.rng = rng
        self.random: list[tuple[float, float]] = []
        self.drawn_until_s = 0.0

    def is_up(self, t_s: float) -> bool:
        return not any(start <= t_s < end for start, end in self.intervals(t_s + 1e-9))

    def intervals(self, until_s: float) -> list[tuple[float, float]]:
        self._draw_until(until_s)
        return sorted([iv for iv in self.fixed if iv[0] < until_s]
                      + [iv for iv in self.random if iv[0] < until_s])

    def _draw_until(self, until_s: float) -> None:
        if self.rate_per_s <= 0:
            return
        while self.drawn_until_s < until_s:
            start = self.drawn_until_s + self.rng.exponential(1.0 / self.rate_per_s)
            end = start + self.rng.exponential(self.mean_s)
            self.random.append((start, end))
            self.drawn_until_s = end


def _table(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise NodeError(f"link: {name} must be a table")
    return value


def _check_probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise NodeError(f"link: {name} must be a probability in [0, 1], got {value!r}")


def _check_non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise NodeError(f"link: {name} must be a finite number >= 0, got {value!r}")


def _check_types(config: LinkConfig, source: str) -> None:
    for outage in config.outages:
        if not isinstance(outage.node, str):
            raise NodeError(f"{source}: outages: node must be a string, got {outage.node!r}")
