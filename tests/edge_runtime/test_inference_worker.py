"""How the inference worker groups queued windows into backend calls."""

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

    return AssembledWindow(window_index=index, window_start_ns=index * 10**9, node_ids=("n01",),
                           inputs={"x": np.zeros((1, 2), np.float32)}, present={"m": ("n01",)}, expected=1,
                           received=1, complete=True, reason="complete", first_arrival_s=0.0, closed_s=0.0,
                           message_count=1, receipts=[f"r{index}"])


class Backend:
    def run(self, inputs):
        return {"y": inputs["x"].sum(axis=(1, 2))}


class FailingStore:
    def insert_new(self, results, same_window_ns=0):
        from edge_runtime.errors import AggregatorError

        raise AggregatorError("disk full")


def test_a_failed_store_leaves_the_messages_with_the_broker_and_publishes_nothing():
    """Disk full: not acknowledging lets the broker redeliver them later; acknowledging would lose them."""
    from types import SimpleNamespace

    released, published = [], []
    manifest = SimpleNamespace(name="m", version="1", task="t", outputs=(), class_names=())
    worker = InferenceWorker(Backend(), manifest, "s", BoundedQueue(4, lambda item: None), FailingStore(),
                             published.append, max_batch=4, window_ns=10**9,
                             release=lambda window, acknowledge=True: released.append((window.window_index,
                                                                                        acknowledge)))
    assert worker.process([assembled(1), assembled(2)]) == []
    assert released == [(1, False), (2, False)] and published == []
    assert worker.snapshot_counts()["windows_unstored"] == 2
