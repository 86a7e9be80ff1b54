"""A bounded FIFO between pipeline stages that sheds its oldest item instead of blocking."""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any


class BoundedQueue:
    """A FIFO that drops (and counts) its oldest item instead of blocking the producer."""

    def __init__(self, maxsize: int, on_drop: Callable[[Any], None]):
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._on_drop = on_drop

    def put(self, item: Any) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._on_drop(self._queue.get_nowait())
                except queue.Empty:
                    continue

    def get(self, timeout: float | None) -> Any:
        """The next item, or None after ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def get_nowait(self) -> Any:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def qsize(self) -> int:
        return self._queue.qsize()
