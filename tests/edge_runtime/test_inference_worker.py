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
