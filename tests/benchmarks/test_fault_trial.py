"""Faults during live trials: broker and aggregator SIGKILLs, node outages (issue 9, short form).

The long form is ``make soak`` (10 broker restarts); here a few, so ``make test`` stays short.
"""

import time
from pathlib import Path

import pytest

from benchmarks.fault_trial import FaultConfig, _interleave, _schedule, run_fault_trial
from benchmarks.tiny_onnx_model import build_tiny_model
from edge_runtime.config import AggregatorConfig
from edge_runtime.result_store import ResultStore
from edge_runtime.service import Aggregator
from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field
from node_firmware_sim.link_model import LinkConfig, Outage
from spar_wire.mqtt_settings import MqttSettings

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "configs/sites/parking_lot.toml"


def test_faults_are_spread_interleaved_and_hit_half_assembled_windows():
    assert _interleave(2, 1) == ["broker", "aggregator", "broker"]
    assert _interleave(0, 2) == ["aggregator", "aggregator"]
    assert _interleave(2, 1, 1) == ["broker", "aggregator", "restart", "broker"]
    schedule = _schedule(FaultConfig(duration_s=40.0, broker_kills=3, aggregator_kills=2, aggregator_restarts=0),
                         window_s=2.0)
    times = [t for t, _ in schedule]
    assert len(schedule) == 5 and times == sorted(times) and len(set(times)) == 5
    assert all(6.0 <= t <= 31.0 and (t - 0.5) % 2.0 == 0 for t in times)  # 0.5 s after a window ended


@pytest.mark.slow
@pytest.mark.mosquitto
def test_nothing_acknowledged_is_lost_when_the_broker_and_the_aggregator_are_killed(tmp_path):
    """2 broker SIGKILLs, 1 aggregator SIGKILL and 1 graceful aggregator restart in 30 s: every PUBACKed
    message is in exactly one stored result, every window stored once and complete, SQLite consistent."""
    config = FaultConfig(duration_s=30.0, broker_kills=2, aggregator_kills=1, aggregator_restarts=1)
    report = run_fault_trial(config, tmp_path)
    assert [e.kind for e in report.events] == ["broker", "aggregator", "restart", "broker"]
    assert report.acked == report.produced == 15 * 16  # every message acknowledged in the end
    assert report.lost == [] and report.delivered == report.acked
    assert report.result_rows == 15 and report.duplicate_results == 0
    assert report.complete_once == report.windows_fully_acked == 15
    assert report.integrity == "ok" and report.aggregator_exit == 0
    assert report.passed
    assert "| **acknowledged but lost** | 0 |" in report.to_markdown()


@pytest.mark.slow
@pytest.mark.mosquitto
def test_a_node_outage_replays_into_late_counts_not_into_other_windows(mosquitto, parking_lot, tmp_path):
    """n03 is cut off for two windows: its outage buffer replays them when the link is back, after
    those windows closed at their deadline. The replays are counted late; no later window takes them."""
    build_tiny_model(parking_lot, tmp_path / "model")
    mqtt = MqttSettings(host=mosquitto.host, port=mosquitto.port)
    config = AggregatorConfig(site=SITE, model=tmp_path / "model/manifest.json", database=tmp_path / "r.sqlite3",
                              metrics_port=None, deadline_fraction=0.5, mqtt=mqtt)
    # Windows of 2 s are sent at t = 2, 4, 6, ...: those sent at 4 and 6 s wait in n03's buffer.
    link = LinkConfig(outages=(Outage("n03", 3.0, 4.0),))
    with Aggregator(config) as aggregator:
        summary = run_field(FieldConfig(layout=parking_lot, source=SourceSpec("sine", 3), duration_s=10.0,
                                        link=link, mqtt=mqtt, realtime=True))
        deadline = time.monotonic() + 15
        while aggregator.worker.snapshot_counts().get("results", 0) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        late, duplicates = aggregator.assembler.counts["late"], aggregator.assembler.counts["duplicate"]
    n03 = summary.nodes["n03"]
    assert n03.buffered == 4 and n03.buffer_dropped == 0 and n03.unsent == 0  # 2 windows x 2 modalities
    assert late == n03.buffered and duplicates == 0
    stored = ResultStore(tmp_path / "r.sqlite3", readonly=True).query(newest_first=False)
    assert len(stored) == 5
    with_n03 = ["n03" in r["present"]["microphone"] and "n03" in r["present"]["geophone"] for r in stored]
    assert with_n03 == [True, False, False, True, True]
    assert [r["complete"] for r in stored] == with_n03
