"""The aggregator's dashboard: node states, the hour's summary, event streams, and the page and API
served by a live aggregator (real Mosquitto, real SQLite, simulated nodes)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_runtime.config import AggregatorConfig
from edge_runtime.dashboard import MAX_STREAMS, MAX_TRACKED_NODES, OTHER_NODES, STREAM_QUEUE, DashboardFeed
from edge_runtime.errors import AggregatorError
from edge_runtime.service import Aggregator
from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field
from spar_wire.mqtt_settings import MqttSettings

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "configs/sites/parking_lot.toml"
EPOCH = (time.time_ns() // (2 * 10**9) - 10) * 2 * 10**9  # a recent window grid point (see test_aggregator_service)


@dataclass
class Node:
    id: str
    position: tuple
    node_index: int = 0
    online: bool = True
    from_layout: bool = True


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def feed_with(nodes, refused=None, clock=None, results=None):
    return DashboardFeed({"site": "lot"}, lambda: (nodes, refused or {}),
                         {"n01": (0.0, 0.0), "n02": (10.0, 0.0), "n03": (20.0, 0.0)},
                         lambda: {"rejected": {"bad_crc": 2}, "windows": {"complete": 3}}, 2.0,
                         results or (lambda since, limit: []), clock=clock or Clock())


def test_node_states_follow_the_registry_and_the_traffic():
    clock = Clock()
    nodes = [Node("n01", (0.0, 0.0)), Node("n02", (12.0, 0.0)), Node("n03", (20.0, 0.0), online=False),
             Node("n09", (5.0, 5.0), from_layout=False), Node("n04", (30.0, 0.0))]
    feed = feed_with(nodes, refused={"bad": "position outside the site"}, clock=clock)
    for node in ("n01", "n02", "n03", "n09", "n04"):
        feed.message(f"spar/v1/lot/{node}/data/microphone", 1000)
    clock.now += 3.0
    feed.message("spar/v1/lot/n01/data/microphone", 1000)
    clock.now += 2.0  # n01 heard 2 s ago; the others 5 s ago, more than two 2 s windows
    states = {n["id"]: n["state"] for n in feed.nodes()}
    assert states == {"n01": "online", "n02": "late", "n03": "offline", "n09": "late", "n04": "late",
                      "bad": "refused"}
    feed.message("spar/v1/lot/n02/data/geophone", 500)
    feed.message("spar/v1/lot/n09/data/geophone", 500)
    states = {n["id"]: n for n in feed.nodes()}
    assert states["n02"]["state"] == "moved" and states["n09"]["state"] == "joined"  # 12 m, not 10 m
    assert states["n01"]["messages_per_s"] == pytest.approx(0.2) and states["n01"]["kb_per_s"] == pytest.approx(0.2)
    assert states["bad"]["why"] == "position outside the site" and states["bad"]["position"] is None
    feed.message("spar/v1/lot/aggregator/results", 10)  # our own results are not a node's traffic
    feed.message("garbage", 10)
    assert {n["id"] for n in feed.nodes()} == set(states)


def test_traffic_rows_from_the_wire_are_bounded():
    feed = feed_with([])
    for i in range(MAX_TRACKED_NODES + 50):
        feed.message(f"spar/v1/lot/x{i}/birth", 10)
    assert len(feed._traffic) == MAX_TRACKED_NODES + 1 and OTHER_NODES in feed._traffic


def test_the_summary_covers_the_last_hour():
    clock = Clock()
    feed = feed_with([], clock=clock)
    feed.result({"complete": False, "latency_ms": {"end_to_end": 9000.0}})
    clock.now += 3601.0  # that one is over an hour old now
    for i, complete in enumerate((True, True, False, True)):
        feed.result({"complete": complete, "latency_ms": {"end_to_end": 100.0 * (i + 1)}})
    summary = feed.summary()
    assert summary["windows"] == 4 and summary["complete_share"] == pytest.approx(0.75)
    assert summary["latency_ms"] == {"p50": 300.0, "p95": 400.0, "max": 400.0}
    assert summary["rejected"] == {"bad_crc": 2} and summary["windows_by_outcome"] == {"complete": 3}


def events_of(chunks):
    out = []
    for chunk in chunks:
        text = chunk.decode()
        if text.startswith("event: "):
            name, data = text.split("\n")[:2]
            out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_an_event_stream_sends_state_then_results_and_a_slow_browser_loses_only_old_events():
    feed = feed_with([Node("n01", (0.0, 0.0))])
    stream = feed.stream()
    assert next(stream) == b"retry: 2000\n\n"
    first = events_of([next(stream)])
    assert first[0][0] == "state" and first[0][1]["nodes"][0]["id"] == "n01"
    for i in range(STREAM_QUEUE + 10):  # nobody reads meanwhile
        feed.result({"window_start_ns": i, "complete": True, "latency_ms": {}})
    got = events_of([next(stream) for _ in range(STREAM_QUEUE)])
    assert [data["window_start_ns"] for _, data in got] == list(range(10, STREAM_QUEUE + 10))
    feed.close()
    assert list(stream) == []  # the aggregator stopped: the stream ends


def test_at_most_max_streams_browsers_follow_the_events():
    feed = feed_with([])
    streams = [feed.stream() for _ in range(MAX_STREAMS)]
    for s in streams:
        next(s)
    assert feed.stream() is None
    streams[0].close()  # a browser leaves: its place is free
    assert feed.stream() is not None


def get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.headers.get("Content-Type"), response.read()


def read_events(response, wanted: str, max_lines: int = 400) -> dict:
    """The data of the first ``wanted`` event on an open /events response (bounded read)."""
    name = None
    for _ in range(max_lines):
        line = response.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: ") and name == wanted:
            return json.loads(line.removeprefix("data: "))
    raise AssertionError(f"no {wanted} event in {max_lines} lines")


@pytest.mark.mosquitto
def test_a_live_aggregator_serves_the_page_the_api_and_live_events(mosquitto, parking_lot, model_dir, tmp_path):
    settings = MqttSettings(host=mosquitto.host, port=mosquitto.port)
    config = AggregatorConfig(site=SITE, model=model_dir / "manifest.json", database=tmp_path / "results.sqlite3",
                              metrics_port=0, mqtt=settings)
    with Aggregator(config) as agg:
        base = f"http://127.0.0.1:{agg.metrics.port}"
        status, ctype, page = get(base + "/")
        assert status == 200 and ctype.startswith("text/html") and b"static/dashboard.js" in page
        assert b"EventSource" in get(base + "/static/dashboard.js")[2]
        site = json.loads(get(base + "/api/site")[2])
        assert site["site"] == "parking_lot" and len(site["layout"]) == 8 and site["window_s"] == 2.0
        with urllib.request.urlopen(base + "/events", timeout=10) as events:
            first = read_events(events, "state")
            assert {n["id"] for n in first["nodes"]} == {n.id for n in parking_lot.nodes}
            run_field(FieldConfig(layout=parking_lot, source=SourceSpec("sine", 1), duration_s=6.0,
                                  mqtt=settings, start_epoch_ns=EPOCH))
            live = read_events(events, "result")
        assert live["site"] == "parking_lot" and "outputs" in live
        deadline = time.monotonic() + 15
        while agg.store.count("parking_lot") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        newest = json.loads(get(base + "/api/results?limit=2")[2])
        assert len(newest) == 2 and newest[0]["window_start_ns"] < newest[1]["window_start_ns"]
        after = json.loads(get(f"{base}/api/results?since={newest[0]['window_start_ns']}")[2])
        assert [r["window_start_ns"] for r in after] == [newest[1]["window_start_ns"]]
        nodes = json.loads(get(base + "/api/nodes")[2])
        # the simulated nodes have finished and said offline; their traffic of the last 10 s still shows
        assert len(nodes) == 8 and all(n["state"] == "offline" and n["messages_per_s"] > 0 for n in nodes)
        summary = json.loads(get(base + "/api/summary")[2])
        assert summary["windows"] == 3 and summary["complete_share"] == 1.0
        with pytest.raises(urllib.error.HTTPError) as bad:
            get(base + "/api/results?since=yesterday")
        assert bad.value.code == 400
        assert b"spar_results_total" in get(base + "/metrics")[2]


def test_the_dashboard_can_be_switched_off(tmp_path):
    with pytest.raises(AggregatorError, match="dashboard"):
        AggregatorConfig(site=SITE, model=SITE, database=tmp_path / "r.sqlite3", dashboard="yes")


def test_a_password_guards_the_dashboard_but_not_the_scraper(tmp_path):
    import base64

    from edge_runtime.dashboard import basic_auth
    from edge_runtime.metrics import MetricsServer, Registry

    secret = tmp_path / "monitor.password"
    secret.write_text("s3cret\n")
    registry = Registry()
    registry.counter("spar_results_total", "Results")
    feed = feed_with([Node("n01", (0.0, 0.0))])
    with MetricsServer(registry, routes=feed.routes(), route_auth=basic_auth(secret)) as server:
        def fetch(path, password=None):
            request = urllib.request.Request(server.url + path)
            if password is not None:
                request.add_header("Authorization", "Basic " + base64.b64encode(f"me:{password}".encode()).decode())
            return urllib.request.urlopen(request, timeout=5)

        for password in (None, "wrong"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                fetch("/api/nodes", password)
            assert refused.value.code == 401 and "Basic" in refused.value.headers["WWW-Authenticate"]
        assert json.loads(fetch("/api/nodes", "s3cret").read())[0]["id"] == "n01"
        assert b"spar_results_total" in fetch("/metrics").read()  # Prometheus scrapes without it
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(AggregatorError, match="empty"):
        basic_auth(empty)
    with pytest.raises(AggregatorError, match="dashboard_password_file"):
        basic_auth(tmp_path / "missing")


def test_the_hour_is_also_given_per_minute():
    clock = Clock()
    feed = feed_with([], clock=clock)
    for ago_s, complete, latency in ((3000.0, True, 100.0), (2990.0, False, 300.0), (30.0, True, 50.0)):
        clock.now = 10_000.0 - ago_s
        feed.result({"complete": complete, "latency_ms": {"end_to_end": latency}})
    clock.now = 10_000.0
    minutes = feed.summary()["minutes"]
    assert minutes == [{"minutes_ago": 50, "windows": 1, "complete_share": 1.0, "latency_p50_ms": 100.0},
                       {"minutes_ago": 49, "windows": 1, "complete_share": 0.0, "latency_p50_ms": 300.0},
                       {"minutes_ago": 0, "windows": 1, "complete_share": 1.0, "latency_p50_ms": 50.0}]
