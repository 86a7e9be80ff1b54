"""Group token messages of all nodes into one placement tensor per time window.

Messages are keyed by window index = nearest multiple of the window length from the grid set by the
first message seen (nodes sample back-to-back windows, but the site's grid need not start at a
multiple of the window length since the epoch): node clocks may be off by a fraction of a window,
and rounding to the nearest grid point still puts their messages together. A window closes
when every expected (node, modality) pair has arrived, or ``deadline_s`` after its first message
arrived (measured on this box's monotonic clock, so node clock offsets do not matter). Absent nodes
are zero-padded with their presence flag cleared. A message for a window that already closed is
late (counted, dropped); a second message for the same (node, modality) is a duplicate (counted,
ignored). At most ``max_open`` windows are open: a new one beyond that force-closes the oldest.

The grid (its phase) is kept by the caller across restarts (the result store), so a window keeps its
index, and ``grid_start_ns`` = phase + index x window length names it exactly: the store recognises a
window assembled again from redelivered messages by that, not by comparing median starts (node clocks
differ by up to half a window, so medians of two different partial windows can be that close).

Clock errors that get past ``ClockGuard`` (a node a minute ahead before the site had a reference)
can still close a window ahead of the site and make every later message look late. The grid then
recovers by itself: once only far-late messages arrive, two windows' worth of them from two nodes or
more (or the only node), the memory of closed windows is reset (counted as ``grid_reset``).

**Early close** (``EarlyClose``): on a lossy link most windows miss a message or two, and waiting
for the deadline (half a window after the first message) costs every such window a second, although
every message that will ever come arrived some tens of ms after the first. So the assembler learns,
per (node, modality), the arrival lag: how long after its window's first message that pair's message
arrives (this box's monotonic clock; late messages count too, they are the tail). A window closes
early (reason ``early``) once every missing expected message is either known lost (its node already
sent a message of a later window: one node's messages arrive in order across windows) or overdue by
the learned lag quantile plus a margin after the window's first message (until a pair has enough samples
of its own, the quantile of all pairs' lags together stands in). Without enough samples at all the
deadline decides as before, and it stays the upper bound. The quantile trades
latency for messages: a message later than it misses its window (counted as late). While the
broker link is down, and for one deadline after it is back, no window closes early
(``hold_early``/``resume_early``): messages held back by a broker outage arrive in a burst after the
reconnect, far later than any learned lag, and must still find their window.

Why lag after the first message, not after the window's end on the node clock: node clocks are off
by up to half a window, timelines of replays run faster than this box's clock, and after a restart
a backlog arrives long after its windows ended; the spread of one window's arrivals is the same in
all three. Why not sequence numbers within a window: the link may hold a message back (reordering)
while the node's next one overtakes it, so a higher sequence number is no proof of loss.

Each message may carry a ``receipt`` (what the ingest needs to acknowledge it to the broker). A
window keeps the receipts of every message it absorbed, duplicates included, and hands them on
when it closes: ``acknowledgements`` acknowledges them only once the window's result is stored.
Until then the closed window stays "unreleased" here, and a late copy of one of its messages (the
broker redelivers after a reconnect) joins its receipts: acknowledging that copy at once would lose
the message if the process died before the window was stored. A late message for a window already
released is not held (``AddResult.held`` is False); it is acknowledged at once.

Pure logic with an injected clock: the ingest thread calls ``add`` and ``expire``; tests call them
with any clock they like.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.node_registry import RegistrySnapshot
from edge_runtime.receipts import Receipt
from spar_wire.feature_config import FeatureConfig
from spar_wire.model_manifest import NODE_INDEX_INPUT, NODE_TEXT_INPUT, POSITIONS_INPUT, present_input, tokens_input
from spar_wire.placement_text import PlacementTextEncoder


@dataclass
class AssembledWindow:
    """A closed window: the model inputs (no batch axis) and its bookkeeping."""

    window_index: int
    window_start_ns: int  # median of the node-stamped starts of its messages
    grid_start_ns: int  # the grid's start of this window: its identity across restarts
    node_ids: tuple[str, ...]
    inputs: dict[str, np.ndarray]  # tokens_{m} [N, m, D], present_{m} [N], positions [N, d], node_index [N]
    # (or node_text [N, E] for a SPAR+LLM model)
    present: dict[str, tuple[str, ...]]  # modality -> nodes that sent it
    expected: int  # (node, modality) pairs a complete window holds
    received: int  # pairs that arrived
    complete: bool
    reason: str  # "complete" | "deadline" | "forced" | "shutdown"
    first_arrival_s: float  # monotonic
    closed_s: float  # monotonic
    message_count: int = 0
    receipts: list[Receipt] = field(default_factory=list)  # of every message absorbed, to acknowledge once stored

    @property
    def nodes_present(self) -> int:
        return len({n for nodes in self.present.values() for n in nodes})

    @property
    def n_nodes(self) -> int:
        return len(self.node_ids)


@dataclass(frozen=True)
class EarlyClose:
    """When a window may close before its deadline (see the module doc)."""

    quantile: float = 0.99  # of a pair's recent arrival lags: a later message misses its window
    margin_s: float = 0.02  # added to the quantile (scheduling of the deadline thread, small drifts)
    min_samples: int = 20  # lags a pair needs before its own quantile is used ...
    history: int = 128  # recent lags kept per pair
    # ... until then the quantile of every pair's recent lags together stands in (a site's links are
    # alike, and a high quantile of the pool covers its slowest pairs); it needs this many samples.
    min_site_samples: int = 64
    site_history: int = 1024

    def __post_init__(self) -> None:
        if not 0 < self.quantile <= 1 or not 0 <= self.margin_s < 60 or self.min_samples < 1 \
                or self.history < self.min_samples or not 1 <= self.min_site_samples <= self.site_history:
            raise ValueError(f"early close: bad parameters {self}")


@dataclass
class _OpenWindow:
    index: int
    first_arrival_s: float
    tokens: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (node, modality) -> [m, D]
    starts: list[int] = field(default_factory=list)  # window starts as the nodes stamped them
    receipts: list[Receipt] = field(default_factory=list)


@dataclass
class AddResult:
    """What one ``WindowAssembler.add`` did: the windows it closed, and whether the window now
    holds the message (False: late, so nobody will acknowledge it unless the caller does)."""

    closed: list[AssembledWindow]
    held: bool


class WindowAssembler:
    def __init__(self, modalities: dict[str, FeatureConfig], window_s: float, *, deadline_s: float,
                 max_open: int = 16, node_text: PlacementTextEncoder | None = None,
                 phase_ns: int | None = None, early: EarlyClose | None = None):
        """``modalities``: the model's modalities with the feature config of each. ``node_text``:
        for a SPAR+LLM model, the encoder of the nodes' placement descriptions; windows then carry
        ``node_text`` [N, E] instead of ``node_index``. ``phase_ns``: the site's grid offset from an
        earlier run (None: taken from the first message; read it back from ``phase_ns``). ``early``:
        close windows before the deadline once nothing more will come (None: deadline only)."""
        self.modalities = modalities
        self.node_text = node_text
        self.window_ns = int(round(window_s * 1e9))
        self.deadline_s = deadline_s
        self.max_open = max_open
        self._open: dict[int, _OpenWindow] = {}
        self._closed: collections.deque[int] = collections.deque(maxlen=4 * max_open + 16)
        self._closed_set: set[int] = set()
        self._newest_closed = -(2**62)
        self._phase_ns: int | None = None if phase_ns is None else phase_ns % self.window_ns
        self._far_late: list[str] = []  # nodes of the far-late messages since the last on-time one
        self.early = early
        # (node, modality) -> recent arrival lags (s); bounded by the registry's nodes, since only
        # messages of registered nodes reach the assembler.
        self._lags: dict[tuple[str, str], collections.deque[float]] = {}
        self._lag_quantile: dict[tuple[str, str], float] = {}  # cached; dropped when a lag arrives
        self._site_lags: collections.deque[float] = collections.deque(maxlen=early.site_history if early else 1)
        self._newest_index: dict[str, int] = {}  # node -> newest window index it sent
        self._closed_first: dict[int, float] = {}  # first arrival of recently closed windows (late lags)
        # Windows whose first message came before this (monotonic) never close early: set by another
        # thread (the MQTT client's) with one assignment, read under the caller's lock.
        self.early_hold_before_s = -math.inf
        self._unreleased: dict[int, AssembledWindow] = {}  # closed, receipts not yet taken (see module doc)
        self.counts: collections.Counter[str] = collections.Counter()

    @property
    def phase_ns(self) -> int | None:
        """The window grid's offset in [0, window length) ns; None until the first message."""
        return self._phase_ns

    def window_index(self, window_start_ns: int) -> int:
        """Grid index of a window start (half a window either side rounds to it)."""
        if self._phase_ns is None:
            self._phase_ns = window_start_ns % self.window_ns
        return (window_start_ns - self._phase_ns + self.window_ns // 2) // self.window_ns


    def add(self, node_id: str, modality: str, window_start_ns: int, tokens: np.ndarray,
            snapshot: RegistrySnapshot, now_s: float, receipt: Receipt | None = None) -> AddResult:
        """Add one message's tokens [m, D]; the windows this closed (complete or forced) come back."""
        index = self.window_index(window_start_ns)
        far_late = index <= self._newest_closed - 2 * self.max_open
        if far_late and self._grid_moved_on(node_id, snapshot):
            far_late = False
        if not far_late and self.early is not None:
            self._learn_lag(node_id, modality, index, now_s)
        if index in self._closed_set or far_late:
            self.counts["late"] += 1
            unreleased = self._unreleased.get(index)
            if unreleased is not None and receipt is not None:
                unreleased.receipts.append(receipt)
                return AddResult([], held=True)
            return AddResult([], held=False)
        self._far_late.clear()
        closed: list[AssembledWindow] = []
        window = self._open.get(index)
        if window is None:
            if self._open and index < max(self._open):
                self.counts["out_of_order"] += 1
            if len(self._open) >= self.max_open:
                oldest = min(self._open)
                closed.append(self._close(oldest, snapshot, now_s, "forced"))
            window = self._open[index] = _OpenWindow(index, now_s)
        if receipt is not None:
            # A duplicate's receipt too: after a reconnect the broker redelivers what we had not yet
            # acknowledged, and only the newest connection's receipts can still be acknowledged.
            window.receipts.append(receipt)
        key = (node_id, modality)
        if key in window.tokens:
            self.counts["duplicate"] += 1
            return AddResult(closed, held=True)
        window.tokens[key] = tokens
        window.starts.append(window_start_ns)
        self.counts["assembled_messages"] += 1
        if snapshot.expected and snapshot.expected <= window.tokens.keys():
            closed.append(self._close(index, snapshot, now_s, "complete"))
        return AddResult(closed, held=True)

    def expire(self, snapshot: RegistrySnapshot, now_s: float) -> list[AssembledWindow]:
        """Close every window whose deadline has passed, and every window nothing more will come for
        (early close); oldest first."""
        due = sorted(i for i, w in self._open.items() if now_s - w.first_arrival_s >= self.deadline_s)
        closed = [self._close(i, snapshot, now_s, "deadline") for i in due]
        if self.early is not None:
            ready = sorted(i for i in self._open if (at := self._early_due_s(i, snapshot)) is not None
                           and now_s >= at)
            closed += [self._close(i, snapshot, now_s, "early") for i in ready]
        return closed

    def flush(self, snapshot: RegistrySnapshot, now_s: float) -> list[AssembledWindow]:
        """Close everything (shutdown): partial windows still produce results."""
        return [self._close(i, snapshot, now_s, "shutdown") for i in sorted(self._open)]

    def next_deadline_s(self, snapshot: RegistrySnapshot | None = None) -> float | None:
        """Monotonic time at which the next open window expires or (given the node set) may close
        early; None when none is open."""
        if not self._open:
            return None
        deadline = min(w.first_arrival_s for w in self._open.values()) + self.deadline_s
        if snapshot is not None and self.early is not None:
            for index in self._open:
                at = self._early_due_s(index, snapshot)
                if at is not None:
                    deadline = min(deadline, at)
        return deadline

    def hold_early(self) -> None:
        """The broker link is down: no window open now or opened until ``resume_early`` closes early."""
        self.early_hold_before_s = math.inf

    def resume_early(self, now_s: float) -> None:
        """The link is back: windows opened from one deadline on may close early again (what the
        broker held back arrives first, into windows that wait for their deadline)."""
        self.early_hold_before_s = now_s + self.deadline_s

    @property
    def open_windows(self) -> int:
        return len(self._open)

    def take_receipts(self, window: AssembledWindow) -> list[Receipt]:
        """The receipts ``window`` holds now, taken once (later calls get none); from here on a late
        copy of its messages is acknowledged at once. The caller serialises this with ``add``."""
        if self._unreleased.get(window.window_index) is window:
            del self._unreleased[window.window_index]
        receipts, window.receipts = window.receipts, []
        return receipts

    # ------------------------------------------------------------------ internals
    def _learn_lag(self, node_id: str, modality: str, index: int, now_s: float) -> None:
        """Record how long after its window's first message this one came (0 for the first)."""
        assert self.early is not None
        if index > self._newest_index.get(node_id, index - 1):
            self._newest_index[node_id] = index
        window = self._open.get(index)
        if window is not None:
            if (node_id, modality) in window.tokens:
                return  # a duplicate: the message it copies already arrived, and was learned then
            first = window.first_arrival_s
        elif index in self._closed_set:
            first = self._closed_first.get(index)
            if first is None:
                return  # a window closed so long ago that its first arrival is forgotten
        else:
            first = now_s  # this message opens its window
        lags = self._lags.get((node_id, modality))
        if lags is None:
            lags = self._lags[(node_id, modality)] = collections.deque(maxlen=self.early.history)
        lag = max(0.0, now_s - first)
        lags.append(lag)
        self._site_lags.append(lag)
        self._lag_quantile.pop((node_id, modality), None)
        self._lag_quantile.pop(_SITE, None)

    def _quantile_s(self, key: tuple[str, str]) -> float | None:
        """The pair's lag quantile (s), else the site's, or None with too few samples for either."""
        assert self.early is not None
        cached = self._lag_quantile.get(key)
        if cached is not None:
            return cached
        lags = self._lags.get(key)
        if lags is None or len(lags) < self.early.min_samples:
            if key == _SITE or len(self._site_lags) < self.early.min_site_samples:
                return None
            key, lags = _SITE, self._site_lags
            cached = self._lag_quantile.get(key)
            if cached is not None:
                return cached
        ordered = sorted(lags)
        value = ordered[min(len(ordered) - 1, max(0, int(np.ceil(self.early.quantile * len(ordered))) - 1))]
        self._lag_quantile[key] = value
        return value

    def _early_due_s(self, index: int, snapshot: RegistrySnapshot) -> float | None:
        """Monotonic time after which nothing more will come for open window ``index``; None when
        some missing message's lag is not known yet (the deadline decides)."""
        assert self.early is not None
        window = self._open[index]
        if window.first_arrival_s <= self.early_hold_before_s:
            return None
        wait = 0.0
        for node_id, modality in snapshot.expected - window.tokens.keys():
            if self._newest_index.get(node_id, index) > index:
                continue  # the node already sent a later window: this message is lost
            lag = self._quantile_s((node_id, modality))
            if lag is None:
                return None
            wait = max(wait, lag)
        return window.first_arrival_s + wait + self.early.margin_s

    def _grid_moved_on(self, node_id: str, snapshot: RegistrySnapshot) -> bool:
        """Count a far-late message; True once so many came in a row (two windows' worth, from two
        nodes or the only one) that the frontier must be wrong: it is then reset (see module doc)."""
        needed = max(4, 2 * len(snapshot.expected))
        self._far_late.append(node_id)
        del self._far_late[:-needed]  # one node's far-late stream alone must not grow this
        if len(self._far_late) < needed or len(set(self._far_late)) < min(2, len(snapshot.node_ids)):
            return False
        self._far_late.clear()
        self._closed.clear()
        self._closed.extend(sorted(self._unreleased))  # still being stored: a copy must still join it
        self._closed_set = set(self._closed)
        self._newest_closed = max(self._unreleased, default=-(2**62))
        self.counts["grid_reset"] += 1
        return True

    def _close(self, index: int, snapshot: RegistrySnapshot, now_s: float, reason: str) -> AssembledWindow:
        window = self._open.pop(index)
        self._remember_closed(index)
        if self.early is not None:
            self._closed_first[index] = window.first_arrival_s
        inputs, present = self._tensors(window, snapshot)
        expected = len(snapshot.expected)
        received = sum(1 for key in window.tokens if key in snapshot.expected)
        complete = bool(expected) and received == expected
        self.counts[f"windows_{'complete' if complete else 'partial'}"] += 1
        self.counts[f"closed_{reason}"] += 1
        closed = AssembledWindow(
            window_index=index, window_start_ns=_median_ns(window.starts),
            grid_start_ns=(self._phase_ns or 0) + index * self.window_ns, node_ids=snapshot.node_ids,
            inputs=inputs, present=present, expected=expected, received=received, complete=complete,
            reason=reason, first_arrival_s=window.first_arrival_s, closed_s=now_s,
            message_count=len(window.tokens), receipts=window.receipts,
        )
        if closed.receipts:
            self._unreleased[index] = closed
        return closed

    def _tensors(self, window: _OpenWindow, snapshot: RegistrySnapshot
                 ) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, ...]]]:
        n = len(snapshot.node_ids)
        inputs: dict[str, np.ndarray] = {POSITIONS_INPUT: snapshot.positions.copy()}
        if self.node_text is not None:
            inputs[NODE_TEXT_INPUT] = self.node_text.embed(snapshot.descriptions)  # cached per description
        else:
            inputs[NODE_INDEX_INPUT] = snapshot.node_index.copy()
        present: dict[str, tuple[str, ...]] = {}
        for name, cfg in self.modalities.items():
            tokens = np.zeros((n, cfg.n_tokens, cfg.token_dim), dtype=np.float32)
            mask = np.zeros(n, dtype=bool)
            for slot, node_id in enumerate(snapshot.node_ids):
                got = window.tokens.get((node_id, name))
                if got is not None:
                    tokens[slot] = got
                    mask[slot] = True
            inputs[tokens_input(name)] = tokens
            inputs[present_input(name)] = mask
            present[name] = tuple(node_id for node_id, flag in zip(snapshot.node_ids, mask, strict=True)
                                  if flag)
        return inputs, present

    def _remember_closed(self, index: int) -> None:
        if len(self._closed) == self._closed.maxlen:
            self._closed_set.discard(self._closed[0])
            self._closed_first.pop(self._closed[0], None)
        self._closed.append(index)
        self._closed_set.add(index)
        self._newest_closed = max(self._newest_closed, index)


_SITE = ("", "")  # key of the site-wide lag quantile in the cache


def _median_ns(values: list[int]) -> int:
    """Exact integer median (float64 would lose nanoseconds at epoch scale)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2
