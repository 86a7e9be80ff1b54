"""Decode ahead: token images decompressed on a small thread pool, handed back in arrival order.

Decompressing the token image is most of the aggregator's CPU per message (`spar-bench runtime`'s
cost breakdown), and Pillow's PNG and JPEG decoders and libwebp release the GIL while they work, so a
second thread decodes the next message while the ingest thread assembles this one. Everything with
state (node registry, clock guard, window assembler, counters, receipts) stays on the ingest thread
and sees the messages in arrival order: a pool thread runs only the pure part of a message
(``MessageProcessor.predecode``: header, payload decode, dequantize, patchify), and its outcome is
used when the ingest thread reaches that message. A decode error is raised there, at the step where
the inline path decodes, so a message is counted under the same reason either way.

At most ``2 x threads`` messages are in flight here; beyond that the ingest thread waits for the
oldest decode, so the bounded message queue before it keeps shedding as it does without a pool.
``threads = 1`` decodes inline, exactly as before (no pool thread).

    ahead = DecodeAhead(processor.predecode, threads=2)
    ahead.submit(raw)
    for raw, decoded in ahead.ready(wait=True):
        processor.handle(raw, decoded)
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")
MAX_THREADS = 16


class DecodeAhead:
    def __init__(self, decode: Callable[[Any], Any], threads: int = 1):
        """``decode`` must be safe to call from any thread and must not raise (return the error)."""
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"decode threads must be an integer in 1..{MAX_THREADS}, got {threads!r}")
        self._decode = decode
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None
        self._pending: collections.deque[tuple[Any, Future | None]] = collections.deque()
        self.limit = 2 * threads

    @property
    def pending(self) -> int:
        """Messages submitted and not yet handed back."""
        return len(self._pending)

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.limit

    def submit(self, raw: Any) -> None:
        """Start decoding ``raw`` (inline mode: nothing is decoded here; the caller decodes)."""
        self._pending.append((raw, self._pool.submit(self._decode, raw) if self._pool is not None else None))

    def ready(self, wait: bool) -> Iterator[tuple[Any, Any]]:
        """(raw, decoded) in submission order while the oldest is done; with ``wait`` the oldest is
        waited for first. ``decoded`` is None in inline mode."""
        while self._pending:
            raw, future = self._pending[0]
            if future is not None and not wait and not future.done():
                return
            self._pending.popleft()
            wait = False
            yield raw, (future.result() if future is not None else None)

    def close(self) -> None:
        """Finish the decodes in flight and end the pool threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
