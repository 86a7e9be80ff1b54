"""Faults during live trials: broker and aggregator SIGKILLs (one between a window's close and its
commit), a node joining before them, node outages (issues 9 and 19, short form).

The long form is ``make soak`` (10 broker restarts); here a few, so ``make test`` stays short.
"""

import threading
import time
from pathlib import Path

import pytest

from benchmarks.errors import BenchError
from benchmarks.fault_trial import FULL_SITE, JOIN_SITE, FaultConfig, _interleave, _schedule, run_fault_trial
from edge_runtime.config import AggregatorConfig
from edge_runtime.metrics import Registry
from edge_runtime.result_store import ResultStore
from edge_runtime.service import Aggregator
from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field
from node_firmware_sim.link_model import LinkConfig, Outage
from spar_wire.mqtt_settings import MqttSettings
from testbed.held_commit_aggregator import HELD_START, HELD_WINDOWS, HeldCommitStore
from testbed.tiny_onnx_model import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "configs/sites/parking_lot.toml"


def test_faults_are_spread_interleaved_and_hit_half_assembled_windows():
    assert _interleave(2, 1) == ["broker", "aggregator", "broker"]
    assert _interleave(0, 2) == ["aggregator", "aggregator"]
    assert _interleave(2, 1, 1) == ["broker", "aggregator", "restart", "broker"]
    assert _interleave(2, 1, 1, 1) == ["broker", "aggregator", "gap", "restart", "broker"]
    schedule = _schedule(FaultConfig(duration_s=40.0, broker_kills=3, aggregator_kills=2, gap_kills=1,
                                     aggregator_restarts=0, join=None), window_s=2.0)
    times = [t for t, _ in schedule]
    assert len(schedule) == 6 and times == sorted(times) and len(set(times)) == 6
    assert [kind for _, kind in schedule].count("gap") == 1
    assert all(6.0 <= t <= 31.0 and (t - 0.5) % 2.0 == 0 for t in times)  # 0.5 s after a window ended


def test_with_a_join_the_faults_wait_until_its_partial_window_is_stored():
    """n08 joins 1.5 s into the seven-node lot; its birth's window waits for its 8 s deadline (from
    about 3 s): no fault before 12 s (see the module doc: a broker kill and then an aggregator kill
    while a window is held open lose what the broker had in flight)."""
    config = FaultConfig(duration_s=40.0)
    assert config.site == JOIN_SITE and config.join is not None and config.join.id == "n08"
    join = config.join_event(window_s=2.0)
    assert join.at_s == 1.5 and join.position == (1.0, 15.0)  # three quarters into window 0; n08 samples from 1
    times = [t for t, _ in _schedule(config, window_s=2.0)]
    assert len(times) == 5 and min(times) >= 12.0 and len(set(times)) == 5
    assert FaultConfig(join=None).site == FULL_SITE and FaultConfig(join=None).join_event(2.0) is None
    with pytest.raises(BenchError, match="closer than 1.5 windows"):
        _schedule(FaultConfig(duration_s=30.0), window_s=2.0)  # 5 faults in 12..22.5 s


def test_the_held_commit_store_names_the_windows_waiting_for_their_commit():
    """The gauges a gap kill polls: set while the batch waits, back to 0 once it is committed."""
    seen = {}

    class Store:
        def insert_new(self, results, window_ns=None):
            seen["during"] = (registry.value(HELD_WINDOWS), registry.value(HELD_START))
            return [True] * len(results)

        def count(self, site=None):
            return 7

    registry = Registry()
    store = HeldCommitStore(Store(), delay_s=1.0)
    store.expose(registry)
    results = [{"window_start_ns": 2_000_000_000}, {"window_start_ns": 4_000_000_000}]
    worker = threading.Thread(target=store.insert_new, args=(results,), kwargs={"window_ns": 2_000_000_000})
    worker.start()
    deadline = time.monotonic() + 0.9  # within the delay: the batch waits, not yet committed
    while registry.value(HELD_WINDOWS) != 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert registry.value(HELD_WINDOWS) == 2 and registry.value(HELD_START) == 4.0 and "during" not in seen
    worker.join()
    assert seen["during"] == (2, 4.0) and registry.value(HELD_WINDOWS) == 0
    assert store.count() == 7  # the rest is the wrapped store's


def test_a_hold_file_keeps_the_commit_waiting_until_it_is_removed(tmp_path):
    """The gap kill's guarantee: while the trial's hold file exists no commit happens, however long
    the scrape before the kill takes; removing it lets the commit through."""
    committed = threading.Event()

    class Store:
        def insert_new(self, results, window_ns=None):
            committed.set()
            return [True] * len(results)

    hold = tmp_path / "hold-commits"
    hold.touch()
    store = HeldCommitStore(Store(), delay_s=0.0, hold_file=hold)
    worker = threading.Thread(target=store.insert_new, args=([{"window_start_ns": 0}],))
    worker.start()
    assert not committed.wait(0.5)  # well past the 0 s delay: held by the file
    hold.unlink()
    assert committed.wait(5.0)
    worker.join(5.0)


@pytest.mark.slow
@pytest.mark.mosquitto
def test_nothing_acknowledged_is_lost_when_the_broker_and_the_aggregator_are_killed(tmp_path):
    """40 s of the seven-node lot, n08 joining at 1.5 s, then 2 broker SIGKILLs, 1 aggregator SIGKILL,
    1 aggregator SIGKILL between a window's close and its commit and 1 graceful restart: every PUBACKed
    message is in exactly one stored result, every window stored once (complete but for the one n08's
    birth falls in), SQLite consistent; every aggregator start after the join restored n08 from SQLite
    and none of its messages was refused as unknown_node."""
    config = FaultConfig(duration_s=40.0, broker_kills=2, aggregator_kills=1, gap_kills=1, aggregator_restarts=1)
    report = run_fault_trial(config, tmp_path)
    assert [e.kind for e in report.events] == ["broker", "aggregator", "gap", "restart", "broker"]
    assert report.acked == report.produced == 20 * 14 + 19 * 2  # every message acknowledged in the end
    assert report.lost == [] and report.delivered == report.acked
    assert report.result_rows == 20 and report.duplicate_results == 0
    assert report.complete_once == report.windows_fully_acked == 20
    assert report.integrity == "ok" and report.aggregator_exit == 0
    # The gap kill came while a window's result waited for its commit, and that window was stored once later.
    gap = next(e for e in report.events if e.kind == "gap")
    assert gap.in_gap and gap.held_window is not None and report.gap_landed == report.gap_stored_once == 1
    join = report.join
    assert join is not None and join.node == "n08" and join.first_window == 1 and join.join_windows == 1
    assert join.starts_after == join.restored == join.with_node == 3
    assert join.acked == join.delivered == 38 and join.unknown_node == join.unknown_log_lines == 0
    assert join.backlog >= 2  # at least the held window's two n08 messages, stored by the next process
    assert report.passed and join.passed
    markdown = report.to_markdown()
    assert "| **acknowledged but lost** | 0 |" in markdown and "Joined node n08: **passed**" in markdown
    assert "| … landed in the gap (window held, not in SQLite at the kill) | 1 / 1 |" in markdown


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
