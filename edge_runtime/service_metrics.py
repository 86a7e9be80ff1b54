"""The aggregator's Prometheus metrics, fed from the components' own counters.

Components count in plain ``collections.Counter``s (cheap on the hot path, easy to assert in tests);
at every scrape one ``AggregatorStats`` snapshot is taken (``Aggregator.stats()``, bound with
``bind``), the deltas of its counters since the previous scrape are added to the Prometheus counters,
and the gauges are set from it. Latency histograms are observed directly by the inference worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from edge_runtime import service_health
from edge_runtime.aggregator_stats import AggregatorStats
from edge_runtime.metrics import MetricsServer, RateLimitedLogger, Registry

log = logging.getLogger("edge_runtime")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)


class _SyncingRegistry(Registry):
    """A registry that brings the counters up to date before it renders."""

    def __init__(self, before_render: Callable[[], None]):
        super().__init__()
        self._before_render = before_render

    def render(self) -> str:
        self._before_render()
        return super().render()


class ServiceMetrics:
    def __init__(self, log_interval_s: float = 10.0):
        self.registry = _SyncingRegistry(self.sync)
        r = self.registry
        self.messages = r.counter("spar_messages_total", "Messages handled, by outcome", ["outcome"])
        self.rejected = r.counter("spar_messages_rejected_total", "Messages rejected, by reason", ["reason"])
        self.windows = r.counter("spar_windows_total", "Windows closed, by outcome", ["outcome"])
        self.closed_by = r.counter("spar_windows_closed_total", "Windows closed, by what closed them "
                                   "(complete, early: nothing more will come, deadline, forced, shutdown)", ["by"])
        self.window_messages = r.counter("spar_window_messages_total",
                                         "Token messages the assembler set aside, by kind", ["kind"])
        self.overload = r.counter("spar_overload_dropped_total",
                                  "Oldest work dropped because a queue was full", ["item"])
        self.results = r.counter("spar_results_total", "Results stored and published")
        self.node_store_failures = r.counter("spar_node_store_failures_total",
                                             "Writes of joined or moved nodes to SQLite that failed "
                                             "(the running registry is right; a restart would miss them)")
        self.store_failures = r.counter("spar_store_failures_total",
                                        "Failed SQLite stores of results (each is retried until it works)")
        self.sessions_lost = r.counter("spar_broker_sessions_lost_total",
                                       "Connections on which the broker no longer had our persistent session")
        self.problems = r.gauge("spar_health_problem", "1 while /healthz reports this problem", ["problem"])
        self.clock_off = r.gauge("spar_node_clock_off", "1 while a node's window starts are refused for its clock",
                                 ["node"])
        self.queue_depth = r.gauge("spar_queue_depth", "Items waiting in a queue", ["queue"])
        self.open_windows = r.gauge("spar_open_windows", "Windows being assembled")
        self.nodes = r.gauge("spar_nodes", "Nodes by state", ["state"])
        self.histograms = {
            "inference_seconds": r.histogram("spar_inference_seconds", "Backend call duration",
                                             LATENCY_BUCKETS),
            "added_latency_seconds": r.histogram("spar_added_latency_seconds",
                                                 "Window complete -> result published", LATENCY_BUCKETS),
            "wait_seconds": r.histogram("spar_window_wait_seconds",
                                        "Window complete (its last message arrived) -> inference starts",
                                        LATENCY_BUCKETS),
            "store_seconds": r.histogram("spar_store_seconds", "SQLite commit of one batch of results",
                                         LATENCY_BUCKETS),
            "end_to_end_seconds": r.histogram("spar_end_to_end_latency_seconds",
                                              "Window end (node clock) -> result published", E2E_BUCKETS),
        }
        self.rate_log = RateLimitedLogger(log, log_interval_s)
        self._stats: Callable[[], AggregatorStats] | None = None
        self._seen: dict[tuple[str, str], float] = {}
        self._clock_off_nodes: set[str] = set()  # nodes ever reported (site nodes only: bounded)
        self._sync_lock = threading.Lock()
        self._server: MetricsServer | None = None

    def bind(self, stats: Callable[[], AggregatorStats]) -> None:
        """Read the service through ``stats`` (``Aggregator.stats``) at every scrape and /healthz."""
        self._stats = stats

    # ------------------------------------------------------------------ hot-path hooks
    def dropped(self, item: str) -> None:
        self.overload.inc(item=item)
        self.rate_log.warning(f"overload.{item}", "queue full: dropped the oldest %s", item)

    def observe(self, name: str, value: float) -> None:
        histogram = self.histograms.get(name)
        if histogram is not None and value is not None:
            histogram.observe(value)

    def warn(self, key: str, message: str) -> None:
        self.rate_log.warning(key, "%s", message)

    # ------------------------------------------------------------------ scrape
    def sync(self) -> None:
        """Add the component counters' growth since the last scrape; refresh the gauges."""
        read = self._stats
        if read is None:
            return
        with self._sync_lock:
            stats = read()
            for key, value in stats.messages.items():
                kind, _, reason = key.partition(".")
                if kind == "rejected":
                    self._advance(self.rejected, "reject", key, value, reason=reason)
                else:
                    self._advance(self.messages, "msg", key, value, outcome=key)
            windows = stats.windows
            for outcome in ("complete", "partial"):
                self._advance(self.windows, "win", outcome, windows.get(f"windows_{outcome}", 0), outcome=outcome)
            for by in ("complete", "early", "deadline", "forced", "shutdown"):
                self._advance(self.closed_by, "closed", by, windows.get(f"closed_{by}", 0), by=by)
            for kind in ("late", "duplicate", "out_of_order"):
                self._advance(self.window_messages, "wm", kind, windows.get(kind, 0), kind=kind)
            inference = stats.inference
            self._advance(self.windows, "win", "failed", inference.get("windows_failed", 0), outcome="failed")
            self._advance(self.results, "res", "results", inference.get("results", 0))
            self._advance(self.store_failures, "sf", "failed", inference.get("store_failures", 0))
            self._advance(self.sessions_lost, "sl", "lost", stats.sessions_lost)
            found = service_health.problems(stats)
            for problem in service_health.HEALTH_PROBLEMS:
                self.problems.set(int(problem in found), problem=problem)
            off = stats.clock_off_nodes
            for node in set(off) | self._clock_off_nodes:  # a node that recovered reads 0
                self.clock_off.set(int(node in off), node=node)
            self._clock_off_nodes |= set(off)
            self._advance(self.node_store_failures, "nsf", "failed", stats.registry.get("node_store_failed", 0))
            self.queue_depth.set(stats.queued_windows, queue="windows")
            self.queue_depth.set(stats.queued_window_messages, queue="window_messages")
            self.queue_depth.set(stats.queued_messages, queue="messages")
            self.open_windows.set(stats.open_windows)
            online = sum(stats.nodes.values())
            self.nodes.set(online, state="online")
            self.nodes.set(len(stats.nodes) - online, state="offline")
            self.nodes.set(len(stats.refused_nodes), state="refused")

    def _advance(self, counter: Any, family: str, key: str, value: float, **labels: Any) -> None:
        previous = self._seen.get((family, key), 0)
        if value > previous:
            counter.inc(value - previous, **labels)
            self._seen[(family, key)] = value

    # ------------------------------------------------------------------ HTTP endpoint
    def start_server(self, host: str, port: int | None, routes: Mapping[str, Any] | None = None,
                     route_auth: Callable[[str | None], bool] | None = None) -> int | None:
        """Serve /metrics, /healthz and ``routes`` (the dashboard, behind ``route_auth``) on host:port;
        None: no server."""
        if port is None:
            return None
        read = self._stats
        health = (lambda: service_health.health_report(read())) if read is not None else None
        self._server = MetricsServer(self.registry, host, port, health=health, routes=routes,
                                     route_auth=route_auth).start()
        log.info("metrics on %s", self._server.url)
        return self._server.port

    @property
    def port(self) -> int | None:
        return self._server.port if self._server else None

    @property
    def url(self) -> str | None:
        """http://host:port of the running server (metrics, health, dashboard), None without one."""
        return self._server.url if self._server else None

    def stop_server(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

