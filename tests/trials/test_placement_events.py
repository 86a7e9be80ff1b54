"""Placement events in a field trial: a node joins and a node moves while the aggregator runs.

One short trial through a real Mosquitto (the trial's own, like tests/benchmarks/test_trial.py) on the
7-node parking lot with the shipped model (it takes at most 8 nodes): n08 joins at 7.8 s, n03 moves at
15.8 s. Windows are 2 s: the join is in window 3 (n08's first full window is 4), the move in window 7.
Both late in their window: the simulator renders a window after its send time, so on a busy machine
the previous window's messages leave a few hundred ms late, and a birth must not overtake them.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.result_store import ResultStore
from node_firmware_sim.errors import NodeError
from node_firmware_sim.placement_events import EventPlan, PlacementEvent, check_events, load_events
from node_firmware_sim.scenarios.base import GroundTruth, SourceWindow
from trials.cli import main as trial_main
from trials.errors import TrialError
from trials.report import analyze_trial
from trials.report_files import write_report
from trials.trial import TrialConfig, load_layout, run_trial

REPO = Path(__file__).resolve().parents[2]
SEVEN_NODES = REPO / "configs" / "trials" / "parking_lot_without_n08.toml"
EXAMPLE_EVENTS = REPO / "configs" / "trials" / "join_and_move.toml"
PARAMS = {"max_vehicles": 1, "empty_fraction": 0.1}  # the shipped model's training traffic
WINDOW_S = 2.0
JOIN = PlacementEvent("join", "n08", 7.8, (1.0, 15.0), "west edge, in line with the drive aisle")
MOVE = PlacementEvent("move", "n03", 15.8, (20.0, 8.0), "traffic island south of the drive aisle")
OLD_N03 = (27.0, 0.5)


@pytest.fixture(scope="module")
def events_trial(tmp_path_factory):
    """24 s of trial time at 2x (12 windows), a perfect link: the report, stored rows, placements, start."""
    out = tmp_path_factory.mktemp("events") / "t"
    config = TrialConfig(out=out, site=SEVEN_NODES, duration_s=24.0, speed=2.0, seed=5, broker="mosquitto",
                         scenario_params=PARAMS, events=(JOIN, MOVE))
    outcome = run_trial(config)
    assert not outcome.interrupted
    with ResultStore(out / "results.sqlite3", readonly=True) as store:
        rows = store.query(limit=None, newest_first=False)
    placements = {r["window_start_ns"]: dict(zip(r["nodes"], r["positions"], strict=True)) for r in rows}
    start_ns = outcome.field.start_epoch_ns
    return analyze_trial(out), rows, placements, start_ns


def trial_window(row, start_ns):
    """The trial window index of a stored row (node clocks are exact here: no clock offset)."""
    return round((row["window_start_ns"] - start_ns) / (WINDOW_S * 1e9))


def present_in(row, node):
    return {m for m, nodes in row["present"].items() if node in nodes}


@pytest.mark.mosquitto
def test_a_joined_node_is_in_the_first_complete_window_after_its_birth(events_trial):
    report, rows, _, start_ns = events_trial
    assert len(rows) == 12  # perfect link: every window stored
    birth_ns = start_ns + JOIN.at_s * 1e9
    before = [r for r in rows if r["window_start_ns"] + WINDOW_S * 1e9 <= birth_ns]
    assert len(before) == 3 and all("n08" not in r["nodes"] for r in before)
    after_birth = [r for r in rows if r["window_start_ns"] >= birth_ns]
    first_complete = next(r for r in after_birth if r["complete"])
    assert trial_window(first_complete, start_ns) == 4  # the first window n08 sampled
    assert present_in(first_complete, "n08") == {"microphone", "geophone"}
    assert all(present_in(r, "n08") == {"microphone", "geophone"} for r in after_birth)
    # The window in progress at the birth: the aggregator awaits n08 from its birth on, but n08 has no
    # full window of it to send, so it closes at its deadline without n08.
    in_progress = next(r for r in rows if trial_window(r, start_ns) == 3)
    assert "n08" in in_progress["nodes"] and not present_in(in_progress, "n08") and not in_progress["complete"]
    n08 = next(row for row in report.traffic if (row.node, row.modality) == ("n08", "microphone"))
    assert n08.sent == n08.observed == 8  # windows 4..11


@pytest.mark.mosquitto
def test_a_moved_node_is_used_at_its_new_place_from_the_window_of_its_birth(events_trial):
    _, rows, placements, start_ns = events_trial
    used = {trial_window(r, start_ns): placements[r["window_start_ns"]]["n03"] for r in rows}
    assert sorted(used) == list(range(12))
    for window, position in used.items():
        expected = MOVE.position if window >= 7 else OLD_N03  # 15.8 s is in window 7
        assert np.allclose(position, expected, atol=1e-4), (window, position)
    # The joined node's tensor row carries the position of its birth.
    assert all(np.allclose(placements[r["window_start_ns"]]["n08"], JOIN.position) for r in rows
               if "n08" in r["nodes"])


@pytest.mark.mosquitto
def test_the_report_has_before_and_after_per_event(events_trial):
    report, rows, _, start_ns = events_trial
    join, move = report.events
    assert (join.kind, join.node, join.event_window, join.first_window, join.windows_until) == ("join", "n08", 3, 4, 1)
    assert (move.kind, move.node, move.event_window, move.first_window, move.windows_until) == ("move", "n03", 7, 7, 0)
    incomplete = {trial_window(r, start_ns) for r in rows if not r["complete"]}
    assert join.partial_between == len(incomplete & {3}) == 1 and move.partial_between == 0
    # Before: since the previous event; after: from the first window with it to the next event.
    assert (join.before_windows, join.after_windows) == (3, 3)  # windows 0-2 | 4-6
    assert (move.before_windows, move.after_windows) == (4, 5)  # windows 3-6 | 7-11
    for outcome in (join, move):
        assert set(outcome.before) == set(outcome.after) == {"classify/accuracy", "localize/mean_distance"}
        assert 0.0 <= outcome.after["classify/accuracy"] <= 1.0
    write_report(report)
    text = (report.folder / "report.md").read_text()
    assert "## Placement events" in text and "| join n08 at (1, 15) | 7.8 s (window 3) | 4 | 1 | 1 | 3 |" in text
    saved = json.loads((report.folder / "report.json").read_text())["placement_events"]
    assert [(e["kind"], e["first_window"], e["after_windows"]) for e in saved] == [("join", 4, 3), ("move", 7, 5)]


def test_the_physics_follows_the_moved_node():
    """A moved node reads the receiver at its new place from the window in progress at the move."""
    layout = load_layout(SEVEN_NODES)
    plan = EventPlan(layout, (MOVE, JOIN), duration_s=24.0)
    receiver = plan.physics_layout.node("n03~move2")
    assert receiver.position == MOVE.position and plan.nodes_layout.node("n08").position == JOIN.position
    assert plan.receivers(6, ("n03", "n08")) == {"n03": "n03", "n08": "n08"}
    assert plan.receivers(7, ("n03",)) == {"n03": "n03~move2"}
    assert plan.receivers(3, ("n08",)) == {}  # powered on during window 3: its first full window is 4
    signals = {(n, "geophone"): np.full((1, 4), float(i)) for i, n in enumerate(("n03", "n03~move2", "n01"))}
    window = SourceWindow(7, 14.0, signals, GroundTruth(0))
    seen = plan.nodes_window(window, plan.receivers(7, ("n01", "n03")))
    assert set(seen.signals) == {("n01", "geophone"), ("n03", "geophone")}
    assert seen.signals[("n03", "geophone")] is signals[("n03~move2", "geophone")]


@pytest.mark.parametrize(("event", "message"), [
    (PlacementEvent("move", "n99", 5.0, (1.0, 2.0)), "no node n99 in site parking_lot and no earlier join"),
    (PlacementEvent("join", "n03", 5.0, (1.0, 2.0)), "node n03 already exists (the site layout lists it)"),
    (PlacementEvent("join", "n09", 5.0, (1.0, 2.0, 3.0)), "3-D position in a site with 2-D positions"),
    (PlacementEvent("join", "n09", 23.5, (1.0, 2.0)), "first full window would start at 24 s"),
])
def test_events_the_site_cannot_take_are_refused(event, message):
    layout = load_layout(SEVEN_NODES)
    with pytest.raises(NodeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_events((event,), layout, 24.0, max_nodes=8)


def test_bad_event_configs_are_refused_with_clear_messages(tmp_path):
    layout = load_layout(SEVEN_NODES)
    twice = (PlacementEvent("join", "n08", 3.0, (1.0, 2.0)), PlacementEvent("join", "n08", 5.0, (1.0, 2.0)))
    with pytest.raises(NodeError, match="already exists \\(it joined earlier\\)"):
        check_events(twice, layout, 24.0, max_nodes=16)
    with pytest.raises(NodeError, match="makes 9 nodes, but the model takes at most 8"):
        check_events((PlacementEvent("join", "n09", 3.0, (1.0, 2.0)),),
                     load_layout(REPO / "configs" / "sites" / "parking_lot.toml"), 24.0, max_nodes=8)
    with pytest.raises(TrialError, match="the trial lasts 24 s; an event must happen during it"):
        TrialConfig(out=tmp_path, duration_s=24.0, events=({"kind": "move", "node": "n03", "at_s": 30,
                                                             "position": [1, 2]},))
    with pytest.raises(TrialError, match="at_s must be a finite number of seconds > 0"):
        TrialConfig(out=tmp_path, events=({"kind": "move", "node": "n03", "at_s": -1, "position": [1, 2]},))
    with pytest.raises(TrialError, match="kind must be one of"):
        TrialConfig(out=tmp_path, events=({"kind": "teleport", "node": "n03", "at_s": 1, "position": [1, 2]},))
    bad = tmp_path / "bad.toml"
    bad.write_text('[[events]]\nat_s = 4.5\nkind = "join"\nnode = "n08"\npos = [1.0, 2.0]\n')
    with pytest.raises(NodeError, match=r"events\[0\]: unknown key\(s\) \['pos'\]"):
        load_events(bad)


def test_the_cli_refuses_bad_events_before_starting_anything(tmp_path, capsys):
    events = tmp_path / "events.toml"
    events.write_text('[[events]]\nat_s = 4.5\nkind = "move"\nnode = "n42"\nposition = [1.0, 2.0]\n')
    out = tmp_path / "trial"
    assert trial_main(["run", "--events", str(events), "--site", str(SEVEN_NODES), "--duration", "10",
                       "--out", str(out), "--view", "none"]) == 2
    assert "no node n42 in site parking_lot" in capsys.readouterr().err
    assert not out.exists()  # refused before the folder, the broker or the aggregator


def test_the_example_events_fit_the_example_site():
    plan = check_events(load_events(EXAMPLE_EVENTS), load_layout(SEVEN_NODES), 120.0, max_nodes=8)
    assert plan.joined == ("n08",) and len(plan.physics_layout.nodes) == 9


@pytest.mark.mosquitto
def test_compare_scores_the_same_windows_in_a_control_trial(events_trial, tmp_path):
    """The control (same seed, no events) sees the same world: before the first event both trials score
    alike; after the join the table pairs the same windows of both trials."""
    from trials.control import compare_with_control

    report = events_trial[0]
    control = tmp_path / "control"
    run_trial(TrialConfig(out=control, site=SEVEN_NODES, duration_s=24.0, speed=2.0, seed=5, broker="mosquitto",
                          scenario_params=PARAMS))
    lines = compare_with_control(report.folder, control)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| join") or
            line.startswith("| move")}
    assert set(rows) == {"join n08, before", "join n08, after", "move n03, before", "move n03, after"}
    assert "(3/3)" in rows["join n08, before"]  # windows 0-2 stored in both trials
    # before the first event the two trials are the same world: every metric pair is equal
    cells = [c.strip() for c in rows["join n08, before"].strip("| ").split(" | ")[2:]]
    assert len(cells) == 4 and cells[0::2] == cells[1::2], cells
    assert trial_main(["compare", str(report.folder), str(control)]) == 0
    assert (report.folder / "compare.md").exists()
    other = tmp_path / "other-seed"
    run_trial(TrialConfig(out=other, site=SEVEN_NODES, duration_s=4.0, speed=2.0, seed=6, broker="mosquitto",
                          scenario_params=PARAMS))
    with pytest.raises(TrialError, match="seed"):
        compare_with_control(report.folder, other)
