"""Publishes frames at the times the link model says they reach the broker.

As fast as possible (simulated clock), the runner calls :meth:`run_due` after each window; in real
time, a background thread publishes each frame when its wall-clock time comes, so link delay and
jitter are real delays a receiver can measure. ``speed`` > 1 runs the same timeline compressed
(trial time t falls due at epoch + t / speed): delays shrink by the same factor, so a receiver
whose deadlines are scaled alike sees the same late and on-time messages in less wall time.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class DeliveryScheduler:
    """A time-ordered queue of publish actions keyed by trial time (seconds)."""

    def __init__(self, *, realtime: bool, epoch_monotonic: float | None = None, speed: float = 1.0):
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self.realtime = realtime
        self.speed = speed  # trial seconds per wall-clock second (real time: 1)
        self.epoch = time.monotonic() if epoch_monotonic is None else epoch_monotonic
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self.failures = 0
        self._thread: threading.Thread | None = None
        if realtime:
            self._thread = threading.Thread(target=self._run, name="delivery-scheduler", daemon=True)
            self._thread.start()

    def schedule(self, t_s: float, action: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (t_s, next(self._counter), action))
            self._cond.notify()

    def run_due(self, now_s: float) -> int:
        """Simulated clock: run every action due at or before ``now_s``, in time order."""
        done = 0
        while True:
            with self._cond:
                if not self._heap or self._heap[0][0] > now_s:
                    return done
                _, _, action = heapq.heappop(self._heap)
            self._execute(action)
            done += 1

    def drain(self, timeout_s: float = 30.0) -> None:
        """Run everything left: at once (simulated) or as it falls due (real time)."""
        if not self.realtime:
            self.run_due(float("inf"))
            return
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._heap and time.monotonic() < deadline:
                self._cond.wait(0.05)
        self.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._due_in(self._heap[0][0]) > 0):
                    self._cond.wait(self._due_in(self._heap[0][0]) if self._heap else None)
                if self._closed:
                    return
                _, _, action = heapq.heappop(self._heap)
                self._cond.notify_all()  # drain() may be waiting for the heap to empty
            self._execute(action)

    def _due_in(self, t_s: float) -> float:
        return self.epoch + t_s / self.speed - time.monotonic()

    def _execute(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception:  # noqa: BLE001 - one failed publish must not stop the others
            self.failures += 1
            log.exception("delivery failed")
