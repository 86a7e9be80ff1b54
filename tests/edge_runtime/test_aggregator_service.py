"""The aggregator end to end: simulated nodes -> real Mosquitto -> aggregator -> SQLite + MQTT."""

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge_runtime.config import AggregatorConfig
from edge_runtime.errors import AggregatorError
from edge_runtime.inference import load_backend
from edge_runtime.result_store import ResultStore
from edge_runtime.service import Aggregator
from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field
from node_firmware_sim.firmware import FirmwareConfig, NodeFirmware
from node_firmware_sim.link_model import LinkConfig, Outage
from node_firmware_sim.mqtt_publisher import NodePublisher
from node_firmware_sim.scenarios import make_scenario
from spar_wire.codecs import CodecSpec
from spar_wire.features import patchify
from spar_wire.message import decode_message
from spar_wire.model_manifest import tokens_input
from spar_wire.mqtt_settings import MqttSettings

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "configs/sites/parking_lot.toml"
# Window k starts at EPOCH + 2 s * k: a grid point 20 s ago, so the first windows are recent by this
# box's clock (the aggregator refuses window starts far from it before it has other nodes to compare).
EPOCH = (time.time_ns() // (2 * 10**9) - 10) * 2 * 10**9
pytestmark = pytest.mark.mosquitto


def config_for(broker, model_dir, tmp_path, **kw):
    settings = MqttSettings(host=broker.host, port=broker.port)
    defaults = dict(site=SITE, model=model_dir / "manifest.json", database=tmp_path / "results.sqlite3",
                    metrics_port=0, deadline_fraction=0.5, mqtt=settings)
    defaults.update(kw)
    return AggregatorConfig(**defaults)


class ResultListener:
    def __init__(self, port, site="parking_lot"):
        self.results = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"spar/v1/{site}/aggregator/results", qos=1)
        self.client.on_message = lambda c, u, m: self.results.append(json.loads(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        time.sleep(0.3)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def run_nodes(layout, broker, windows, link=LinkConfig(), seed=1, codec="png"):
    config = FieldConfig(layout=layout, source=SourceSpec("sine", seed), duration_s=2.0 * windows, link=link,
                         firmware=FirmwareConfig(codec=CodecSpec.parse(codec)),
                         mqtt=MqttSettings(host=broker.host, port=broker.port), start_epoch_ns=EPOCH)
    return run_field(config)


def wait_for(predicate, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def direct_inputs(layout, window_index, seed=1, codec="png", absent=()):
    """The placement tensor of one window, built here without the aggregator."""
    window = make_scenario("sine", layout, seed).window(window_index)
    inputs = {"positions": layout.positions().astype(np.float32)[None],
              "node_index": np.arange(len(layout.nodes), dtype=np.int64)[None]}
    for modality, spec in layout.modalities.items():
        tokens = np.zeros((1, 8, spec.features.n_tokens, spec.features.token_dim), np.float32)
        present = np.zeros((1, 8), bool)
        for slot, node in enumerate(layout.node_ids):
            if node in absent:
                continue
            frame = NodeFirmware(layout, node, FirmwareConfig(codec=CodecSpec.parse(codec))).encode(
                modality, window.signals[(node, modality)], 0)
            tokens[0, slot] = patchify(decode_message(frame.frame).image(), spec.features)
            present[0, slot] = True
        inputs[tokens_input(modality)] = tokens
        inputs[f"present_{modality}"] = present
    return inputs


def test_complete_windows_match_direct_inference(mosquitto, parking_lot, model_dir, tmp_path):
    listener = ResultListener(mosquitto.port)
    with Aggregator(config_for(mosquitto, model_dir, tmp_path)) as agg:
        run_nodes(parking_lot, mosquitto, windows=3)
        assert wait_for(lambda: len(listener.results) == 3)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{agg.metrics.port}/metrics", timeout=5).read().decode()
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{agg.metrics.port}/healthz", timeout=5).read())
    listener.close()
    stored = ResultStore(tmp_path / "results.sqlite3", readonly=True).query(newest_first=False)
    assert [r["window_start_ns"] for r in stored] == [EPOCH + k * 2 * 10**9 for k in range(3)]
    assert all(r["complete"] and r["nodes_present"] == 8 and r["closed_by"] == "complete" for r in stored)
    assert sorted(r["window_index"] for r in listener.results) == [r["window_index"] for r in stored]
    backend = load_backend(agg.manifest, "onnxruntime")
    for k, result in enumerate(stored):
        expected = backend.run(direct_inputs(parking_lot, k))
        np.testing.assert_allclose(result["outputs"]["logits"], expected["logits"][0], rtol=1e-5, atol=1e-6)
        assert result["class"] in agg.manifest.class_names
    assert 'spar_results_total 3' in metrics
    assert 'spar_windows_total{outcome="complete"} 3' in metrics
    assert 'spar_messages_total{outcome="accepted"} 48' in metrics
    assert "spar_window_wait_seconds_count 3" in metrics and "spar_store_seconds_count" in metrics
    assert health["site"] == "parking_lot"


def test_missing_node_gives_a_partial_result_at_the_deadline(mosquitto, parking_lot, model_dir, tmp_path):
    link = LinkConfig(outages=(Outage("n03", 0.0, 1000.0),))  # n03 never gets through (buffer 0 below)
    # A 3 s deadline: on a loaded machine the other nodes' 14 messages of a window can take over a second.
    with Aggregator(config_for(mosquitto, model_dir, tmp_path, deadline_fraction=1.5)) as agg:
        config = FieldConfig(layout=parking_lot, source=SourceSpec("sine", 1), duration_s=4.0, link=link,
                             firmware=FirmwareConfig(codec=CodecSpec("png"), outage_buffer_messages=0),
                             mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port), start_epoch_ns=EPOCH)
        run_field(config)
        assert wait_for(lambda: agg.worker.snapshot_counts().get("results", 0) == 2)
    stored = ResultStore(tmp_path / "results.sqlite3", readonly=True).query(newest_first=False)
    seen = [(r["window_index"], r["complete"], r["closed_by"], r["nodes_present"]) for r in stored]
    assert all(not r["complete"] and r["closed_by"] == "deadline" and r["nodes_present"] == 7 for r in stored), seen
    assert all("n03" not in r["present"]["microphone"] for r in stored)
    backend = load_backend(agg.manifest, "onnxruntime")
    expected = backend.run(direct_inputs(parking_lot, 0, absent=("n03",)))
    np.testing.assert_allclose(stored[0]["outputs"]["logits"], expected["logits"][0], rtol=1e-5, atol=1e-6)


def test_duplicates_and_reordering_give_one_result_per_window(mosquitto, parking_lot, model_dir, tmp_path):
    link = LinkConfig(duplicate=0.5, reorder=0.3, reorder_ms=300, jitter_ms=50, delay_ms=50)
    with Aggregator(config_for(mosquitto, model_dir, tmp_path)) as agg:
        summary = run_nodes(parking_lot, mosquitto, windows=3, link=link)
        assert wait_for(lambda: agg.worker.snapshot_counts().get("results", 0) >= 3)
        time.sleep(0.5)
        duplicates = agg.assembler.counts["duplicate"] + agg.assembler.counts["late"]
    assert summary.total().link.duplicated == duplicates > 0
    stored = ResultStore(tmp_path / "results.sqlite3", readonly=True).query(newest_first=False)
    assert [r["window_index"] for r in stored] == [EPOCH // (2 * 10**9) + k for k in range(3)]
    assert all(r["complete"] for r in stored)


def test_wrong_feature_hash_is_refused(mosquitto, parking_lot, model_dir, tmp_path):
    bad_site = tmp_path / "site.toml"
    bad_site.write_text(SITE.read_text().replace('preset = "parking_lot_geophone"',
                                                 'preset = "parking_lot_geophone"\nhop = 20'))
    from spar_wire.site_layout import load_site_layout

    bad_layout = load_site_layout(bad_site)
    with Aggregator(config_for(mosquitto, model_dir, tmp_path)) as agg:
        with NodePublisher(bad_layout, "n02", MqttSettings(host=mosquitto.host, port=mosquitto.port)):
            assert wait_for(lambda: "n02" in agg.registry.refused())
        counts = agg.processor.snapshot_counts()
    assert counts["refused.feature_hash_mismatch"] == 1
    assert "feature hash" in agg.registry.refused()["n02"]


def test_a_model_that_does_not_fit_the_site_is_refused(mosquitto, model_dir, tmp_path):
    with pytest.raises(AggregatorError, match="does not fit site"):
        Aggregator(config_for(mosquitto, model_dir, tmp_path, site=REPO / "configs/sites/body_har.toml"))


def start_aggregator_process(config: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--config", str(config)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    line = ""
    while "aggregator running" not in line and time.monotonic() < deadline and process.poll() is None:
        line = process.stderr.readline()
    return process


def stop_aggregator_process(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_a_restart_mid_window_loses_nothing_and_makes_no_partial_result(mosquitto, parking_lot, model_dir,
                                                                       tmp_path):
    """SIGTERM stores what is complete; a half-assembled window's messages stay with the broker and, after
    the restart, complete their window with the messages sent meanwhile: one complete result."""
    config = tmp_path / "aggregator.toml"
    config.write_text(f'[aggregator]\nsite = "{SITE}"\nmodel = "{model_dir / "manifest.json"}"\n'
                      f'database = "{tmp_path / "r.sqlite3"}"\nmetrics_port = 0\ndeadline_fraction = 5.0\n'
                      f'[mqtt]\nport = {mosquitto.port}\n')
    settings = MqttSettings(port=mosquitto.port)
    process = start_aggregator_process(config)
    try:
        # Window 0 complete; window 1 only half there (n05-n08 stay online but silent): its
        # 10 s deadline is far away when SIGTERM arrives.
        run_nodes(parking_lot, mosquitto, windows=1)
        silent = [NodePublisher(parking_lot, n, settings).start() for n in ("n05", "n06", "n07", "n08")]
        half = FieldConfig(layout=parking_lot, source=SourceSpec("sine", 1), duration_s=2.0,
                           node_ids=("n01", "n02", "n03", "n04"), mqtt=settings, start_epoch_ns=EPOCH + 2 * 10**9)
        run_field(half)
        time.sleep(1.0)
        assert stop_aggregator_process(process) == 0
        for node in silent:
            node.stop()
        first_run = ResultStore(tmp_path / "r.sqlite3", readonly=True).query(newest_first=False)
        # While the aggregator is down, the other half of window 1 arrives (the broker queues it).
        other_half = FieldConfig(layout=parking_lot, source=SourceSpec("sine", 1), duration_s=4.0,
                                 node_ids=("n05", "n06", "n07", "n08"), mqtt=settings, start_epoch_ns=EPOCH)
        run_field(other_half)  # its window 0 is a late copy, window 1 the missing half
        process = start_aggregator_process(config)
        deadline = time.monotonic() + 20
        while len(ResultStore(tmp_path / "r.sqlite3", readonly=True).query()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stop_aggregator_process(process) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert [(r["window_index"] - EPOCH // (2 * 10**9), r["complete"]) for r in first_run] == [(0, True)]
    stored = ResultStore(tmp_path / "r.sqlite3", readonly=True).query(newest_first=False)
    assert [(r["window_index"] - EPOCH // (2 * 10**9), r["complete"], r["nodes_present"]) for r in stored] == [
        (0, True, 8), (1, True, 8)]


def test_resumes_after_a_broker_restart(mosquitto, parking_lot, model_dir, tmp_path):
    settings = MqttSettings(host=mosquitto.host, port=mosquitto.port, reconnect_min_s=1, reconnect_max_s=2)
    with Aggregator(config_for(mosquitto, model_dir, tmp_path, mqtt=settings)) as agg:
        run_nodes(parking_lot, mosquitto, windows=1)
        assert wait_for(lambda: agg.worker.snapshot_counts().get("results", 0) == 1)
        mosquitto.restart()
        assert wait_for(lambda: agg.ingest.connects >= 2, 20), "the subscriber did not reconnect"
        # Nodes come back too; the next window still becomes a result.
        config = FieldConfig(layout=parking_lot, source=SourceSpec("sine", 1), duration_s=2.0,
                             mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port),
                             start_epoch_ns=EPOCH + 2 * 10**9)
        run_field(config)
        assert wait_for(lambda: agg.worker.snapshot_counts().get("results", 0) == 2)
    stored = ResultStore(tmp_path / "results.sqlite3", readonly=True).query(newest_first=False)
    assert [r["complete"] for r in stored] == [True, True]


@pytest.mark.slow
def test_the_backlog_after_a_restart_is_processed_not_shed(mosquitto, parking_lot, model_dir, tmp_path):
    """While the aggregator was away the broker kept 20 windows (320 messages, more than the message
    queue holds); after the restart they arrive at the broker's pace and are all processed: backlog is
    never shed, only live overload is."""
    config = config_for(mosquitto, model_dir, tmp_path, ingest_queue_size=32)
    with Aggregator(config):
        pass  # creates the persistent session, then goes away
    past = (time.time_ns() // (2 * 10**9) - 200) * 2 * 10**9  # windows that ended minutes ago
    run_field(FieldConfig(layout=parking_lot, source=SourceSpec("sine", 1), duration_s=40.0,
                          mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port), start_epoch_ns=past))
    with Aggregator(config) as agg:
        assert wait_for(lambda: agg.worker.snapshot_counts().get("results", 0) == 20, 60)
        shed = agg.processor.snapshot_counts().get("shed", 0)
    stored = ResultStore(tmp_path / "results.sqlite3", readonly=True).query(newest_first=False)
    assert shed == 0 and len(stored) == 20 and all(r["complete"] for r in stored)
