"""A bounded FIFO between pipeline stages that sheds its oldest items instead of blocking.

Bounded twice: by item count, and optionally by a total weight (for closed windows: the token
messages they hold unacknowledged at the broker). The weight bound matters because the broker
stops sending once a client holds ``max_inflight_messages`` unacknowledged messages: a queue that
could hold more would make the broker queue the overload instead, and the latency of everything
behind it would grow without bound. Shedding here keeps the broker sending and the latency bounded.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any


class BoundedQueue:
    """A FIFO that drops (and reports) its oldest items instead of blocking the producer.

    Args:
        maxsize: most items held.
        on_drop: called with each dropped item, outside the queue's lock.
        weight: weight of an item (default 1 each).
        max_weight: most total weight held; the newest item is always kept, even if it alone
            weighs more. ``None``: only the count bounds the queue.
        keep: items the bounds do not shed (the oldest other item goes first): for items whose loss
            costs more than their place in the line. Kept items can hold the queue above
            ``maxsize``, up to ``hard_limit`` items, beyond which the oldest of all goes.
        hard_limit: most items held whatever ``keep`` says (default: twice ``maxsize``).
    """

    def __init__(self, maxsize: int, on_drop: Callable[[Any], None], *,
                 weight: Callable[[Any], int] = lambda item: 1, max_weight: int | None = None,
                 keep: Callable[[Any], bool] = lambda item: False, hard_limit: int | None = None):
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.hard_limit = max(maxsize, hard_limit if hard_limit is not None else 2 * maxsize)
        self.max_weight = max_weight
        self._keep = keep
        self._on_drop = on_drop
        self._weight_of = weight
        # (item, weight, kept): whether to keep an item is decided once, when it arrives, so a scan
        # for something to shed never re-parses the items it passes.
        self._items: collections.deque[tuple[Any, int, bool]] = collections.deque()
        self._weight = 0
        self._sheddable = 0  # items not kept: with none, a full queue of kept items costs no scan
        self._ready = threading.Condition(threading.Lock())

    def put(self, item: Any) -> None:
        """Append ``item``; drop the oldest items while a bound is exceeded."""
        dropped = []
        with self._ready:
            weight, kept = self._weight_of(item), self._keep(item)
            self._items.append((item, weight, kept))
            self._weight += weight
            self._sheddable += not kept
            while len(self._items) > self.maxsize or (
                    self.max_weight is not None and self._weight > self.max_weight and len(self._items) > 1):
                victim = self._oldest_to_shed()
                if victim is None:
                    break
                dropped.append(victim)
            self._ready.notify()
        for old in dropped:
            self._on_drop(old)

    def get(self, timeout: float | None) -> Any:
        """The oldest item, or None after ``timeout`` seconds."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._items, timeout):
                return None
            return self._pop()

    def get_nowait(self) -> Any:
        with self._ready:
            return self._pop() if self._items else None

    def qsize(self) -> int:
        with self._ready:
            return len(self._items)

    def weight(self) -> int:
        """Total weight held now."""
        with self._ready:
            return self._weight

    def _oldest_to_shed(self) -> Any:
        """Remove and return the oldest item not to keep; the oldest of all beyond ``hard_limit``;
        None when only kept items remain within that (the queue then runs over by those)."""
        if self._sheddable:
            position = next(i for i, (_, _, kept) in enumerate(self._items) if not kept)
        elif len(self._items) > self.hard_limit:
            position = 0
        else:
            return None
        item, weight, kept = self._items[position]
        del self._items[position]
        self._forget(weight, kept)
        return item

    def _pop(self) -> Any:
        item, weight, kept = self._items.popleft()
        self._forget(weight, kept)
        return item

    def _forget(self, weight: int, kept: bool) -> None:
        self._weight -= weight
        self._sheddable -= not kept
