"""spar-aggregator run / query as a user runs them, with the shipped config and test model."""

import json
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from edge_runtime.config import load_config
from edge_runtime.result_store import ResultStore
from edge_runtime.service import Aggregator
from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field
from spar_wire.mqtt_settings import MqttSettings

REPO = Path(__file__).resolve().parents[2]


def aggregator_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "edge_runtime.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def retained_state(port):
    got = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("spar/v1/parking_lot/aggregator/state", qos=1)
    client.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    client.connect("127.0.0.1", port)
    client.loop_start()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    client.disconnect()
    client.loop_stop()
    return got[0] if got else None


def shipped_config(tmp_path, broker):
    """configs/aggregator.toml in this process: its own database and broker port, and IEEE subnormals
    kept (flush_denormals would change this test process's floating-point mode for later tests)."""
    config = load_config(REPO / "configs/aggregator.toml")
    assert config.flush_denormals  # the field process flushes them
    return config.replace(database=tmp_path / "r.sqlite3", metrics_port=0, mqtt=MqttSettings(port=broker.port),
                          flush_denormals=False)


def test_shipped_config_runs_and_query_reads_back(mosquitto, parking_lot, tmp_path):
    config = shipped_config(tmp_path, mosquitto)
    with Aggregator(config) as agg:
        assert retained_state(mosquitto.port)["state"] == "online"
        run_field(FieldConfig(layout=parking_lot, source=SourceSpec("parking_lot", 2), duration_s=4.0,
                              mqtt=MqttSettings(port=mosquitto.port)))
        deadline = time.monotonic() + 15
        while agg.worker.snapshot_counts().get("results", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert retained_state(mosquitto.port)["state"] == "offline"
    table = aggregator_cli("query", "--database", str(tmp_path / "r.sqlite3"))
    assert table.returncode == 0, table.stderr
    assert "2 result(s)" in table.stdout and "parking_lot" in table.stdout
    lines = aggregator_cli("query", "--database", str(tmp_path / "r.sqlite3"), "--json", "--oldest-first",
                           "--limit", "1").stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["nodes_present"] == 8


def test_hostile_input_is_counted_and_results_keep_coming(mosquitto, parking_lot, tmp_path):
    config = shipped_config(tmp_path, mosquitto)
    attacker = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    attacker.connect("127.0.0.1", mosquitto.port)
    attacker.loop_start()
    junk = [("spar/v1/parking_lot/n01/data/microphone", b"\x00" * 10),
            ("spar/v1/parking_lot/n01/data/microphone", b"SPAR" + b"\xff" * 100),
            ("spar/v1/parking_lot/n01/birth", b"not json"),
            ("spar/v1/parking_lot/zz9/data/microphone", b"x"),
            ("spar/v1/parking_lot/n 1/data/microphone", b"x"),
            ("spar/v1/parking_lot/n01/data/lidar", b"x")]
    with Aggregator(config) as agg:
        for topic, payload in junk:
            attacker.publish(topic, payload, qos=1).wait_for_publish(5)
        run_field(FieldConfig(layout=parking_lot, source=SourceSpec("sine", 2), duration_s=2.0,
                              mqtt=MqttSettings(port=mosquitto.port)))
        deadline = time.monotonic() + 15
        while agg.worker.snapshot_counts().get("results", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        counts = agg.processor.snapshot_counts()
    attacker.disconnect()
    attacker.loop_stop()
    rejected = {k: v for k, v in counts.items() if k.startswith("rejected.")}
    assert sum(rejected.values()) == len(junk), rejected
    assert "rejected.internal_error" not in rejected
    assert ResultStore(tmp_path / "r.sqlite3", readonly=True).count() == 1


def test_run_command_reports_a_missing_model(tmp_path):
    bad = tmp_path / "a.toml"
    bad.write_text(f'[aggregator]\nsite = "{REPO / "configs/sites/parking_lot.toml"}"\nmodel = "nope.json"\n')
    result = aggregator_cli("run", "--config", str(bad), "--duration", "1")
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr
    result = aggregator_cli("query", "--database", str(tmp_path / "none.sqlite3"))
    assert result.returncode == 2 and "no such database" in result.stderr


def test_the_seismic_hut_config_runs_the_shipped_seismic_model(mosquitto, tmp_path):
    """configs/aggregator-ridgecrest.toml as docs/deployment.md's seismic-hut story runs it: simulated
    events from the 16 stations (a fifth of the traces missing) -> hypocentres stored in SQLite."""
    from spar_wire.site_layout import load_site_layout

    config = load_config(REPO / "configs/aggregator-ridgecrest.toml")
    assert config.model.parent.name == "ridgecrest_like" and config.site.name == "ridgecrest_like.toml"
    # a short deadline: the nodes send as fast as they can, and a window with missing traces never completes
    config = config.replace(database=tmp_path / "q.sqlite3", metrics_port=0, mqtt=MqttSettings(port=mosquitto.port),
                            flush_denormals=False, deadline_fraction=0.05)
    with Aggregator(config) as agg:
        run_field(FieldConfig(layout=load_site_layout(config.site), source=SourceSpec("earthquakes", 4),
                              duration_s=61.44, mqtt=MqttSettings(port=mosquitto.port)))
        deadline = time.monotonic() + 20
        while agg.worker.snapshot_counts().get("results", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    rows = ResultStore(tmp_path / "q.sqlite3", readonly=True).query(limit=10)
    assert len(rows) == 2 and all(len(r["outputs"]["hypocentre"]) == 3 for r in rows)
    depths = [r["outputs"]["hypocentre"][2] for r in rows]
    assert all(-5_000 < d < 40_000 for d in depths)  # metres below the datum: a crust, not the mantle
    table = aggregator_cli("query", "--database", str(tmp_path / "q.sqlite3")).stdout
    assert table.count("km deep") == 2 and "2 result(s)" in table  # the hypocentre, not the output's name



def test_the_busy_lot_config_runs_the_shipped_detector(mosquitto, tmp_path):
    """configs/aggregator-busy-lot.toml as docs/deployment.md's busy-lot story runs it: up to three vehicles
    at once -> one detection query per node stored, and `query` says how many it found and where."""
    from spar_wire.site_layout import load_site_layout

    config = load_config(REPO / "configs/aggregator-busy-lot.toml")
    assert config.model.parent.name == "parking_lot_multi" and config.site.name == "parking_lot.toml"
    config = config.replace(database=tmp_path / "b.sqlite3", metrics_port=0, mqtt=MqttSettings(port=mosquitto.port),
                            flush_denormals=False)
    with Aggregator(config) as agg:
        run_field(FieldConfig(layout=load_site_layout(config.site), source=SourceSpec(
            "parking_lot", 4, {"max_vehicles": 3, "empty_fraction": 0.0}), duration_s=8.0,
            mqtt=MqttSettings(port=mosquitto.port)))
        deadline = time.monotonic() + 20
        while agg.worker.snapshot_counts().get("results", 0) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    rows = ResultStore(tmp_path / "b.sqlite3", readonly=True).query(limit=10)
    assert len(rows) == 4
    for row in rows:  # one query per node: 8 nodes, 5 classes + "no object"
        assert len(row["outputs"]["detection_logits"]) == 8 and len(row["outputs"]["detection_logits"][0]) == 6
        assert len(row["outputs"]["detection_positions"]) == 8
    table = aggregator_cli("query", "--database", str(tmp_path / "b.sqlite3")).stdout
    assert table.count(" detected") == 4 and "4 result(s)" in table
