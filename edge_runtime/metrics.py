"""Prometheus metrics on prometheus_client, one HTTP endpoint for everything, log throttling.

The aggregator counts everything it drops (bad messages, late windows, overload) and exposes the
counts at ``GET /metrics`` in the Prometheus text exposition format 0.0.4, plus ``GET /healthz``.
Other read-only routes (the dashboard, ``edge_runtime.dashboard``) join the same server.
prometheus_client (pure Python, no dependencies) holds the values and writes the format; the thin
classes here check names and labels up front, with errors that say what is wrong, and keep one
registry per aggregator. ``*_created`` series are switched off: they are not part of what the
aggregator documents, and a dashboard would show them as metrics of their own.

Names follow the Prometheus rules: metric names ``[a-zA-Z_:][a-zA-Z0-9_:]*``, label names
``[a-zA-Z_][a-zA-Z0-9_]*`` and not starting with ``__`` (reserved). Counters are not renamed: call
them ``..._total`` yourself, as Prometheus recommends.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import prometheus_client
from prometheus_client.utils import floatToGoString

from edge_runtime.errors import AggregatorError

log = logging.getLogger(__name__)
prometheus_client.disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STREAM_WRITE_TIMEOUT_S = 30.0  # a streamed response whose client has not taken a chunk for this long ends

#: Latency buckets in seconds, from 1 ms to 10 s: the span of a window's end-to-end latency.
DEFAULT_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                      2.5, 5.0, 10.0)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Label names that would collide with the keyword parameters of inc/set/observe (``inc(amount=2)``
# must mean the amount, not a label).
_RESERVED_LABELS = frozenset({"amount", "value"})

LabelKey = tuple[str, ...]


def _check_metric_name(name: str) -> str:
    if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
        raise AggregatorError(f"metrics: invalid metric name {name!r} (must match [a-zA-Z_:][a-zA-Z0-9_:]*)")
    return name


def _check_label_names(metric: str, labelnames: Sequence[str], extra_reserved: frozenset[str]) -> LabelKey:
    if isinstance(labelnames, str):
        # A common slip: labelnames="site" would otherwise become four one-letter labels.
        raise AggregatorError(f"metrics: {metric}: labelnames must be a sequence of names, not a string")
    names = tuple(labelnames)
    for label in names:
        if not isinstance(label, str) or not _LABEL_NAME.fullmatch(label):
            raise AggregatorError(f"metrics: {metric}: invalid label name {label!r} "
                                  "(must match [a-zA-Z_][a-zA-Z0-9_]*)")
        if label.startswith("__"):
            raise AggregatorError(f"metrics: {metric}: label name {label!r} is reserved (starts with __)")
        if label in _RESERVED_LABELS or label in extra_reserved:
            raise AggregatorError(f"metrics: {metric}: label name {label!r} is reserved here")
    if len(set(names)) != len(names):
        raise AggregatorError(f"metrics: {metric}: duplicate label names in {names}")
    return names


def _prometheus_error(metric: str, exc: ValueError) -> AggregatorError:
    text = str(exc)
    if "Duplicated" in text:
        return AggregatorError(f"metrics: {metric}: name {metric!r} is already registered ({text})")
    return AggregatorError(f"metrics: {metric}: {text}")


class _Metric:
    """Name, help and label names checked here (clear errors at startup); values, locking and the
    exposition format are prometheus_client's (``self.collector``)."""

    type_name = ""
    _extra_reserved_labels: frozenset[str] = frozenset()

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (), *,
                 registry: Registry | None = None):
        self.name = _check_metric_name(name)
        self.help = str(help)
        self.labelnames = _check_label_names(name, labelnames, self._extra_reserved_labels)
        try:
            # Not registered yet (registry=None): our Registry checks name clashes first.
            # An unlabelled metric is exported from the start (as 0), so a dashboard sees "nothing
            # happened" rather than "no data".
            self.collector = self._collector()
        except ValueError as exc:
            raise _prometheus_error(name, exc) from None
        if registry is not None:
            registry.register(self)

    def _collector(self) -> Any:
        raise NotImplementedError

    def sample_names(self) -> tuple[str, ...]:
        """Every sample name this metric writes (the registry refuses overlaps)."""
        return (self.name,)

    def _key(self, labels: Mapping[str, Any]) -> LabelKey:
        if set(labels) != set(self.labelnames):
            raise AggregatorError(f"metrics: {self.name}: expected labels {sorted(self.labelnames)}, "
                                  f"got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.labelnames)

    def _child(self, labels: Mapping[str, Any]) -> Any:
        key = self._key(labels)
        return self.collector.labels(*key) if key else self.collector

    def samples(self) -> Iterator[tuple[str, tuple[tuple[str, str], ...], float]]:
        """(sample name, label pairs, value) for every sample, as prometheus_client collects them."""
        for family in self.collector.collect():
            for sample in family.samples:
                yield sample.name, tuple(sample.labels.items()), float(sample.value)

    def remove(self, **labels: Any) -> None:
        """Forget one label combination (e.g. a node that left the site)."""
        key = self._key(labels)
        if key:
            with contextlib.suppress(KeyError):
                self.collector.remove(*key)


class Counter(_Metric):
    """A value that only goes up (events, dropped messages, bytes). Its name ends in ``_total``:
    prometheus_client would otherwise add the suffix, and the metric would not be the one named."""

    type_name = "counter"

    def _collector(self) -> Any:
        if not self.name.endswith("_total"):
            raise AggregatorError(f"metrics: counter {self.name!r} must be named ..._total")
        return prometheus_client.Counter(self.name, self.help, self.labelnames, registry=None)

    def inc(self, amount: float = 1, **labels: Any) -> None:
        """Add ``amount`` (>= 0) to the counter of these label values."""
        amount = float(amount)
        if not amount >= 0:  # also refuses NaN
            raise AggregatorError(f"metrics: {self.name}: a counter only goes up, got inc({amount})")
        self._child(labels).inc(amount)


class Gauge(_Metric):
    """A value that goes up and down (queue depth, nodes online, last window latency)."""

    type_name = "gauge"

    def _collector(self) -> Any:
        return prometheus_client.Gauge(self.name, self.help, self.labelnames, registry=None)

    def set(self, value: float, **labels: Any) -> None:
        self._child(labels).set(float(value))

    def inc(self, amount: float = 1, **labels: Any) -> None:
        self._child(labels).inc(float(amount))

    def dec(self, amount: float = 1, **labels: Any) -> None:
        self.inc(-float(amount), **labels)


class Histogram(_Metric):
    """Distribution of observations in cumulative buckets (``_bucket{le=...}``, ``_sum``, ``_count``).

    ``buckets`` are the finite upper bounds, strictly increasing; ``+Inf`` is always added.
    NaN observations are ignored: one would turn ``_sum`` into NaN for the life of the process.
    """

    type_name = "histogram"
    _extra_reserved_labels = frozenset({"le"})

    def __init__(self, name: str, help: str, buckets: Sequence[float] = DEFAULT_BUCKETS,
                 labelnames: Sequence[str] = (), *, registry: Registry | None = None):
        bounds = [float(b) for b in buckets]
        if bounds and math.isinf(bounds[-1]) and bounds[-1] > 0:
            bounds.pop()
        if not bounds:
            raise AggregatorError(f"metrics: {name}: a histogram needs at least one finite bucket")
        if any(math.isnan(b) or math.isinf(b) for b in bounds):
            raise AggregatorError(f"metrics: {name}: bucket bounds must be finite, got {list(buckets)}")
        if any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
            raise AggregatorError(f"metrics: {name}: buckets must be strictly increasing, "
                                  f"got {list(buckets)}")
        self.buckets: tuple[float, ...] = (*bounds, math.inf)
        super().__init__(name, help, labelnames, registry=registry)

    def _collector(self) -> Any:
        return prometheus_client.Histogram(self.name, self.help, self.labelnames, buckets=self.buckets,
                                           registry=None)

    def sample_names(self) -> tuple[str, ...]:
        return (self.name, f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")

    def observe(self, value: float, **labels: Any) -> None:
        value = float(value)
        child = self._child(labels)
        if not math.isnan(value):
            child.observe(value)


class Registry:
    """The set of metrics one endpoint exports, in registration order (a prometheus_client
    ``CollectorRegistry`` of its own, so two aggregators in one process never share counts)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._collectors = prometheus_client.CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, _Metric] = {}
        self._sample_owner: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> _Metric:
        """Add a metric; refuses a name (or a histogram's ``_bucket``/``_sum``/``_count``) already taken."""
        with self._lock:
            clashes = [name for name in metric.sample_names() if name in self._sample_owner]
            if clashes:
                raise AggregatorError(f"metrics: {metric.name}: name {clashes[0]!r} is already registered")
            try:
                self._collectors.register(metric.collector)
            except ValueError as exc:
                raise _prometheus_error(metric.name, exc) from None
            self._metrics[metric.name] = metric
            for name in metric.sample_names():
                self._sample_owner[name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return Counter(name, help, labelnames, registry=self)

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return Gauge(name, help, labelnames, registry=self)

    def histogram(self, name: str, help: str, buckets: Sequence[float] = DEFAULT_BUCKETS,
                  labelnames: Sequence[str] = ()) -> Histogram:
        return Histogram(name, help, buckets, labelnames, registry=self)

    def get(self, name: str) -> _Metric:
        with self._lock:
            try:
                return self._metrics[name]
            except KeyError:
                raise AggregatorError(f"metrics: no metric named {name!r}") from None

    def render(self) -> str:
        """All metrics in the text exposition format 0.0.4 (prometheus_client's)."""
        return prometheus_client.generate_latest(self._collectors).decode()

    def value(self, name: str, /, **labels: Any) -> float:
        """One sample's value, for tests: ``value("x_total", site="a")``, ``value("h_bucket", le="0.5")``.

        A known metric whose label values were never used reads as 0.0.
        """
        with self._lock:
            metric = self._sample_owner.get(name)
        if metric is None:
            raise AggregatorError(f"metrics: no metric or sample named {name!r}")
        wanted = {key: str(value) for key, value in labels.items()}
        expected = set(metric.labelnames) | ({"le"} if name == f"{metric.name}_bucket" else set())
        if set(wanted) != expected:
            raise AggregatorError(f"metrics: {name}: expected labels {sorted(expected)}, "
                                  f"got {sorted(wanted)}")
        if "le" in wanted:
            # Accept le=0.5 as well as le="0.5" / le="+Inf".
            with contextlib.suppress(ValueError):
                wanted["le"] = floatToGoString(float(labels["le"]))
        for family in metric.collector.collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == wanted:
                    return float(sample.value)
        return 0.0


@dataclass
class Response:
    """What a route answers: a status, a content type and a body; an iterable body is streamed
    chunk by chunk (server-sent events) until it ends or the client goes away."""

    status: HTTPStatus
    content_type: str
    body: bytes | Iterable[bytes]
    headers: dict[str, str] = field(default_factory=dict)


Route = Callable[[Mapping[str, list[str]]], Response]  # parsed query string -> response


class _MetricsHTTPServer(ThreadingHTTPServer):
    # Threads per request die with the process; a stuck scrape must never block shutdown.
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 registry: Registry, health: Callable[[], Mapping[str, Any]], routes: Mapping[str, Route],
                 route_auth: Callable[[str | None], bool] | None = None):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.health = health
        self.routes = dict(routes)
        self.route_auth = route_auth
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host with socket.getfqdn(), a reverse DNS lookup that
        # can stall for seconds on an edge box without DNS; the name is only used for CGI.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a broken client is not worth more than a debug line.
        log.debug("metrics: error while serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsHTTPServer
    # A client that connects and sends nothing is dropped after this many seconds instead of holding
    # a thread forever.
    timeout = 10.0
    server_version = "spar-aggregator-metrics"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (name fixed by BaseHTTPRequestHandler)
        self._respond(with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(with_body=False)

    def _respond(self, *, with_body: bool) -> None:
        url = urlsplit(self.path)
        path = url.path
        route = self.server.routes.get(path)
        if route is not None and path not in ("/metrics", "/healthz"):
            self._route(route, parse_qs(url.query), with_body=with_body)
            return
        if path == "/metrics":
            try:
                status, ctype, body = HTTPStatus.OK, CONTENT_TYPE, self.server.registry.render().encode()
            except Exception as exc:  # a failing metric must not take the endpoint down
                log.warning("metrics: rendering failed: %s", exc)
                status, ctype = HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8"
                body = b"error\n"
        elif path == "/healthz":
            try:
                report = dict(self.server.health())
                # A load balancer or watchdog reads the code, not the body: 503 when failing ("degraded":
                # the service works, some of its inputs do not; restarting it would not help).
                ok = report.get("status", "ok") in ("ok", "degraded")
                status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
                body = json.dumps(report, default=str).encode()
            except Exception as exc:  # the health callable is someone else's code
                log.warning("metrics: health check failed: %s", exc)
                status, body = HTTPStatus.INTERNAL_SERVER_ERROR, json.dumps(
                    {"status": "error", "error": str(exc)}).encode()
            ctype = "application/json"
        else:
            status, ctype, body = HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n"
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)
        except OSError:
            pass  # the client went away; nothing to tell it

    def _route(self, route: Route, query: Mapping[str, list[str]], *, with_body: bool) -> None:
        auth = self.server.route_auth
        try:
            if auth is not None and not auth(self.headers.get("Authorization")):
                response = Response(HTTPStatus.UNAUTHORIZED, "text/plain; charset=utf-8", b"password required\n",
                                    headers={"WWW-Authenticate": 'Basic realm="spar-edge", charset="UTF-8"'})
            else:
                response = route(query)
        except Exception as exc:  # a route is someone else's code; the server stays up
            log.warning("http: %s failed: %s", self.path[:200], exc)
            response = Response(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", b"error\n")
        streamed = not isinstance(response.body, bytes)
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            for name, value in response.headers.items():
                self.send_header(name, value)
            if streamed:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if not with_body:
                return
            if not streamed:
                self.wfile.write(response.body)
                return
            # The stream writes at least every few seconds; a browser that stops reading fills the
            # socket buffer, the write times out and its slot is freed instead of held forever.
            self.connection.settimeout(STREAM_WRITE_TIMEOUT_S)
            for chunk in response.body:
                self.wfile.write(chunk)
                self.wfile.flush()
        except OSError:
            pass  # the client went away; nothing to tell it
        finally:
            close = getattr(response.body, "close", None)
            if streamed and close is not None:
                close()  # ends the generator: the stream unregisters at once

    def log_message(self, format: str, *args: Any) -> None:
        """Request logging off: the aggregator logs what matters itself."""


class MetricsServer:
    """``GET /metrics``, ``GET /healthz`` and any extra read-only ``routes`` on a daemon thread.

    Args:
        registry: what ``/metrics`` renders.
        host: bind address; loopback by default, since metrics reveal the site's layout and load.
        port: 0 picks a free port; read :attr:`port` after :meth:`start`.
        health: returns the JSON object of ``/healthz`` (default ``{"status": "ok"}``).
        routes: path -> handler of the parsed query string (``Route``), e.g. the dashboard's.
        route_auth: checks a request's Authorization header for ``routes`` (``/metrics`` and
            ``/healthz`` stay open to the scraper and the watchdog); None: no check.
    """

    def __init__(self, registry: Registry, host: str = "127.0.0.1", port: int = 0,
                 health: Callable[[], Mapping[str, Any]] | None = None, routes: Mapping[str, Route] | None = None,
                 route_auth: Callable[[str | None], bool] | None = None):
        self.registry = registry
        self.host = host
        self._requested_port = port
        self.health = health or (lambda: {"status": "ok"})
        self.routes = dict(routes or {})
        self.route_auth = route_auth
        self._server: _MetricsHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        """Bind and serve; raises :class:`AggregatorError` when the address cannot be bound."""
        if self._server is not None:
            return self
        try:
            server = _MetricsHTTPServer((self.host, self._requested_port), _Handler, self.registry,
                                        self.health, self.routes, self.route_auth)
        except OSError as exc:
            raise AggregatorError(f"metrics: cannot listen on {self.host}:{self._requested_port}: "
                                  f"{exc}") from exc
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"metrics-http-{self.port}", daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        if self._server is None:
            raise AggregatorError("metrics: server not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving, close the socket and join the thread (idempotent)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout_s)
        self._server = self._thread = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class RateLimitedLogger:
    """Logs at most once per ``interval_s`` per key; the next line for a key says how many were
    suppressed. Hostile input (a node flooding malformed messages) then costs one line per interval.

    Keys are often derived from input (node ids), so at most ``max_keys`` are tracked; past that,
    keys nobody has used for an interval are forgotten, and if that is not enough, new keys share
    one overflow key.
    """

    OVERFLOW_KEY = "<other keys>"

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, *, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval_s = float(interval_s)
        self.max_keys = max(1, int(max_keys))
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [time of last logged line, suppressed since then]; ordered by last logged line.
        self._state: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    def warning(self, key: str, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` at WARNING unless ``key`` logged within the interval; True if logged."""
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: Any) -> bool:
        return self.log(logging.ERROR, key, msg, *args)

    def info(self, key: str, msg: str, *args: Any) -> bool:
        return self.log(logging.INFO, key, msg, *args)

    def log(self, level: int, key: str, msg: str, *args: Any) -> bool:
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        with self._lock:
            key = self._admit(str(key), now)
            state = self._state.get(key)
            if state is not None and now - state[0] < self.interval_s:
                state[1] += 1
                return False
            suppressed = int(state[1]) if state is not None else 0
            self._state[key] = [now, 0]
            self._state.move_to_end(key)
        # Format here, not in logging: msg comes with its args from the caller, and appending our own
        # "%d" to a msg that contains a literal "%" would break logging's formatting.
        try:
            text = msg % args if args else msg
        except (TypeError, ValueError):
            text = f"{msg} {args!r}"
        if suppressed:
            self.logger.log(level, "%s (%d similar suppressed in the last %.0f s)", text, suppressed,
                            self.interval_s)
        else:
            self.logger.log(level, "%s", text)
        return True

    def suppressed(self, key: str) -> int:
        """How many lines for ``key`` are waiting to be reported."""
        with self._lock:
            state = self._state.get(key)
            return int(state[1]) if state is not None else 0

    def _admit(self, key: str, now: float) -> str:
        """The key to use: itself when tracked or when there is room, else the overflow key."""
        if key in self._state or len(self._state) < self.max_keys:
            return key
        # Oldest logged first; drop those whose interval is over and that have nothing to report.
        for old in list(self._state):
            last, suppressed = self._state[old]
            if now - last < self.interval_s:
                break
            if not suppressed:
                del self._state[old]
        if len(self._state) < self.max_keys:
            return key
        return self.OVERFLOW_KEY
