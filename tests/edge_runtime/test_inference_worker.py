"""How the inference worker groups queued windows into backend calls."""

import time
from dataclasses import dataclass

from edge_runtime.bounded_queue import BoundedQueue
from edge_runtime.inference_worker import InferenceWorker


@dataclass
class Window:
    name: str
    n_nodes: int


def worker_with(windows, **limits):
    queue = BoundedQueue(100, lambda item: None)
    for window in windows:
        queue.put(window)
    worker = InferenceWorker(backend=None, manifest=None, site="s", windows=queue, store=None,
                             publish=lambda result: None, window_ns=1, **limits)
    return worker, queue


def test_a_batch_holds_one_node_count_and_at_most_max_batch_windows():
    windows = [Window(f"w{i}", 8) for i in range(5)] + [Window("big", 16)]
    worker, queue = worker_with(windows, max_batch=3)
    first = worker._fill_batch(queue.get_nowait())
    assert [w.name for w in first] == ["w0", "w1", "w2"]
    second = worker._fill_batch(queue.get_nowait())
    assert [w.name for w in second] == ["w3", "w4"] and worker._carry.name == "big"


def test_large_sites_go_one_window_per_call_within_the_node_budget():
    """Memory grows with batch x (nodes x tokens)^2: the node budget caps node-windows per call."""
    worker, queue = worker_with([Window(f"w{i}", 32) for i in range(5)], max_batch=8, max_batch_nodes=64)
    assert len(worker._fill_batch(queue.get_nowait())) == 2
    worker, queue = worker_with([Window(f"w{i}", 64) for i in range(3)], max_batch=8, max_batch_nodes=64)
    assert len(worker._fill_batch(queue.get_nowait())) == 1
    worker, queue = worker_with([Window(f"w{i}", 100) for i in range(3)], max_batch=8, max_batch_nodes=64)
    assert len(worker._fill_batch(queue.get_nowait())) == 1  # never fewer than one


def assembled(index):
    import numpy as np

    from edge_runtime.window_assembler import AssembledWindow

    return AssembledWindow(window_index=index, window_start_ns=index * 10**9, grid_start_ns=index * 10**9,
                           node_ids=("n01",), inputs={"x": np.zeros((1, 2), np.float32)}, present={"m": ("n01",)},
                           expected=1, received=1, complete=True, reason="complete", first_arrival_s=0.0,
                           closed_s=0.0, message_count=1, receipts=[f"r{index}"])


class Backend:
    def run(self, inputs):
        return {"y": inputs["x"].sum(axis=(1, 2))}


class Acks:
    """A ``WindowAcks`` that records (window index, acknowledged, decision) per report."""

    def __init__(self, released):
        self.released = released

    def window_stored(self, window):
        self.released.append((window.window_index, True, "stored"))

    def window_failed(self, window):
        self.released.append((window.window_index, True, "failed"))

    def window_unstored(self, window):
        self.released.append((window.window_index, False, "unstored"))


def worker_on(store, released, published, stop):
    from types import SimpleNamespace

    manifest = SimpleNamespace(name="m", version="1", task="t", outputs=(), class_names=())
    worker = InferenceWorker(Backend(), manifest, "s", BoundedQueue(4, lambda item: None), store,
                             published.append, max_batch=4, window_ns=10**9, acks=Acks(released))
    worker.stop_inference = stop
    return worker


def test_a_failed_store_is_retried_and_nothing_is_acknowledged_until_it_is_stored(tmp_path, monkeypatch, fail_writes):
    """Disk full for a while: the batch waits (its messages unacknowledged), then is stored and only
    then acknowledged and published; nothing is lost, nothing acknowledged unstored."""
    import threading

    from edge_runtime import inference_worker
    from edge_runtime.result_store import ResultStore

    monkeypatch.setattr(inference_worker, "RETRY_FIRST_S", 0.02)
    store = ResultStore(tmp_path / "r.sqlite3")
    heal = fail_writes(tmp_path / "r.sqlite3")
    released, published = [], []
    worker = worker_on(store, released, published, threading.Event())
    done = threading.Thread(target=worker.process, args=([assembled(1), assembled(2)],))
    done.start()
    deadline = time.monotonic() + 5
    while worker.snapshot_counts().get("store_failures", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.storage_failing_since is not None
    assert released == [] and published == [] and store.count() == 0
    heal()
    done.join(10)
    assert not done.is_alive()
    assert released == [(1, True, "stored"), (2, True, "stored")] and len(published) == 2 and store.count() == 2
    assert worker.storage_failing_since is None and worker.snapshot_counts()["results"] == 2
    assert store.grid_phase("s", 10**9) == 0  # the grid is recorded with the first results


def test_at_shutdown_an_unstored_batch_stays_with_the_broker(tmp_path, fail_writes):
    """Stopping while the disk still fails: the messages are let go unacknowledged, for the broker to
    hand to the next process (acknowledging them would lose them)."""
    import threading

    from edge_runtime.result_store import ResultStore

    store = ResultStore(tmp_path / "r.sqlite3")
    fail_writes(tmp_path / "r.sqlite3")
    released, published = [], []
    stop = threading.Event()
    stop.set()
    worker = worker_on(store, released, published, stop)
    assert worker.process([assembled(1), assembled(2)]) == []
    assert released == [(1, False, "unstored"), (2, False, "unstored")] and published == []
    assert worker.snapshot_counts()["windows_unstored"] == 2


def test_a_result_that_cannot_be_stored_does_not_take_its_batch_down(tmp_path):
    """A window whose start no SQLite integer holds (2^63 - 1) is counted and released alone; the
    other windows of its batch are stored (the whole batch used to fail with an OverflowError)."""
    import threading

    from edge_runtime.result_store import ResultStore

    store = ResultStore(tmp_path / "r.sqlite3")
    released, published = [], []
    worker = worker_on(store, released, published, threading.Event())
    bad = assembled(3)
    bad.window_start_ns = bad.grid_start_ns = 2**63 - 1
    worker.process([assembled(1), bad, assembled(2)])
    assert sorted(released) == [(1, True, "stored"), (2, True, "stored"), (3, True, "failed")]
    assert store.count() == 2 and worker.snapshot_counts()["windows_invalid"] == 1
