"""The queue between assembly and inference: bounded by count and by held messages, oldest shed."""

import threading

from edge_runtime.bounded_queue import BoundedQueue


def test_overflow_drops_the_oldest_and_reports_it():
    dropped = []
    q = BoundedQueue(3, dropped.append)
    for item in range(5):
        q.put(item)
    assert dropped == [0, 1] and q.qsize() == 3
    assert [q.get_nowait() for _ in range(4)] == [2, 3, 4, None]


def test_the_weight_bound_sheds_oldest_but_keeps_the_newest():
    """Windows weigh the messages they hold unacknowledged; the newest is kept even when it alone is too heavy."""
    dropped = []
    q = BoundedQueue(100, dropped.append, weight=len, max_weight=10)
    for item in ("aaaa", "bbbb", "cc"):
        q.put(item)
    assert dropped == [] and q.weight() == 10
    q.put("d")
    assert dropped == ["aaaa"] and q.weight() == 7
    q.put("e" * 20)
    assert dropped == ["aaaa", "bbbb", "cc", "d"] and q.qsize() == 1 and q.weight() == 20
    assert q.get(timeout=0) == "e" * 20 and q.weight() == 0


def test_get_waits_for_a_producer_and_times_out_when_none_comes():
    q = BoundedQueue(2, lambda item: None)
    assert q.get(timeout=0.01) is None
    threading.Timer(0.05, q.put, args=("late",)).start()
    assert q.get(timeout=5.0) == "late"


def test_kept_items_are_shed_last_and_only_beyond_twice_the_size():
    """Births and states keep their place while token messages are shed around them."""
    dropped = []
    q = BoundedQueue(3, dropped.append, keep=lambda item: item.startswith("birth"))
    for item in ("birth-a", "data-1", "data-2", "data-3", "data-4"):
        q.put(item)
    assert dropped == ["data-1", "data-2"]
    assert [q.get_nowait() for _ in range(3)] == ["birth-a", "data-3", "data-4"]
    for i in range(8):
        q.put(f"birth-{i}")
    assert dropped[2:] == ["birth-0", "birth-1"] and q.qsize() == 6  # a flood of them is still bounded
