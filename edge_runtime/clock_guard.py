"""Clock sanity for token messages: a node with a wrong clock must not move the site's windows.

A node that booted without NTP or a GPS fix stamps its windows hours or years off. One such message
used to move the window assembler's frontier to its window, after which every message of every
other node looked late and the site produced nothing. This guard refuses those messages before they
reach the assembler, with their own counted reason, and remembers which nodes are off.

Two references, the site first:

* **The site's recent starts.** Each node's latest window start is remembered for ``memory_s`` of
  this box's monotonic clock, moved on by the time since it was heard (a site-wide pause is no clock
  error). Once two other nodes whose latest messages were accepted have been heard, a message is
  accepted only if it is within ``max_skew_s`` of at least half of them: one node against the rest
  is outvoted, whatever this box's clock says. The comparison is between node stamps of one stream,
  so it holds during a backlog after a restart too (the broker delivers queued messages in publish
  order, so the other nodes' latest stamps are from the same part of the backlog).
* **This box's clock**, until then (the first messages after a start, a one-node site): a start
  more than ``max_ahead_s`` ahead of the box's wall clock, or more than ``max_behind_s`` behind it
  (older than the broker could have kept for us), is refused, unless two or more nodes heard so far
  (refused by the box clock too) agree with it: then the box's clock is the wrong one.

A site whose nodes agree with each other but not with this box (the box's own clock is wrong) keeps
producing results; :meth:`ClockGuard.box_offset_s` tells /healthz how far the site is from the box.
Starts beyond ``MAX_START_NS`` (the year 2116) are refused always: no clock is that wrong by accident,
and arithmetic near 2^63 overflows SQLite's integers.

Pure logic with injected clocks; the ingest thread calls :meth:`check` under its processing lock.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

from edge_runtime.errors import AggregatorError

MAX_START_NS = 2**62  # ~2116-02-20: beyond any real clock, and far enough from 2^63 for sums
MAX_TRACKED_NODES = 4096  # nodes remembered (oldest forgotten first): bounds what spoofed ids can add


@dataclass(frozen=True)
class ClockLimits:
    """How far a window start may be from the references above (seconds)."""

    max_ahead_s: float = 60.0  # ahead of the box clock (a node stamps a window when it starts, the box
    # receives it after it ended: a real start is behind the box clock by a window or more)
    max_behind_s: float = 2 * 86_400.0  # behind the box clock: the broker keeps our session a day
    max_skew_s: float = 30.0  # from the other nodes' latest starts (node clocks differ by a fraction of
    # a window; a node that missed a few windows is still close)
    memory_s: float = 60.0  # a node's latest start counts as a reference this long (box monotonic clock)

    def __post_init__(self) -> None:
        for name in ("max_ahead_s", "max_behind_s", "max_skew_s", "memory_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise AggregatorError(f"clock limits: {name} must be a number > 0, got {value!r}")


@dataclass(frozen=True)
class ClockVerdict:
    accepted: bool
    reason: str = ""  # counter label when refused: clock_skew | clock_ahead | clock_behind | clock_absurd
    offset_s: float = 0.0  # start minus the reference used (seconds; positive: the node is ahead)
    detail: str = ""


@dataclass
class _NodeClock:
    start_ns: int  # latest window start the node stamped
    seen_s: float  # box monotonic time it arrived
    off: bool = False  # its latest message was refused
    offset_s: float = 0.0
    refused: int = 0


@dataclass
class ClockGuard:
    limits: ClockLimits = field(default_factory=ClockLimits)
    _nodes: collections.OrderedDict[str, _NodeClock] = field(default_factory=collections.OrderedDict)

    def check(self, node: str, start_ns: int, arrival_ns: int, now_s: float) -> ClockVerdict:
        """Whether the window start ``start_ns`` of ``node``, received at box wall time ``arrival_ns``
        and box monotonic time ``now_s``, is sane. The node's stamp is remembered either way."""
        verdict = self._judge(node, start_ns, arrival_ns, now_s)
        state = self._nodes.pop(node, None) or _NodeClock(start_ns, now_s)
        state.start_ns, state.seen_s = start_ns, now_s
        state.off, state.offset_s = not verdict.accepted, verdict.offset_s
        state.refused += not verdict.accepted
        self._nodes[node] = state  # most recently heard last
        while len(self._nodes) > MAX_TRACKED_NODES:
            self._nodes.popitem(last=False)
        return verdict

    def off_nodes(self, now_s: float) -> dict[str, dict[str, float]]:
        """Nodes whose latest message (within ``memory_s``) was refused for its clock, with how far off
        they are (seconds) and how many of their messages were refused so far."""
        return {node: {"offset_s": round(s.offset_s, 3), "refused": s.refused}
                for node, s in self._nodes.items() if s.off and now_s - s.seen_s <= self.limits.memory_s}

    def box_offset_s(self, arrival_ns: int, now_s: float) -> float | None:
        """Median start of the recently heard, accepted nodes minus the box wall clock (seconds; a site
        on time reads about minus one window, more negative during a backlog); None when none."""
        starts = sorted(s.start_ns for s in self._recent(now_s, exclude=None) if not s.off)
        if not starts:
            return None
        return (starts[len(starts) // 2] - arrival_ns) / 1e9

    # ------------------------------------------------------------------ internals
    def _judge(self, node: str, start_ns: int, arrival_ns: int, now_s: float) -> ClockVerdict:
        if not 0 < start_ns <= MAX_START_NS:
            return ClockVerdict(False, "clock_absurd", (start_ns - arrival_ns) / 1e9,
                                f"{node}: window start {start_ns} ns is not a time any clock shows")
        # Where each other node's clock stands now: its latest start plus the time since we heard it
        # (after a site-wide pause, a node's next start is that much later, not a clock error).
        recent = self._recent(now_s, exclude=node)
        trusted = [s.start_ns + int((now_s - s.seen_s) * 1e9) for s in recent if not s.off]
        if len(trusted) >= 2:
            return self._by_site(node, start_ns, trusted)
        by_box = self._by_box(node, start_ns, arrival_ns)
        heard = [s.start_ns + int((now_s - s.seen_s) * 1e9) for s in recent]
        if by_box.accepted or len(heard) < 2:
            return by_box
        # The box clock says no, but the nodes heard so far (all refused by it) agree with this one:
        # this box's clock is what is wrong, and the site goes on.
        by_site = self._by_site(node, start_ns, heard)
        return by_site if by_site.accepted else by_box

    def _by_site(self, node: str, start_ns: int, others: list[int]) -> ClockVerdict:
        skew_ns = self.limits.max_skew_s * 1e9
        agree = sum(abs(start_ns - other) <= skew_ns for other in others)
        ordered = sorted(others)
        offset_s = (start_ns - ordered[len(ordered) // 2]) / 1e9
        if 2 * agree >= len(others):
            return ClockVerdict(True, offset_s=offset_s)
        return ClockVerdict(False, "clock_skew", offset_s,
                            f"{node}: window start {offset_s:+.1f} s from the site's other {len(others)} nodes "
                            f"(agrees with {agree}); is its clock set?")

    def _by_box(self, node: str, start_ns: int, arrival_ns: int) -> ClockVerdict:
        offset_s = (start_ns - arrival_ns) / 1e9
        if offset_s > self.limits.max_ahead_s:
            return ClockVerdict(False, "clock_ahead", offset_s,
                                f"{node}: window start {offset_s:+.1f} s ahead of this box's clock")
        if -offset_s > self.limits.max_behind_s:
            return ClockVerdict(False, "clock_behind", offset_s,
                                f"{node}: window start {-offset_s:.1f} s behind this box's clock, older "
                                "than any backlog the broker keeps")
        return ClockVerdict(True, offset_s=offset_s)

    def _recent(self, now_s: float, exclude: str | None) -> list[_NodeClock]:
        return [s for n, s in self._nodes.items() if n != exclude and now_s - s.seen_s <= self.limits.memory_s]
