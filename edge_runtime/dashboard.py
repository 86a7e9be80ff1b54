"""The aggregator's live dashboard: one static page, a read-only JSON API and server-sent events,
served by the same HTTP server as ``/metrics`` and ``/healthz`` (``edge_runtime.metrics``).

    GET /                      the page (``edge_runtime/dashboard_static/``: no build step, no CDN)
    GET /static/<file>         its script and style
    GET /api/site              site, model, outputs, class names, window length, trained node layout
    GET /api/nodes             every node: position, state, last message, messages/s and kB/s
    GET /api/results?since=NS&limit=N   stored results with window_start_ns > NS, oldest first
                               (without since: the newest N, oldest first), from SQLite opened
                               read-only; N at most 500, default 100
    GET /api/summary           the last hour: window completeness, end-to-end latency, rejected and
                               late messages by reason
    GET /events                ``text/event-stream``: a ``result`` event per stored window, and
                               ``nodes`` + ``summary`` events every 2 s

The page never reads SQLite itself: history comes from ``/api/results`` once, live updates from the
aggregator's own state through ``/events``. Everything here reads; nothing a browser sends changes
the aggregator. Node ids come from the wire, so the per-node traffic table is bounded.
"""

from __future__ import annotations

import collections
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from edge_runtime.metrics import Response

STATIC = Path(__file__).with_name("dashboard_static")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
HOUR_S = 3600.0
MAX_RECENT = 4000  # results kept for the hour's summary (a 2 s window gives 1800 an hour)
MAX_TRACKED_NODES = 256  # per-node traffic rows; ids beyond share one row (ids come from the wire)
OTHER_NODES = "<other>"
MAX_STREAMS = 8  # browsers following /events at once; more get 503
STREAM_QUEUE = 64  # events waiting for a slow browser; beyond, the oldest go
TICK_S = 2.0  # nodes + summary events
RATE_WINDOW_S = 10.0  # messages/s and kB/s over the last this many seconds
MAX_RESULTS_PER_CALL = 500


@dataclass
class _Traffic:
    """One node's recent messages: (monotonic arrival, payload bytes), the last RATE_WINDOW_S."""

    arrivals: collections.deque
    last_wall_ns: int = 0


class DashboardFeed:
    """What the page shows, fed by the aggregator's threads and read by the HTTP threads.

    Args:
        site: everything ``/api/site`` returns (JSON-able).
        nodes: returns the registry's nodes (``RegisteredNode``) and the refused ones {id: why}.
        layout_positions: node id -> position in the site layout (to tell moved nodes apart).
        counters: returns {"rejected": {reason: n}, "windows": {outcome: n}} from the service metrics.
        window_s: the site's window length (a node silent for 2 windows while online is "late").
        results: ``(since_ns or None, limit) -> stored results, oldest first`` (read-only SQLite; None:
            the newest ``limit``).
    """

    def __init__(self, site: Mapping[str, Any], nodes: Callable[[], tuple[list[Any], dict[str, str]]],
                 layout_positions: Mapping[str, tuple[float, ...]],
                 counters: Callable[[], Mapping[str, Mapping[str, float]]], window_s: float,
                 results: Callable[[int | None, int], list[dict[str, Any]]],
                 clock: Callable[[], float] = time.monotonic):
        self.site = dict(site)
        self._nodes, self._layout, self._counters = nodes, dict(layout_positions), counters
        self.window_s, self._results, self._clock = float(window_s), results, clock
        self._lock = threading.Lock()
        self._traffic: dict[str, _Traffic] = {}
        self._recent: collections.deque = collections.deque(maxlen=MAX_RECENT)  # (monotonic, result summary)
        self._streams: list[queue.Queue] = []
        self._closed = threading.Event()

    # ------------------------------------------------------------------ fed by the aggregator
    def message(self, topic: str, size: int) -> None:
        """One message arrived on ``topic`` (spar/v1/<site>/<node>/...) with ``size`` payload bytes."""
        parts = topic.split("/") if isinstance(topic, str) else []
        node = parts[3] if len(parts) > 4 and parts[3] != "aggregator" else None
        if node is None:
            return
        now = self._clock()
        with self._lock:
            if node not in self._traffic and len(self._traffic) >= MAX_TRACKED_NODES:
                node = OTHER_NODES
            row = self._traffic.setdefault(node, _Traffic(collections.deque()))
            row.arrivals.append((now, int(size)))
            row.last_wall_ns = time.time_ns()
            while row.arrivals and now - row.arrivals[0][0] > RATE_WINDOW_S:
                row.arrivals.popleft()

    def result(self, result: Mapping[str, Any]) -> None:
        """A window's result was stored: remembered for the summary and pushed to every browser."""
        brief = {"complete": bool(result.get("complete")), "end_to_end_ms": (result.get("latency_ms") or {})
                 .get("end_to_end")}
        with self._lock:
            self._recent.append((self._clock(), brief))
        self._push("result", result)

    def close(self) -> None:
        """End every open event stream (the aggregator stops)."""
        self._closed.set()
        self._push("bye", {})

    # ------------------------------------------------------------------ read by the HTTP threads
    def nodes(self) -> list[dict[str, Any]]:
        """Every registered or refused node with its state and traffic, layout order first."""
        registered, refused = self._nodes()
        now = self._clock()
        with self._lock:
            traffic = {k: (list(v.arrivals), v.last_wall_ns) for k, v in self._traffic.items()}
        out = []
        for node in registered:
            arrivals, last_ns = traffic.get(node.id, ([], 0))
            out.append({"id": node.id, "position": list(node.position), "slot": node.node_index,
                        "state": self._state(node, arrivals, now), "last_message_ns": last_ns or None,
                        **_rates(arrivals, now)})
        for node_id, why in refused.items():
            arrivals, last_ns = traffic.get(node_id, ([], 0))
            out.append({"id": node_id, "position": None, "slot": None, "state": "refused", "why": why,
                        "last_message_ns": last_ns or None, **_rates(arrivals, now)})
        return out

    def _state(self, node: Any, arrivals: list[tuple[float, int]], now: float) -> str:
        if not node.online:
            return "offline"
        if arrivals and now - arrivals[-1][0] > 2 * self.window_s:
            return "late"
        if not node.from_layout:
            return "joined"
        layout = self._layout.get(node.id)
        if layout is not None and tuple(round(v, 3) for v in layout) != tuple(round(v, 3) for v in node.position):
            return "moved"
        return "online"

    def summary(self) -> dict[str, Any]:
        """The last hour: completeness, end-to-end latency percentiles, per-minute series, totals by
        reason."""
        now = self._clock()
        with self._lock:
            timed = [(t, brief) for t, brief in self._recent if now - t <= HOUR_S]
            traffic = [a for v in self._traffic.values() for a in v.arrivals]
        recent = [brief for _, brief in timed]
        latencies = sorted(b["end_to_end_ms"] for b in recent if b["end_to_end_ms"] is not None)
        counters = self._counters()
        rates = _rates(traffic, now)
        return {"windows": len(recent),
                "complete_share": (sum(b["complete"] for b in recent) / len(recent)) if recent else None,
                "latency_ms": {"p50": _pct(latencies, 50), "p95": _pct(latencies, 95),
                               "max": latencies[-1] if latencies else None},
                "minutes": _per_minute(timed, now),
                "messages_per_s": rates["messages_per_s"], "kb_per_s": rates["kb_per_s"],
                "rejected": dict(counters.get("rejected", {})), "windows_by_outcome": dict(counters.get("windows", {}))}

    def results(self, since_ns: int | None, limit: int) -> list[dict[str, Any]]:
        return self._results(since_ns, max(1, min(int(limit), MAX_RESULTS_PER_CALL)))

    # ------------------------------------------------------------------ server-sent events
    def _push(self, event: str, data: Any) -> None:
        text = f"event: {event}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n".encode()
        with self._lock:
            streams = list(self._streams)
        for q in streams:
            while True:
                try:
                    q.put_nowait(text)
                    break
                except queue.Full:  # a slow browser loses its oldest events, never the aggregator's time
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass

    def stream(self, max_events: int | None = None) -> Iterator[bytes] | None:
        """The /events body, or None when MAX_STREAMS browsers already follow it."""
        q: queue.Queue = queue.Queue(STREAM_QUEUE)
        with self._lock:
            if len(self._streams) >= MAX_STREAMS:
                return None
            self._streams.append(q)
        return self._follow(q, max_events)

    def _follow(self, q: queue.Queue, max_events: int | None) -> Iterator[bytes]:
        sent = 0
        try:
            yield b"retry: 2000\n\n"
            yield self._tick()
            while not self._closed.is_set() and (max_events is None or sent < max_events):
                try:
                    chunk = q.get(timeout=TICK_S)
                except queue.Empty:
                    chunk = self._tick()
                if chunk.startswith(b"event: bye"):
                    return
                yield chunk
                sent += 1
        finally:
            with self._lock:
                if q in self._streams:
                    self._streams.remove(q)

    def _tick(self) -> bytes:
        body = json.dumps({"nodes": self.nodes(), "summary": self.summary()}, default=str, separators=(",", ":"))
        return f"event: state\ndata: {body}\n\n".encode()

    # ------------------------------------------------------------------ HTTP routes
    def routes(self) -> dict[str, Callable[[Mapping[str, list[str]]], Response]]:
        """Path -> handler, for ``MetricsServer(routes=...)``."""
        return {"/": lambda _q: _static("index.html"), "/index.html": lambda _q: _static("index.html"),
                "/static/dashboard.js": lambda _q: _static("dashboard.js"),
                "/static/dashboard.css": lambda _q: _static("dashboard.css"),
                "/api/site": lambda _q: _json(self.site), "/api/nodes": lambda _q: _json(self.nodes()),
                "/api/summary": lambda _q: _json(self.summary()), "/api/results": self._results_route,
                "/events": self._events_route}

    def _results_route(self, query: Mapping[str, list[str]]) -> Response:
        try:
            since = int(query["since"][0]) if "since" in query else None
            limit = int(query.get("limit", ["100"])[0])
        except ValueError:
            return _json({"error": "since (window_start_ns) and limit must be integers"}, HTTPStatus.BAD_REQUEST)
        return _json(self.results(since, limit))

    def _events_route(self, _query: Mapping[str, list[str]]) -> Response:
        body = self.stream()
        if body is None:
            return _json({"error": f"at most {MAX_STREAMS} browsers follow /events at once"},
                         HTTPStatus.SERVICE_UNAVAILABLE)
        return Response(HTTPStatus.OK, "text/event-stream", body, headers={"Cache-Control": "no-cache"})


def _rates(arrivals: list[tuple[float, int]], now: float) -> dict[str, float]:
    recent = [size for t, size in arrivals if now - t <= RATE_WINDOW_S]
    return {"messages_per_s": round(len(recent) / RATE_WINDOW_S, 3),
            "kb_per_s": round(sum(recent) / 1000.0 / RATE_WINDOW_S, 3)}


def _per_minute(timed: list[tuple[float, dict[str, Any]]], now: float) -> list[dict[str, Any]]:
    """Windows, complete share and median end-to-end latency per minute of the last hour, oldest
    first; minutes without a result are left out."""
    minutes: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for t, brief in timed:
        minutes[min(int((now - t) // 60), 59)].append(brief)
    out = []
    for ago in sorted(minutes, reverse=True):
        briefs = minutes[ago]
        latencies = sorted(b["end_to_end_ms"] for b in briefs if b["end_to_end_ms"] is not None)
        out.append({"minutes_ago": ago, "windows": len(briefs),
                    "complete_share": sum(b["complete"] for b in briefs) / len(briefs),
                    "latency_p50_ms": _pct(latencies, 50)})
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))])


def _json(value: Any, status: HTTPStatus = HTTPStatus.OK) -> Response:
    return Response(status, "application/json", json.dumps(value, default=str).encode())


def _static(name: str) -> Response:
    path = STATIC / name
    return Response(HTTPStatus.OK, STATIC_TYPES[path.suffix], path.read_bytes(),
                    headers={"Cache-Control": "no-cache"})


def feed_for(aggregator: Any) -> DashboardFeed:
    """The feed of a running ``edge_runtime.service.Aggregator``: its registry, counters (``stats()``)
    and store."""
    from edge_runtime.result_store import ResultStore

    agg = aggregator
    manifest, layout = agg.manifest, agg.layout
    site = {"site": agg.site, "model": f"{manifest.name}@{manifest.version}", "task": manifest.task,
            "outputs": [o.name for o in manifest.outputs], "class_names": list(manifest.class_names),
            "window_s": agg.window_ns / 1e9, "position_dim": manifest.position_dim,
            "layout": [{"id": n.id, "position": list(n.position)} for n in layout.nodes]}

    def counters() -> dict[str, dict[str, float]]:
        stats = agg.stats()  # edge_runtime.aggregator_stats.AggregatorStats
        rejected = {k.partition(".")[2]: v for k, v in stats.messages.items() if k.startswith("rejected.")}
        assembled = stats.windows
        for kind, label in (("late", "late: after its window closed"), ("duplicate", "duplicate")):
            if assembled.get(kind):
                rejected[label] = assembled[kind]
        return {"rejected": rejected,
                "windows": {o: assembled.get(f"windows_{o}", 0) for o in ("complete", "partial")}}

    def stored(since_ns: int | None, limit: int) -> list[dict[str, Any]]:
        with ResultStore(agg.config.database, readonly=True) as store:
            if since_ns is None:
                return store.query(site=agg.site, limit=limit, newest_first=True)[::-1]
            return store.query(site=agg.site, since_ns=since_ns + 1, limit=limit, newest_first=False)

    return DashboardFeed(site, lambda: (agg.registry.nodes(), agg.registry.refused()),
                         {n.id: tuple(n.position) for n in layout.nodes}, counters, agg.window_ns / 1e9, stored)


def basic_auth(password_file: Path | None) -> Callable[[str | None], bool] | None:
    """An Authorization-header check for HTTP Basic with the password in ``password_file`` (any user
    name), or None without a file. The password is read once, at start; an unreadable or empty file
    is an error, not an open dashboard."""
    import base64
    import hmac

    from edge_runtime.errors import AggregatorError

    if password_file is None:
        return None
    try:
        secret = Path(password_file).read_text().strip().encode()
    except OSError as exc:
        raise AggregatorError(f"dashboard_password_file {password_file}: {exc.strerror or exc}") from None
    if not secret:
        raise AggregatorError(f"dashboard_password_file {password_file} is empty")

    def check(header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            _, _, given = base64.b64decode(header[6:], validate=True).partition(b":")
        except ValueError:
            return False
        return hmac.compare_digest(given, secret)

    return check
