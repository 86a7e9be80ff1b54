"""One snapshot of the aggregator's counters and state: what ``Aggregator.stats()`` returns.

Metrics (``service_metrics``), /healthz (``service_health``) and the dashboard read the running service
only through this snapshot: taken at once, detached from the pipeline's objects (copies, read-only
mappings), so a reader in another thread never reaches into the ingest, assembly or inference stages,
and those stages can change inside without their readers changing. This module imports nothing of
the service.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class AggregatorStats:
    """The aggregator at monotonic time ``taken_s``.

    Counters only grow over the life of the service; the other fields are the state at ``taken_s``.
    Monotonic times are ``time.monotonic()`` seconds, None when it never happened.
    """

    site: str
    model: str  # name@version
    taken_s: float  # monotonic time of the snapshot
    window_ns: int  # the site's window length
    stall_windows: int  # windows without a stored result (while messages arrive) that make "stalled"

    # --- counters
    messages: Mapping[str, int]  # outcome of every message received: accepted, shed, rejected.<reason>, ...
    windows: Mapping[str, int]  # window assembler: windows_complete/partial, closed_<by>, late, duplicate, ...
    inference: Mapping[str, int]  # inference worker: results, batches, windows_failed, store_failures, ...
    registry: Mapping[str, int]  # node registry: joined, moved, refused.<reason>, node_store_failed, ...
    acknowledgements: Mapping[str, int]  # receipts by decision: acked.<decision>, kept.window_unstored, failed
    broker_acks: Mapping[str, int]  # PUBACKs: sent, stale (receipt of an earlier connection)
    received_messages: int  # every message taken from the broker, whatever became of it
    received_bytes: int  # their payload bytes
    sessions_lost: int  # connections on which the broker no longer had our session

    # --- state
    connected: bool  # the subscriber session is connected
    refused_subscriptions: tuple[str, ...]  # "topic: reason" of the latest SUBACK's refusals
    session_lost_s: float | None  # monotonic time the broker last lost our session
    dead_threads: Mapping[str, str]  # thread name -> what ended it (empty while starting or stopping)
    storage_failing_since_s: float | None  # monotonic; None while stores succeed
    last_stored_s: float | None  # monotonic time of the last committed store
    last_accepted_s: float | None  # monotonic arrival of the last token message accepted
    accepting_since_s: float | None  # monotonic start of the current stretch of traffic
    clock_off_nodes: Mapping[str, Mapping[str, float]]  # nodes refused for their clocks -> details
    site_clock_offset_s: float | None  # the site's latest window starts minus this box's clock
    open_windows: int  # being assembled
    queued_windows: int  # closed, waiting for inference
    queued_window_messages: int  # messages those windows hold unacknowledged
    queued_messages: int  # received, waiting to be decoded
    nodes: Mapping[str, bool]  # registered node -> online
    refused_nodes: Mapping[str, str]  # node -> why the registry refused it

    @property
    def stall_s(self) -> float:
        """Seconds without a stored result (while messages arrive) that make the service "stalled"."""
        return self.stall_windows * self.window_ns / 1e9


def frozen_counts(counts: Mapping[str, int]) -> Mapping[str, int]:
    """A read-only copy of a counter another thread may be growing (retried on a concurrent resize)."""
    for _ in range(5):
        try:
            return MappingProxyType(dict(counts))
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return MappingProxyType({})
