"""Metrics: exposition format, name rules, the HTTP endpoint, thread safety, log rate limiting."""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import threading
import urllib.error
import urllib.request

import pytest

from edge_runtime.errors import AggregatorError
from edge_runtime.metrics import (
    CONTENT_TYPE,
    Counter,
    Gauge,
    Histogram,
    MetricsServer,
    RateLimitedLogger,
    Registry,
)

# --- a tiny parser of the text exposition format 0.0.4 -----------------------------------------------

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], text)


def parse(text: str) -> tuple[dict[str, str], dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """(help by metric, type by metric, samples); fails on any line that is not valid 0.0.4."""
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, doc = line[len("# HELP "):].partition(" ")
            helps[name] = _unescape(doc)
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE "):].split(" ")
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"}
            types[name] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            labels: dict[str, str] = {}
            raw = match.group("labels") or ""
            pos = 0
            while pos < len(raw):
                lab = _LABEL.match(raw, pos)
                assert lab, f"bad labels in {line!r}"
                labels[lab.group(1)] = _unescape(lab.group(2))
                pos = lab.end()
            samples.append((match.group("name"), labels, float(match.group("value"))))
    return helps, types, samples


def sample(samples, name: str, **labels: str) -> float:
    found = [v for n, lab, v in samples if n == name and lab == labels]
    assert len(found) == 1, (name, labels, found)
    return found[0]


# --- registry and format --------------------------------------------------------------------------------


def test_render_help_type_and_values():
    reg = Registry()
    msgs = reg.counter("spar_messages_total", "Messages received.\nPer node.", ["node"])
    reg.counter("spar_restarts_total", 'Restarts (with "quotes" and a \\ backslash).')
    depth = reg.gauge("spar_queue_depth", "Items waiting.")
    msgs.inc(node="n1")
    msgs.inc(2, node="n1")
    msgs.inc(amount=0.5, node="n2")
    depth.set(7)
    depth.inc(3)
    depth.dec()
    helps, types, samples = parse(reg.render())
    assert types == {"spar_messages_total": "counter", "spar_restarts_total": "counter",
                     "spar_queue_depth": "gauge"}
    assert helps["spar_messages_total"] == "Messages received.\nPer node."
    assert helps["spar_restarts_total"] == 'Restarts (with "quotes" and a \\ backslash).'
    assert "\n# HELP spar_messages_total Messages received.\\nPer node.\n" in "\n" + reg.render()
    assert sample(samples, "spar_messages_total", node="n1") == 3.0
    assert sample(samples, "spar_messages_total", node="n2") == 0.5
    assert sample(samples, "spar_restarts_total") == 0.0  # unlabelled metrics exist from the start
    assert sample(samples, "spar_queue_depth") == 9.0
    assert reg.value("spar_messages_total", node="n1") == 3.0
    assert reg.value("spar_messages_total", node="never") == 0.0
    # HELP and TYPE come before the samples of their metric.
    lines = reg.render().splitlines()
    assert lines.index("# TYPE spar_queue_depth gauge") < lines.index("spar_queue_depth 9.0")


def test_label_values_are_escaped():
    reg = Registry()
    counter = reg.counter("drops_total", "Dropped.", ["reason", "node"])
    nasty = 'say "hi"\\path\nnext line'
    counter.inc(reason=nasty, node="n1")
    text = reg.render()
    assert r'reason="say \"hi\"\\path\nnext line"' in text
    assert len(text.splitlines()) == 3  # the newline in the value did not split the sample line
    _, _, samples = parse(text)
    assert sample(samples, "drops_total", reason=nasty, node="n1") == 1.0


def test_histogram_buckets_are_cumulative_and_inf_equals_count():
    reg = Registry()
    hist = reg.histogram("latency_seconds", "Window latency.", [0.01, 0.1, 1.0], ["site"])
    values = [0.005, 0.01, 0.05, 0.1, 0.5, 2.0, 30.0, float("nan")]
    for v in values:
        hist.observe(v, site="lot")
    _, types, samples = parse(reg.render())
    assert types == {"latency_seconds": "histogram"}
    buckets = [(lab["le"], v) for n, lab, v in samples if n == "latency_seconds_bucket"]
    assert [le for le, _ in buckets] == ["0.01", "0.1", "1.0", "+Inf"]
    counts = [v for _, v in buckets]
    assert counts == [2.0, 4.0, 5.0, 7.0]  # le is "less or equal"; NaN ignored
    assert counts == sorted(counts)
    assert sample(samples, "latency_seconds_count", site="lot") == counts[-1] == 7.0
    assert math.isclose(sample(samples, "latency_seconds_sum", site="lot"), sum(values[:-1]))
    assert reg.value("latency_seconds_bucket", site="lot", le=0.1) == 4.0
    assert reg.value("latency_seconds_bucket", site="lot", le="+Inf") == 7.0
    assert reg.value("latency_seconds_count", site="lot") == 7.0


def test_unlabelled_histogram_and_explicit_inf_bucket():
    reg = Registry()
    hist = Histogram("h", "h.", [1, 2, float("inf")], registry=reg)
    assert hist.buckets == (1.0, 2.0, math.inf)
    _, _, samples = parse(reg.render())
    assert sample(samples, "h_bucket", le="+Inf") == 0.0 and sample(samples, "h_count") == 0.0


@pytest.mark.parametrize("name", ["", "1abc", "has-dash", "has space", "é", "a{b}", None])
def test_invalid_metric_names_refused(name):
    with pytest.raises(AggregatorError, match="invalid metric name"):
        Counter(name, "x")  # type: ignore[arg-type]


@pytest.mark.parametrize("labels", [["1x"], ["a-b"], ["__reserved"], ["a", "a"], ["amount"], "site"])
def test_invalid_label_names_refused(labels):
    with pytest.raises(AggregatorError, match="label"):
        Gauge("ok_name:sub", "x", labels)


def test_metric_misuse_refused():
    reg = Registry()
    counter = reg.counter("c_total", "c", ["node"])
    with pytest.raises(AggregatorError, match="only goes up"):
        counter.inc(-1, node="a")
    with pytest.raises(AggregatorError, match="expected labels"):
        counter.inc(site="a")
    with pytest.raises(AggregatorError, match="expected labels"):
        counter.inc()
    with pytest.raises(AggregatorError, match="label name 'le'"):
        Histogram("h2", "h", [1.0], ["le"])
    with pytest.raises(AggregatorError, match="strictly increasing"):
        Histogram("h3", "h", [1.0, 1.0])
    with pytest.raises(AggregatorError, match="already registered"):
        reg.counter("c_total", "again")
    reg.histogram("lat", "lat", [1.0])
    with pytest.raises(AggregatorError, match="already registered"):
        reg.gauge("lat_count", "clashes with the histogram's _count")
    with pytest.raises(AggregatorError, match="no metric"):
        reg.value("missing")


def test_concurrent_increments_add_up_exactly():
    reg = Registry()
    counter = reg.counter("events_total", "e", ["kind"])
    gauge = reg.gauge("level", "l")
    hist = reg.histogram("obs", "o", [0.5])
    n_threads, n_each = 8, 5000
    start = threading.Barrier(n_threads)

    def work(i: int) -> None:
        start.wait()
        for _ in range(n_each):
            counter.inc(kind="even" if i % 2 == 0 else "odd")
            gauge.inc()
            hist.observe(0.25)
            gauge.dec(0.5)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for thread in threads:
        thread.start()
    renders = [reg.render() for _ in range(5)]  # rendering concurrently must not fail either
    for thread in threads:
        thread.join()
    assert all(parse(r) for r in renders)
    assert reg.value("events_total", kind="even") == reg.value("events_total", kind="odd") == 4 * n_each
    assert reg.value("level") == n_threads * n_each * 0.5
    assert reg.value("obs_count") == reg.value("obs_bucket", le=0.5) == n_threads * n_each


# --- HTTP endpoint ----------------------------------------------------------------------------------------


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_server_metrics_healthz_and_404():
    reg = Registry()
    reg.counter("hits_total", "Hits.").inc(3)
    with MetricsServer(reg, health=lambda: {"status": "ok", "nodes": 4}) as server:
        assert server.port > 0
        base = f"http://127.0.0.1:{server.port}"
        status, ctype, body = _get(base + "/metrics")
        assert status == 200 and ctype == CONTENT_TYPE and "version=0.0.4" in ctype
        assert sample(parse(body)[2], "hits_total") == 3.0
        status, _, _ = _get(base + "/metrics?name=x")
        assert status == 200
        status, ctype, body = _get(base + "/healthz")
        assert status == 200 and ctype == "application/json"
        assert json.loads(body) == {"status": "ok", "nodes": 4}
        for path in ("/", "/nope", "/metrics/extra"):
            assert _get(base + path)[0] == 404
        req = urllib.request.Request(base + "/metrics", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 501
    with pytest.raises(AggregatorError, match="not started"):
        _ = server.port


def test_server_default_health_and_failing_health():
    with MetricsServer(Registry()) as server:
        assert json.loads(_get(f"{server.url}/healthz")[2]) == {"status": "ok"}

    def broken() -> dict:
        raise RuntimeError("backend gone")

    with MetricsServer(Registry(), health=broken) as server:
        status, _, body = _get(f"{server.url}/healthz")
        assert status == 500 and json.loads(body) == {"status": "error", "error": "backend gone"}
        assert _get(f"{server.url}/metrics")[0] == 200  # still serving


def test_server_survives_garbage_requests(capsys):
    reg = Registry()
    with MetricsServer(reg) as server:
        for garbage in (b"\x00\xff\xfe garbage\r\n\r\n", b"GET\r\n\r\n", b"GET /metrics HTTP/9.9\r\n\r\n",
                        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b""):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(garbage)
                sock.shutdown(socket.SHUT_WR)
                try:
                    while sock.recv(65536):
                        pass
                except OSError:
                    pass  # the server may reset a connection it refused
        assert _get(f"{server.url}/metrics")[0] == 200
    server.stop()  # idempotent
    assert capsys.readouterr().err == ""  # request logging off, no tracebacks


def test_server_bind_failure_is_an_aggregator_error():
    with MetricsServer(Registry()) as first:
        taken = MetricsServer(Registry(), port=first.port)
        with pytest.raises(AggregatorError, match="cannot listen"):
            taken.start()


# --- rate-limited logger ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_logger_once_per_interval_with_suppressed_count(caplog):
    logger = logging.getLogger("test.ratelimit")
    clock = FakeClock()
    limited = RateLimitedLogger(logger, interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        assert limited.warning("bad-crc:n1", "bad CRC from %s", "n1")
        for _ in range(5):
            clock.now += 1
            assert not limited.warning("bad-crc:n1", "bad CRC from %s", "n1")
        assert limited.warning("bad-crc:n2", "bad CRC from %s", "n2")  # keys are independent
        assert limited.suppressed("bad-crc:n1") == 5
        clock.now = 110.0  # exactly one interval after the first line
        assert limited.warning("bad-crc:n1", "bad CRC from %s", "n1")
        clock.now += 10.0
        assert limited.warning("bad-crc:n1", "100% broken")  # nothing suppressed; literal % is fine
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["bad CRC from n1", "bad CRC from n2",
                        "bad CRC from n1 (5 similar suppressed in the last 10 s)", "100% broken"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_rate_limited_logger_bounds_its_keys(caplog):
    logger = logging.getLogger("test.ratelimit.keys")
    clock = FakeClock()
    limited = RateLimitedLogger(logger, interval_s=10.0, max_keys=3, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.ratelimit.keys"):
        for i in range(100):
            limited.warning(f"node-{i}", "flood %d", i)
        # Three own keys, then everything else shares one overflow key: four lines, not a hundred.
        assert len(caplog.records) == 4
        assert limited.suppressed(RateLimitedLogger.OVERFLOW_KEY) == 96
        clock.now += 11  # idle keys are forgotten, new ones get their own line again
        assert limited.warning("node-new", "again")
    assert len(limited._state) <= 4


def test_rate_limited_logger_bad_format_does_not_raise(caplog):
    limited = RateLimitedLogger(logging.getLogger("test.ratelimit.fmt"), clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger="test.ratelimit.fmt"):
        assert limited.warning("k", "%d items", "not a number")
    assert caplog.records[0].getMessage().startswith("%d items")


def test_samples_list_every_series_of_a_metric():
    """The benchmarks read a counter's series straight from the aggregator (samples())."""
    reg = Registry()
    dropped = reg.counter("spar_overload_dropped_total", "d", ["item"])
    dropped.inc(2, item="window")
    dropped.inc(item="message")
    assert sorted(dropped.samples()) == [("spar_overload_dropped_total", (("item", "message"),), 1.0),
                                         ("spar_overload_dropped_total", (("item", "window"),), 2.0)]
    hist = reg.histogram("lat_seconds", "l", [1.0])
    hist.observe(0.5)
    assert ("lat_seconds_bucket", (("le", "1.0"),), 1.0) in list(hist.samples())
