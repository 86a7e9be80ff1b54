"""What a field box really sees, against the real aggregator: real Mosquitto, SQLite, ONNX Runtime.

Wrong node clocks, a disk that fails and recovers, a broker that loses our session or refuses our
subscriptions, a backlog bigger than the window queue, and a dead thread: the site keeps producing
results where it can, loses nothing it acknowledged, and /healthz says what is wrong.
"""

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge_runtime import inference_worker
from edge_runtime.config import AggregatorConfig
from edge_runtime.errors import AggregatorError
from edge_runtime.inference import load_backend
from edge_runtime.result_store import ResultStore
from edge_runtime.service import Aggregator
from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field
from spar_wire.mqtt_settings import MqttSettings
from testbed.local_broker import BrokerSettings, LocalBroker

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "configs/sites/parking_lot.toml"
WINDOW_NS = 2 * 10**9
pytestmark = pytest.mark.mosquitto


def recent_epoch(windows_ago: int = 10) -> int:
    """A grid point ``windows_ago`` windows before now: windows that ended recently by this box's clock."""
    return (time.time_ns() // WINDOW_NS - windows_ago) * WINDOW_NS


def config_for(broker, model_dir, tmp_path, **kw):
    settings = MqttSettings(host=broker.host, port=broker.port, reconnect_min_s=1, reconnect_max_s=2)
    defaults = dict(site=SITE, model=model_dir / "manifest.json", database=tmp_path / "results.sqlite3",
                    metrics_port=0, deadline_fraction=0.5, mqtt=settings)
    defaults.update(kw)
    return AggregatorConfig(**defaults)


def send(layout, broker, epoch, windows, nodes=None):
    """Nodes send ``windows`` windows starting at ``epoch`` (as fast as the broker takes them)."""
    run_field(FieldConfig(layout=layout, source=SourceSpec("sine", 1), duration_s=2.0 * windows,
                          node_ids=nodes, mqtt=MqttSettings(host=broker.host, port=broker.port),
                          start_epoch_ns=epoch))


def wait_for(predicate, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def results(agg):
    return agg.worker.snapshot_counts().get("results", 0)


def get(agg, path):
    """(HTTP status, body) of the aggregator's metrics endpoint."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{agg.metrics.port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_one_node_an_hour_ahead_does_not_stop_the_site(mosquitto, parking_lot, model_dir, tmp_path):
    """n01 booted without NTP: its windows are stamped an hour ahead (valid CRC). First as the very
    first message (only the box clock to compare with), then among the others (outvoted). It used to
    move the window grid an hour ahead: every later message of every node was "late", no result was
    stored for the rest of the run, and /healthz said "ok"."""
    epoch = recent_epoch()
    with Aggregator(config_for(mosquitto, model_dir, tmp_path)) as agg:
        send(parking_lot, mosquitto, epoch + 3600 * 10**9, 1, nodes=("n01",))
        assert wait_for(lambda: agg.processor.snapshot_counts().get("rejected.clock_ahead", 0) == 2)
        send(parking_lot, mosquitto, epoch, 3)
        assert wait_for(lambda: results(agg) == 3)
        send(parking_lot, mosquitto, epoch + 3600 * 10**9, 1, nodes=("n01",))
        assert wait_for(lambda: agg.processor.snapshot_counts().get("rejected.clock_skew", 0) == 2)
        status, body = get(agg, "/healthz")
        health = json.loads(body)
        assert status == 200 and health["status"] == "degraded"
        assert list(health["clock_off_nodes"]) == ["n01"] and health["clock_off_nodes"]["n01"]["offset_s"] > 3000
        metrics = get(agg, "/metrics")[1]
        assert 'spar_messages_rejected_total{reason="clock_skew"} 2' in metrics
        assert 'spar_node_clock_off{node="n01"} 1' in metrics
        send(parking_lot, mosquitto, epoch + 3 * WINDOW_NS, 2)  # n01's clock is right again
        assert wait_for(lambda: results(agg) == 5)
        assert agg.assembler.counts.get("late", 0) == 0
    stored = ResultStore(tmp_path / "results.sqlite3", readonly=True).query(newest_first=False)
    assert [r["grid_start_ns"] for r in stored] == [epoch + k * WINDOW_NS for k in range(5)]
    assert all(r["complete"] for r in stored)


def test_a_failing_disk_loses_nothing_across_a_reconnect(mosquitto, parking_lot, model_dir, tmp_path, monkeypatch,
                                                         fail_writes):
    """Stores fail while windows arrive, and the broker restarts meanwhile (its redelivered copies used
    to be acknowledged without ever being stored). The stores are retried; once the disk heals every
    window is stored, once, and the subscription flows on: nothing is lost."""
    monkeypatch.setattr(inference_worker, "RETRY_FIRST_S", 0.05)
    monkeypatch.setattr(inference_worker, "RETRY_MAX_S", 0.2)
    epoch = recent_epoch()
    database = tmp_path / "results.sqlite3"
    with Aggregator(config_for(mosquitto, model_dir, tmp_path, stall_windows=1)) as agg:
        heal = fail_writes(database)
        send(parking_lot, mosquitto, epoch, 3)
        assert wait_for(lambda: agg.worker.snapshot_counts().get("store_failures", 0) >= 3)
        assert wait_for(lambda: {"storage_failing", "stalled"} <= set(agg.problems()), 10)
        status, body = get(agg, "/healthz")
        assert status == 503 and json.loads(body)["status"] == "failing"
        assert "spar_store_failures_total" in get(agg, "/metrics")[1]
        mosquitto.restart()
        assert wait_for(lambda: agg.ingest.connects >= 2, 20)
        heal()
        assert wait_for(lambda: results(agg) == 3, 20)
        send(parking_lot, mosquitto, epoch + 3 * WINDOW_NS, 2)  # the subscription still flows
        assert wait_for(lambda: results(agg) == 5)
        assert "storage_failing" not in agg.problems()
    stored = ResultStore(database, readonly=True).query(newest_first=False)
    assert [r["grid_start_ns"] for r in stored] == [epoch + k * WINDOW_NS for k in range(5)]
    assert all(r["complete"] for r in stored)


def test_store_commits_are_durable_by_default(tmp_path):
    """synchronous=FULL: a window acknowledged to the broker is on disk, power cut or not; NORMAL on request."""
    assert AggregatorConfig(site=SITE, model=Path("m.json")).synchronous == "FULL"
    with ResultStore(tmp_path / "a.sqlite3") as store:
        assert store._read("PRAGMA synchronous", [])[0][0] == 2  # FULL
    with ResultStore(tmp_path / "b.sqlite3", synchronous="NORMAL") as store:
        assert store._read("PRAGMA synchronous", [])[0][0] == 1
    with pytest.raises(AggregatorError, match="synchronous"):
        AggregatorConfig(site=SITE, model=Path("m.json"), synchronous="OFF")


class SlowBackend:
    """The real ONNX Runtime backend on a slow box: 60 ms a call."""

    def __init__(self, manifest):
        self.inner = load_backend(manifest, "onnxruntime")
        self.name = "slow onnxruntime"

    def warmup(self, **kw):
        self.inner.warmup(**kw)

    def run(self, inputs):
        time.sleep(0.06)
        return self.inner.run(inputs)


@pytest.mark.slow
def test_backlog_is_never_shed_from_the_window_queue(mosquitto, parking_lot, model_dir, tmp_path):
    """A queue of two windows and a slow backend: the 20 windows the broker kept while the aggregator
    was away queue up faster than inference takes them. They used to be shed (and acknowledged) as
    overload; backlog is never shed, only live windows are."""
    config = config_for(mosquitto, model_dir, tmp_path, queue_size=2, max_held_messages=16, max_batch=1)
    with Aggregator(config):
        pass  # creates the persistent session, then goes away
    send(parking_lot, mosquitto, recent_epoch(200), 20)
    agg = Aggregator(config)
    agg.backend = agg.worker.backend = SlowBackend(agg.manifest)
    with agg:
        assert wait_for(lambda: results(agg) == 20, 60)
        dropped = agg.metrics.registry.value("spar_overload_dropped_total", item="window")
        shed = agg.processor.snapshot_counts().get("shed", 0)
    stored = ResultStore(tmp_path / "results.sqlite3", readonly=True).query()
    assert shed == 0 and dropped == 0 and len(stored) == 20 and all(r["complete"] for r in stored)


def test_a_lost_broker_session_is_reported(parking_lot, model_dir, tmp_path):
    """A broker restarted without persistence forgets our session and what it queued for us: the
    aggregator reconnects (it used to look healthy) and /healthz says the session was lost."""
    with LocalBroker(BrokerSettings(persistence=False), workdir=tmp_path / "broker") as broker:
        with Aggregator(config_for(broker, model_dir, tmp_path)) as agg:
            assert "session_lost" not in agg.problems()
            broker.restart()
            assert wait_for(lambda: agg.ingest.connects >= 2, 20)
            assert wait_for(lambda: "session_lost" in agg.problems())
            assert "spar_broker_sessions_lost_total 1" in get(agg, "/metrics")[1]
            assert json.loads(get(agg, "/healthz")[1])["status"] == "failing"


def test_a_refused_subscription_stops_the_start_with_the_reason(parking_lot, model_dir, tmp_path):
    """A broker whose ACL refuses the subscriptions (dynamic security: SUBACK "Not authorized") used
    to leave an aggregator that looked healthy and received nothing."""
    plugin = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
    if not plugin.exists():
        pytest.skip("Mosquitto's dynamic security plugin is not installed")
    dynsec = tmp_path / "dynsec.json"
    dynsec.write_text(json.dumps({"clients": [], "groups": [], "roles": [], "defaultACLAccess": {
        "publishClientSend": True, "publishClientReceive": True, "subscribe": False, "unsubscribe": True}}))
    settings = BrokerSettings(extra_lines=(f"plugin {plugin}", f"plugin_opt_config_file {dynsec}"))
    with LocalBroker(settings, workdir=tmp_path / "broker") as broker:
        with pytest.raises(AggregatorError, match="refused the subscriptions.*Not authorized"):
            Aggregator(config_for(broker, model_dir, tmp_path)).start()


def test_a_dead_thread_is_reported(mosquitto, parking_lot, model_dir, tmp_path):
    """A thread that dies (here the deadline thread, of something its loop does not catch) used to
    leave "ok" on /healthz while no window ever closed by its deadline again."""
    with Aggregator(config_for(mosquitto, model_dir, tmp_path)) as agg:
        assert agg.problems() == {}

        def die(now_s):
            raise SystemExit("simulated")
        agg.processor.tick = die
        assert wait_for(lambda: "thread_dead" in agg.problems())
        assert "deadlines" in agg.problems()["thread_dead"]
        assert get(agg, "/healthz")[0] == 503
