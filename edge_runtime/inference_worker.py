"""Inference stage: closed windows -> batches -> backend -> results stored, then published.

A single worker thread takes the oldest closed window; if more are already waiting (a backlog),
it takes up to ``max_batch`` windows with the same node count into one backend call, and no more
than ``max_batch_nodes`` node-windows (large sites go one window at a time). Each result
is committed to SQLite before it is published, so what subscribers see is always on disk, and only
then is the window reported stored (``WindowAcks.window_stored``: ``acknowledgements`` acknowledges its
messages to the broker). A window already stored (the broker redelivered its messages after a
restart) is neither stored nor published again.

A failed store (disk full, I/O error) is retried with backoff until it succeeds, holding the batch:
its messages are neither acknowledged nor let go, so copies the broker redelivers meanwhile join the
window (see ``WindowAssembler``) and are acknowledged with it once it is stored. Meanwhile the
queue ahead sheds live windows as under any overload; backlog is kept. A result that can never be
stored (an invalid value) is counted and given up alone (``window_failed``), not with its batch. Only
at shutdown is an unstored batch let go unacknowledged (``window_unstored``), for the broker to hand to
the next process.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_runtime.acknowledgements import NoAcknowledgements
from edge_runtime.bounded_queue import BoundedQueue
from edge_runtime.errors import AggregatorError
from edge_runtime.pipeline_protocols import Backend, ResultSink, WindowAcks
from edge_runtime.results import Timing, build_result
from edge_runtime.window_assembler import AssembledWindow
from spar_wire.model_manifest import ModelManifest

log = logging.getLogger(__name__)
RETRY_FIRST_S = 0.2  # first wait after a failed store; doubles up to RETRY_MAX_S
RETRY_MAX_S = 5.0


class InferenceWorker:
    def __init__(self, backend: Backend, manifest: ModelManifest, site: str, windows: BoundedQueue,
                 store: ResultSink, publish: Callable[[dict[str, Any]], object], *, max_batch: int,
                 window_ns: int, max_batch_nodes: int | None = None,
                 observe: Callable[[str, float], None] = lambda name, value: None,
                 acks: WindowAcks | None = None):
        """``acks`` hears of every window taken off ``windows``: stored, failed or (at shutdown)
        unstored; None: nothing is acknowledged (no broker)."""
        self.backend = backend
        self.manifest = manifest
        self.site = site
        self.windows = windows
        self.store = store
        self.publish = publish
        self.max_batch = max_batch
        self.max_batch_nodes = max_batch_nodes
        self.window_ns = window_ns
        self.observe = observe
        self.acks: WindowAcks = acks if acks is not None else NoAcknowledgements()
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.last_result: dict[str, Any] | None = None
        self.last_stored_s: float | None = None  # monotonic time of the last committed store
        self.storage_failing_since: float | None = None  # monotonic; None while stores succeed
        self._carry: AssembledWindow | None = None  # a window of another node count, taken next
        # Set when the inference thread is to stop: it then ends store retries too.
        self.stop_inference = threading.Event()

    def run(self, stop_inference: threading.Event) -> None:
        """The inference thread: process windows until ``stop_inference`` is set and none is left."""
        self.stop_inference = stop_inference
        while True:
            window = self._carry or self.windows.get(timeout=0.05)
            self._carry = None
            if window is None:
                if stop_inference.is_set():
                    return
                continue
            batch = self._fill_batch(window)
            try:
                self.process(batch)
            except Exception:  # noqa: BLE001 - a failed batch is counted; the service goes on
                log.exception("inference of %d window(s) failed", len(batch))
                self._count("windows_failed", len(batch))
                # Redelivery would fail the same way, and unacknowledged messages hold the broker's
                # in-flight slots: a failed window is counted and let go (a window reported already
                # gives up no receipt twice).
                for window in batch:
                    self.acks.window_failed(window)

    def process(self, batch: list[AssembledWindow]) -> list[dict[str, Any]]:
        """Run one batch (same node count) through the backend, store and publish its results."""
        started = time.monotonic()
        for window in batch:  # complete -> inference: the decodes still ahead of it, the window queue
            self.observe("wait_seconds", started - window.closed_s)
        inputs = {name: np.stack([w.inputs[name] for w in batch]) for name in batch[0].inputs}
        outputs = self.backend.run(inputs)
        inference_s = time.monotonic() - started
        self.observe("inference_seconds", inference_s)
        now_ns = time.time_ns()
        results = []
        for row, window in enumerate(batch):
            end_to_end = (now_ns - (window.window_start_ns + self.window_ns)) / 1e9
            timing = Timing(assembly_s=window.closed_s - window.first_arrival_s,
                            queue_s=started - window.closed_s, inference_s=inference_s,
                            end_to_end_s=end_to_end)
            results.append(build_result(self.site, window, {k: v[row] for k, v in outputs.items()},
                                        self.manifest, timing, len(batch)))
        results, batch = self._valid(results, batch)
        new = self._store(results, batch)
        if new is None:
            return []
        for result, window, is_new in zip(results, batch, new, strict=True):
            if is_new:
                self._publish(result)
            self.acks.window_stored(window)  # committed (by this run or an earlier one)
            # Added latency: what the aggregator itself adds once the window is complete.
            self.observe("added_latency_seconds", time.monotonic() - window.closed_s)
            self.observe("end_to_end_seconds", result["latency_ms"]["end_to_end"] / 1e3)
        self._count("results", sum(new))
        self._count("results_duplicate_window", len(results) - sum(new))
        self._count("batches")
        self.last_result = results[-1]
        return results

    def _valid(self, results: list[dict[str, Any]], batch: list[AssembledWindow]
               ) -> tuple[list[dict[str, Any]], list[AssembledWindow]]:
        """The results that can be stored; the others are given up alone (retrying cannot help them,
        and they must not take their batch down)."""
        keep = []
        for result, window in zip(results, batch, strict=True):
            try:
                self.store.validate(result)
                keep.append((result, window))
            except AggregatorError as exc:
                log.error("window %s cannot be stored: %s", result.get("window_index"), exc)
                self._count("windows_invalid")
                self.acks.window_failed(window)
        return [r for r, _ in keep], [w for _, w in keep]

    def _store(self, results: list[dict[str, Any]], batch: list[AssembledWindow]) -> list[bool] | None:
        """Commit ``results``, retrying a failed store (see module doc); per result whether it was
        new, or None when shutdown came first and the batch was let go unacknowledged."""
        wait_s = RETRY_FIRST_S
        while True:
            try:
                started = time.monotonic()
                new = self.store.insert_new(results, window_ns=self.window_ns) if results else []
                self.observe("store_seconds", time.monotonic() - started)
            except AggregatorError as exc:
                if self.storage_failing_since is None:
                    self.storage_failing_since = time.monotonic()
                    log.error("storing %d result(s) failed; retrying until it works, their messages stay "
                              "unacknowledged meanwhile: %s", len(results), exc)
                self._count("store_failures")
                if self.stop_inference.wait(wait_s):
                    log.error("stopping with %d result(s) unstored: their messages stay with the broker "
                              "for the next process", len(results))
                    self._count("windows_unstored", len(batch))
                    for window in batch:
                        self.acks.window_unstored(window)
                    return None
                wait_s = min(RETRY_MAX_S, 2 * wait_s)
                continue
            if self.storage_failing_since is not None:
                log.warning("storing results works again after %.1f s", time.monotonic() - self.storage_failing_since)
                self.storage_failing_since = None
            self.last_stored_s = time.monotonic()
            return new

    def _publish(self, result: dict[str, Any]) -> None:
        try:
            self.publish(result)
        except Exception:  # noqa: BLE001 - the result is stored; a failed publish must not fail the window
            log.exception("publishing the result of window %s failed", result.get("window_index"))
            self._count("results_unpublished")

    def snapshot_counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)

    def _fill_batch(self, first: AssembledWindow) -> list[AssembledWindow]:
        batch = [first]
        limit = self.max_batch
        if self.max_batch_nodes is not None:
            limit = max(1, min(limit, self.max_batch_nodes // max(1, first.n_nodes)))
        while len(batch) < limit:
            more = self.windows.get_nowait()
            if more is None:
                break
            if more.n_nodes != first.n_nodes:  # another shape: it starts the next batch
                self._carry = more
                break
            batch.append(more)
        return batch

    def _count(self, key: str, amount: int = 1) -> None:
        with self.lock:
            self.counts[key] += amount


def result_payload(result: dict[str, Any]) -> bytes:
    return json.dumps(result, separators=(",", ":")).encode("utf-8")
