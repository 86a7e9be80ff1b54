"""spar-trial: a seeded trial end to end through a real Mosquitto, its report checked against the raw logs."""

import io
import json
import sqlite3
from pathlib import Path

import pytest

from node_firmware_sim.link_model import read_link_log
from spar_wire.site_layout import load_site_layout
from trials.cli import default_model
from trials.cli import main as trial_main
from trials.errors import TrialError
from trials.live_view import LiveState, LiveView, render, status_line
from trials.report import analyze_trial
from trials.report_files import write_report
from trials.trial import BUSY_LOT_MODEL, SHIPPED_MODELS, TrialConfig, TrialMonitor, run_trial

REPO = Path(__file__).resolve().parents[2]
LOSSY = REPO / "configs" / "links" / "lossy.toml"
PARAMS = {"max_vehicles": 1, "empty_fraction": 0.1}


def stored_rows(folder):
    with sqlite3.connect(folder / "results.sqlite3") as db:
        return [json.loads(p) for (p,) in db.execute("SELECT payload FROM results ORDER BY window_start_ns")]


@pytest.fixture(scope="module")
def ten_second_trial(tmp_path_factory):
    """10 s of real time, lossy link (20 % loss, delay, reordering, duplicates), the shipped model."""
    out = tmp_path_factory.mktemp("trial") / "t"
    config = TrialConfig(out=out, link=LOSSY, duration_s=10.0, seed=3, broker="mosquitto", scenario_params=PARAMS)
    outcome = run_trial(config)
    return outcome, analyze_trial(out)


@pytest.mark.mosquitto
def test_report_counts_match_the_link_log_and_the_sqlite_store(ten_second_trial):
    outcome, report = ten_second_trial
    assert not outcome.interrupted
    events = read_link_log(outcome.folder / "link.jsonl")
    rows = stored_rows(outcome.folder)
    assert len(events) == 5 * 8 * 2  # 5 windows x 8 nodes x 2 modalities, all handed to the link
    assert report.produced == len(events) == outcome.field.total().messages
    lost = [e for e in events if e.outcome != "delivered"]
    assert report.injected_lost == len(lost) > 0  # seed 3 at 20 % loss loses some
    for row in report.traffic:
        mine = [e for e in events if (e.node, e.modality) == (row.node, row.modality)]
        assert row.sent == len(mine) and row.bytes == sum(e.nbytes for e in mine)
        assert row.observed == sum(row.node in r["present"].get(row.modality, []) for r in rows)
    # Nothing else happened to the frames: every delivered one is in exactly one stored window.
    assert report.observed == len(events) - len(lost) - report.late
    assert report.windows_sampled == 5 and report.windows_stored == len(rows) == 5
    assert len({r["window_start_ns"] for r in rows}) == len(rows)  # one result per window
    assert sum(report.nodes_present.values()) == len(rows)
    assert report.headline()["injected_loss"] == pytest.approx(len(lost) / len(events))


@pytest.mark.mosquitto
def test_report_scores_the_model_and_measures_latency(ten_second_trial):
    outcome, report = ten_second_trial
    assert {"classify/accuracy", "localize/mean_distance"} <= set(report.metrics)
    assert 0.0 <= report.metrics["classify/accuracy"] <= 1.0
    assert len(report.latency_ms) == report.windows_stored
    # Lost messages keep windows open until the deadline (1 s); a result can never precede its window.
    assert 0 < report.percentile(50) < 5000
    assert set(report.stage_ms) == {"assembly", "queue", "inference"}
    paths = write_report(report)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    text = paths[0].read_text()
    assert "## Traffic and loss" in text and "Reproduce: `spar-trial run" in text
    assert f"Frames produced: {report.produced}" in text


@pytest.mark.mosquitto
def test_the_same_seed_makes_the_same_link_decisions(ten_second_trial, tmp_path):
    # Compressed 10x: link decisions and signals depend on the seed only, not on the wall clock.
    outcome, _ = ten_second_trial
    again = run_trial(TrialConfig(out=tmp_path / "again", link=LOSSY, duration_s=10.0, seed=3, speed=10.0,
                                  broker="mosquitto", scenario_params=PARAMS))
    def decisions(folder):
        return [(e.node, e.modality, e.seq, e.nbytes, e.outcome) for e in read_link_log(folder / "link.jsonl")]
    assert decisions(again.folder) == decisions(outcome.folder)
    assert (again.folder / "truth.jsonl").read_text().count("\n") == 5


class StopAfter(TrialMonitor):
    """Presses Ctrl-C after ``n`` windows."""

    def __init__(self, layout, config, n):
        super().__init__(layout, config)
        self.n = n

    def on_truth(self, record):
        super().on_truth(record)
        if record["window"] + 1 >= self.n:
            raise KeyboardInterrupt


@pytest.mark.mosquitto
def test_ctrl_c_stops_cleanly_and_the_report_covers_what_ran(parking_lot, tmp_path):
    config = TrialConfig(out=tmp_path / "t", duration_s=20.0, speed=4.0, broker="mosquitto", scenario_params=PARAMS)
    outcome = run_trial(config, StopAfter(parking_lot, config, 3))
    assert outcome.interrupted and outcome.field is None
    report = analyze_trial(outcome.folder)
    assert report.interrupted and report.windows_sampled == 3
    assert report.windows_stored == len(stored_rows(outcome.folder)) <= 3
    write_report(report)
    assert "**Interrupted**" in (outcome.folder / "report.md").read_text()


@pytest.mark.mosquitto
def test_cli_runs_a_trial_and_refuses_to_overwrite_one(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["run", "--duration", "6", "--speed", "3", "--out", str(out), "--view", "lines", "--broker", "mosquitto"]
    assert trial_main(args) == 0
    assert "windows stored" in capsys.readouterr().out
    assert (out / "report.md").exists() and (out / "site_map.png").exists()
    assert trial_main(args) == 2
    assert "already holds a trial" in capsys.readouterr().err
    assert trial_main(["report", str(out)]) == 0
    assert trial_main(["report", str(tmp_path)]) == 2


def test_bad_arguments_are_refused_with_a_clear_error(tmp_path, capsys):
    with pytest.raises(TrialError, match="speed"):
        TrialConfig(out=tmp_path, speed=0)
    with pytest.raises(TrialError, match="unknown scenario"):
        TrialConfig(out=tmp_path, scenario="volcano")
    with pytest.raises(TrialError, match="codec"):
        TrialConfig(out=tmp_path, codec="gif")
    assert trial_main(["run", "--scenario", "body_har", "--out", str(tmp_path / "x")]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert default_model("parking_lot", {"max_vehicles": 3}) == BUSY_LOT_MODEL
    assert default_model("parking_lot", {}) == SHIPPED_MODELS["parking_lot"]
    assert default_model("earthquakes", {}) == SHIPPED_MODELS["earthquakes"]
    # unreadable recordings are refused before a broker or an aggregator starts, and leave no trial folder
    (tmp_path / "r.toml").write_text('[[recordings]]\nnode = "CLC"\nmodality = "seismometer"\npath = "gone.mseed"\n')
    assert trial_main(["run", "--scenario", "earthquakes", "--recordings", str(tmp_path / "r.toml"),
                       "--out", str(tmp_path / "y")]) == 2
    assert "gone.mseed does not exist" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_embedded_amqtt_broker_runs_a_trial(tmp_path):
    config = TrialConfig(out=tmp_path / "t", duration_s=6.0, speed=3.0, broker="amqtt", scenario_params=PARAMS)
    outcome = run_trial(config)
    report = analyze_trial(outcome.folder)
    assert report.windows_stored == report.windows_sampled == 3
    assert report.observed == report.produced  # perfect link: every frame in a stored window


@pytest.mark.mosquitto
def test_live_view_shows_nodes_traffic_and_detections(ten_second_trial, parking_lot, tmp_path):
    from rich.console import Console

    config = TrialConfig(out=tmp_path / "t", duration_s=8.0, speed=2.0, broker="mosquitto", scenario_params=PARAMS)
    monitor = TrialMonitor(load_site_layout(config.site), config)
    buffer = io.StringIO()
    with LiveView(monitor, "test", console=Console(file=buffer, force_terminal=False, width=200),
                  line_interval_s=0.5):
        run_trial(config, monitor)
    lines = buffer.getvalue().splitlines()
    assert len(lines) >= 3 and any("nodes 8/8 online" in line for line in lines)  # nodes go offline at the end
    assert "windows 4/4" in lines[-1] and "results 4" in lines[-1]
    snapshot = LiveState(monitor).snapshot()
    assert snapshot.detections and snapshot.detections[0].estimated_class is not None
    recorded = Console(record=True, width=120, file=io.StringIO())
    recorded.print(render(snapshot, "spar-edge"))
    text = recorded.export_text()
    assert "nodes online" in text and "latest results" in text and "->" in text
    assert "latest:" in status_line(snapshot)


def test_scores_follow_the_model_outputs_against_hand_checkable_truth():
    """Classification, localization, detection (mAP@r) and hypocentre scoring by output name."""
    from types import SimpleNamespace

    from trials.report import _scores

    def spec(name):
        return SimpleNamespace(name=name)

    manifest = SimpleNamespace(position_dim=2, outputs=[spec(n) for n in (
        "logits", "position", "detection_logits", "detection_positions")])
    truths = [{"label": 1, "targets": [{"class_id": 1, "position": [1.0, 2.0]}]},
              {"label": 2, "targets": [{"class_id": 2, "position": [10.0, 0.0]}]},
              {"label": 0, "targets": []}]
    # Right class for windows 0 and 2, wrong for 1; positions off by 3-4-5 m in window 1 only.
    results = [{"outputs": {"logits": [0, 5, 0], "position": [1.0, 2.0],
                            "detection_logits": [[0, 9, 0, 0], [0, 0, 0, 9]],
                            "detection_positions": [[1.0, 2.0], [0.0, 0.0]]}},
               {"outputs": {"logits": [0, 5, 0], "position": [13.0, 4.0],
                            "detection_logits": [[0, 0, 9, 0], [0, 0, 0, 9]],
                            "detection_positions": [[10.5, 0.0], [0.0, 0.0]]}},
               {"outputs": {"logits": [5, 0, 0], "position": [0.0, 0.0],
                            "detection_logits": [[0, 0, 0, 9], [0, 0, 0, 9]],
                            "detection_positions": [[0.0, 0.0], [0.0, 0.0]]}}]
    scored = _scores(manifest, list(zip(results, truths, strict=True)))
    m = scored.metrics
    assert m["classify/accuracy"] == pytest.approx(2 / 3)
    assert m["localize/mean_distance"] == pytest.approx(2.5)  # windows with a target: 0 m and 5 m
    assert m["detect/mAP@2"] == pytest.approx(1.0)  # both vehicles found, right class, within 2 m
    assert len(scored.positions) == 2  # the empty window has nothing to place on the map


@pytest.mark.mosquitto
def test_an_earthquake_trial_runs_the_shipped_seismic_model_and_reports_hypocentres_in_km(tmp_path):
    out = tmp_path / "quakes"
    # four 30.72 s windows, timeline compressed 8x; no --model: the scenario's shipped one
    assert trial_main(["run", "--scenario", "earthquakes", "--duration", "122.88", "--speed", "8", "--out", str(out),
                       "--view", "none"]) == 0
    report = analyze_trial(out)
    assert report.model.startswith("spar-ridgecrest@") and report.hypocentres
    assert report.windows_stored == 4 and len(report.positions) == 4
    # the mean-hypocentre guess is ~40 km off on this network (benchmarks/results/objectives-quakes.md)
    assert report.metrics["quake/epicentral_mean"] < 25_000
    text = (out / "report.md").read_text()
    assert "| quake/hypocentre_median |" in text and " km |" in text and "quake/hypocentre_median" in \
        report.summary_line() and report.summary_line().endswith(" km")
    assert (out / "site_map.png").stat().st_size > 20_000  # epicentres and the depth panel


@pytest.mark.mosquitto
def test_a_busy_lot_trial_runs_the_shipped_detector_and_scores_its_detections(tmp_path):
    """--param max_vehicles=3 without --model: the multi-vehicle detector, scored per window."""
    out = tmp_path / "busy"
    assert trial_main(["run", "--param", "max_vehicles=3", "--duration", "12", "--speed", "3", "--out", str(out),
                       "--view", "none"]) == 0
    report = analyze_trial(out)
    assert report.model.startswith("spar-parking-lot-multi@")
    assert report.windows_stored >= 3 and len(report.detections) == report.windows_stored
    assert {"detect/mAP@4", "detect/mAP@8"} <= set(report.metrics)
    truth = sum(len(w.truth) for w in report.detections)
    assert truth > 0 and sum(w.matched + w.missed for w in report.detections) == truth
    assert "matched" in (out / "report.md").read_text()


@pytest.mark.mosquitto
def test_real_recordings_replay_through_the_aggregator_into_stored_results(tmp_path):
    """obspy's own miniSEED test records (vertical-only stations, a corrupt last record) on five
    stations of the ridgecrest-like site, through a real broker and the shipped seismic model."""
    from node_firmware_sim.obspy_recordings import write_example_recordings

    recordings = write_example_recordings(tmp_path / "obspy.toml")
    out = tmp_path / "replay"
    assert trial_main(["run", "--scenario", "earthquakes", "--recordings", str(recordings), "--duration", "600",
                       "--speed", "8", "--out", str(out), "--view", "none"]) == 0
    rows = stored_rows(out)
    assert len(rows) == 2  # the shortest record (71 s) holds two 30.72 s windows; 600 s were asked for
    assert all(r["nodes_present"] == 5 and len(r["outputs"]["hypocentre"]) == 3 for r in rows)
    field = json.loads((out / "field.json").read_text())
    assert field["requested_windows"] == 20 and field["windows"] == 2
    assert any("unreadable part" in note and "brokenlastrecord" in note for note in field["source_notes"])
    text = (out / "report.md").read_text()
    assert "# Trial: replay of obspy.toml" in text and "Model outputs (replay: no ground truth)" in text
    assert "E, N not in test.mseed" in text and text.count("km deep") == 2
    assert f"--recordings {recordings}" in text  # the reproduce line replays the same files


def test_a_broker_that_cannot_start_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    code = trial_main(["run", "--out", str(tmp_path / "t"), "--duration", "4", "--broker", "rabbitmq"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown broker kind 'rabbitmq'" in err and "Traceback" not in err
