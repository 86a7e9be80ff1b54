"""Node registry and window assembler: pure logic, driven with a hand-made clock."""

import dataclasses

import numpy as np
import pytest

from edge_runtime.node_registry import NodeRegistry
from edge_runtime.window_assembler import WindowAssembler
from spar_wire.lifecycle import BirthMessage, ModalityInfo, StateMessage
from spar_wire.model_manifest import ModalityRequirement, ModelManifest, TensorSpec

W_NS = 2 * 10**9


def manifest_for(layout):
    mods = {name: ModalityRequirement(spec.features.hash, spec.features.n_tokens, spec.features.token_dim)
            for name, spec in layout.modalities.items()}
    return ModelManifest(name="t", version="1", task="classification", artifact_file="m.onnx",
                         artifact_format="onnx", precision="fp32", sha256="0" * 64, position_dim=2,
                         node_range=(1, 64), modalities=mods, inputs=(),
                         outputs=(TensorSpec("logits", "float32", ("batch", 5), "class_logits"),))


@pytest.fixture
def parts(parking_lot):
    manifest = manifest_for(parking_lot)
    registry = NodeRegistry(parking_lot, manifest)
    features = {m: s.features for m, s in parking_lot.modalities.items()}
    assembler = WindowAssembler(features, 2.0, deadline_s=1.0, max_open=3)
    return parking_lot, manifest, registry, assembler


def tokens_for(layout, modality, value):
    cfg = layout.modalities[modality].features
    return np.full((cfg.n_tokens, cfg.token_dim), value, np.float32)


def birth(layout, node, position=None, bd_seq=0, feature_hash=None, site=None):
    names = layout.node(node).modalities if node in layout.node_ids else tuple(layout.modalities)
    mods = {m: ModalityInfo(feature_hash or layout.modalities[m].features.hash, 1.0, 1) for m in names}
    return BirthMessage(site=site or layout.site_id, node=node, bd_seq=bd_seq,
                        position=position or layout.node(node).position, modalities=mods)


def feed(layout, registry, assembler, window, nodes, now, start_ns=None, value=1.0):
    closed = []
    for node in nodes:
        for modality in layout.node(node).modalities if node in layout.node_ids else layout.modalities:
            closed += assembler.add(node, modality, start_ns if start_ns is not None else window * W_NS,
                                    tokens_for(layout, modality, value), registry.snapshot(), now).closed
    return closed


def test_complete_window_closes_at_once_with_everything_present(parts):
    layout, _, registry, assembler = parts
    closed = feed(layout, registry, assembler, 10, layout.node_ids, now=5.0)
    assert len(closed) == 1
    window = closed[0]
    assert window.complete and window.reason == "complete" and window.window_start_ns == 10 * W_NS
    assert window.inputs["tokens_microphone"].shape == (8, 32, 128)
    assert window.inputs["present_geophone"].all()
    np.testing.assert_array_equal(window.inputs["positions"], layout.positions().astype(np.float32))
    assert window.inputs["node_index"].tolist() == list(range(8))


def test_missing_nodes_are_zero_padded_at_the_deadline(parts):
    layout, _, registry, assembler = parts
    assert feed(layout, registry, assembler, 3, ["n01", "n02", "n04"], now=1.0) == []
    assert assembler.expire(registry.snapshot(), now_s=1.9) == []
    (window,) = assembler.expire(registry.snapshot(), now_s=2.0)
    assert not window.complete and window.reason == "deadline"
    assert window.inputs["present_microphone"].tolist() == [True, True, False, True] + [False] * 4
    assert not window.inputs["tokens_microphone"][2].any()
    assert window.nodes_present == 3 and window.received == 6 and window.expected == 16


def test_late_duplicate_and_out_of_order(parts):
    layout, _, registry, assembler = parts
    feed(layout, registry, assembler, 5, ["n01"], now=0.0)
    feed(layout, registry, assembler, 4, ["n01"], now=0.1)  # an older window opens after a newer one
    assert assembler.counts["out_of_order"] == 1
    feed(layout, registry, assembler, 5, ["n01"], now=0.2)  # the same messages again
    assert assembler.counts["duplicate"] == 2
    closed = assembler.expire(registry.snapshot(), now_s=5.0)
    assert [w.window_index for w in closed] == [4, 5]
    feed(layout, registry, assembler, 5, ["n02"], now=5.1)  # window 5 is closed: late
    assert assembler.counts["late"] == 2 and assembler.open_windows == 0


def test_a_window_hands_on_the_receipts_of_every_message_it_held(parts):
    """Receipts (to acknowledge once stored) travel with the window, a redelivered duplicate's too;
    a late message is not held, so its caller knows to acknowledge it at once."""
    layout, _, registry, assembler = parts
    modality = layout.node("n01").modalities[0]
    tokens = tokens_for(layout, modality, 1.0)
    snapshot = registry.snapshot()
    assert assembler.add("n01", modality, 5 * W_NS, tokens, snapshot, 0.0, receipt="r1").held
    assert assembler.add("n01", modality, 5 * W_NS, tokens, snapshot, 0.1, receipt="r1-again").held
    (window,) = assembler.expire(snapshot, now_s=5.0)
    assert window.receipts == ["r1", "r1-again"] and window.message_count == 1
    # Closed but not yet stored: a late copy (redelivered after a reconnect) waits with the window.
    late = assembler.add("n01", modality, 5 * W_NS, tokens, snapshot, 5.1, receipt="r1-third")
    assert late.held and late.closed == [] and assembler.counts["late"] == 1
    assert assembler.take_receipts(window) == ["r1", "r1-again", "r1-third"]
    assert assembler.take_receipts(window) == []  # taken once: never acknowledged twice
    # Stored (receipts taken): a late copy is its caller's to acknowledge at once.
    later = assembler.add("n01", modality, 5 * W_NS, tokens, snapshot, 5.2, receipt="r1-fourth")
    assert not later.held and assembler.counts["late"] == 2


def test_clock_offsets_round_to_the_same_window(parts):
    layout, _, registry, assembler = parts
    closed = []
    for i, node in enumerate(layout.node_ids):
        offset_ns = (-1) ** i * 300_000_000  # +-0.3 s of a 2 s window
        closed += feed(layout, registry, assembler, 0, [node], now=0.0, start_ns=7 * W_NS + offset_ns)
    assert len(closed) == 1 and closed[0].complete and closed[0].window_index == 7


def test_open_windows_are_bounded(parts):
    layout, _, registry, assembler = parts
    closed = []
    for window in range(6):
        closed += feed(layout, registry, assembler, window, ["n01"], now=float(window) / 10)
    assert assembler.open_windows == 3
    assert [w.reason for w in closed] == ["forced"] * 3 and [w.window_index for w in closed] == [0, 1, 2]


def test_births_admit_refuse_move_and_join(parts):
    layout, _, registry, _ = parts
    assert registry.on_birth(birth(layout, "n01")).accepted
    # Once births arrive, only announced nodes are awaited.
    assert {n for n, _ in registry.snapshot().expected} == {"n01"}
    refused = registry.on_birth(birth(layout, "n02", feature_hash="0123456789abcdef"))
    assert not refused.accepted and refused.reason == "feature_hash_mismatch"
    assert registry.check_data("n02", "microphone", layout.modalities["microphone"].features.hash).reason \
        == "refused_node"
    assert registry.on_birth(birth(layout, "n03", position=(20.0, 20.0))).accepted  # moved
    snap = registry.snapshot()
    assert snap.positions[snap.slot("n03")].tolist() == [20.0, 20.0] and registry.counts["moved"] == 1
    assert registry.on_birth(birth(layout, "n99", position=(39.5, 28.0))).accepted  # joined
    snap = registry.snapshot()
    assert snap.node_ids[-1] == "n99" and snap.node_index[-1] == layout.node_ids.index("n05")
    assert not registry.on_birth(birth(layout, "n04", site="other")).accepted


def test_stale_will_is_ignored(parts):
    layout, _, registry, _ = parts
    registry.on_birth(birth(layout, "n01", bd_seq=3))
    assert not registry.on_state("n01", StateMessage("offline", 2)).accepted
    assert registry.nodes()[0].online
    assert registry.on_state("n01", StateMessage("offline", 3)).accepted
    assert not registry.nodes()[0].online


def test_data_checks(parts):
    layout, _, registry, _ = parts
    mic = layout.modalities["microphone"].features.hash
    assert registry.check_data("n01", "microphone", mic).accepted
    assert registry.check_data("zz", "microphone", mic).reason == "unknown_node"
    assert registry.check_data("n01", "lidar", mic).reason == "unknown_modality"
    assert registry.check_data("n01", "microphone", "f" * 16).reason == "feature_hash_mismatch"


def test_joined_node_is_in_the_next_window(parts):
    layout, _, registry, assembler = parts
    for node in layout.node_ids:
        registry.on_birth(birth(layout, node))
    assert len(feed(layout, registry, assembler, 1, layout.node_ids, now=0.0)) == 1
    registry.on_birth(birth(layout, "n09", position=(5.0, 5.0)))
    assert feed(layout, registry, assembler, 2, layout.node_ids, now=2.0) == []  # waits for n09
    (window,) = feed(layout, registry, assembler, 2, ["n09"], now=2.1)
    assert window.complete and window.n_nodes == 9 and window.inputs["present_microphone"][-1]


def test_a_grid_that_is_not_aligned_to_the_epoch(parts):
    """Nodes started at an odd second: windows k and k+1 must never share an index."""
    layout, _, registry, assembler = parts
    base = 10**18 + 1_000_000_001  # half a window off the epoch grid, plus a nanosecond
    closed = []
    for k in range(4):
        for i, node in enumerate(layout.node_ids):
            jitter = (-1) ** i * 400_000_000
            closed += feed(layout, registry, assembler, 0, [node], now=float(k), start_ns=base + k * W_NS + jitter)
    assert [w.complete for w in closed] == [True] * 4
    assert [w.window_start_ns for w in closed] == [base + k * W_NS for k in range(4)]
    assert assembler.counts["duplicate"] == 0


def test_registry_growth_is_bounded(parking_lot):
    manifest = manifest_for(parking_lot)
    small = NodeRegistry(parking_lot, dataclasses.replace(manifest, node_range=(1, 9)))
    assert small.on_birth(birth(parking_lot, "x1", position=(1.0, 1.0))).accepted
    refused = small.on_birth(birth(parking_lot, "x2", position=(2.0, 2.0)))
    assert not refused.accepted and refused.reason == "too_many_nodes"
    registry = NodeRegistry(parking_lot, manifest)
    for i in range(1100):
        registry.on_birth(birth(parking_lot, f"spoof{i}", position=(0.0, 0.0), feature_hash="0" * 16))
    assert len(registry.refused()) == 1024 and "spoof1099" in registry.refused()


def test_spar_llm_windows_carry_each_nodes_description_embedding(parking_lot, tmp_path, monkeypatch):
    """A SPAR+LLM model is fed node_text: the layout's descriptions, a joining node's birth
    description from its first window, and a moved node's new description."""
    from spar_wire.placement_text import PlacementTextEncoder

    monkeypatch.setenv("SPAR_TEXT_CACHE", str(tmp_path))
    text = PlacementTextEncoder()
    registry = NodeRegistry(parking_lot, manifest_for(parking_lot))
    features = {m: s.features for m, s in parking_lot.modalities.items()}
    assembler = WindowAssembler(features, 2.0, deadline_s=1.0, max_open=3, node_text=text)
    for node in parking_lot.node_ids:
        registry.on_birth(birth(parking_lot, node))
    (first,) = feed(parking_lot, registry, assembler, 1, parking_lot.node_ids, now=0.0)
    assert "node_index" not in first.inputs
    np.testing.assert_array_equal(first.inputs["node_text"],
                                  text.embed([parking_lot.node(n).description for n in parking_lot.node_ids]))
    joiner = dataclasses.replace(birth(parking_lot, "n09", position=(5.0, 5.0)),
                                 description="on the lamp post at the exit gate")
    moved = dataclasses.replace(birth(parking_lot, "n02", position=(12.0, 3.0)),
                                description="on the fence by the bicycle racks")
    assert registry.on_birth(joiner).accepted and registry.on_birth(moved).accepted
    (second,) = feed(parking_lot, registry, assembler, 2, [*parking_lot.node_ids, "n09"], now=2.0)
    slot = {node: i for i, node in enumerate(second.node_ids)}
    np.testing.assert_array_equal(second.inputs["node_text"][slot["n09"]], text.embed([joiner.description])[0])
    np.testing.assert_array_equal(second.inputs["node_text"][slot["n02"]], text.embed([moved.description])[0])
    np.testing.assert_allclose(second.inputs["positions"][slot["n02"]], (12.0, 3.0))
    # a later birth without a description keeps the node's known one
    registry.on_birth(birth(parking_lot, "n02", position=(12.0, 4.0), bd_seq=1))
    assert registry.snapshot().descriptions[slot["n02"]] == moved.description


def test_the_grid_recovers_when_the_whole_site_jumps_back_in_time(parts):
    """A window closed far ahead of the site (a clock error that got past the guard, or every node
    correcting its clock at once) used to make every later message late for good: after two windows'
    worth of far-late messages from several nodes the grid resets itself and windows close again."""
    layout, _, registry, assembler = parts
    feed(layout, registry, assembler, 1000, layout.node_ids, now=1.0)  # a window far ahead closes
    closed = []
    for k in range(4):
        closed += feed(layout, registry, assembler, 10 + k, layout.node_ids, now=2.0 + k)
    assert assembler.counts["grid_reset"] == 1
    # Windows 10 and 11 are the two windows' worth it takes to notice; from 12 on the site is back.
    assert [w.window_index for w in closed if w.complete] == [12, 13]
    # A single node far behind never resets the grid (its messages stay late).
    before = assembler.counts["late"]
    for k in range(40):
        feed(layout, registry, assembler, 5, ["n01"], now=10.0 + k)
    assert assembler.counts["grid_reset"] == 1 and assembler.counts["late"] > before


def test_a_window_keeps_its_grid_start_across_a_restart(parts):
    """The grid phase comes back from the store: after a restart whose first message is from a node
    half a window off, windows keep the grid starts they had (which is how the store recognises a
    window assembled again from redelivered messages)."""
    layout, _, registry, first = parts
    phase = 300_000_000
    [window] = feed(layout, registry, first, 0, layout.node_ids, now=1.0, start_ns=7 * W_NS + phase)
    features = {m: s.features for m, s in layout.modalities.items()}
    again = WindowAssembler(features, 2.0, deadline_s=1.0, max_open=3, phase_ns=first.phase_ns)
    [redelivered] = feed(layout, registry, again, 0, layout.node_ids, now=1.0, start_ns=7 * W_NS + phase + 900_000_000)
    assert window.grid_start_ns == redelivered.grid_start_ns == 7 * W_NS + phase
    fresh = WindowAssembler(features, 2.0, deadline_s=1.0, max_open=3)  # without the stored phase
    [moved] = feed(layout, registry, fresh, 0, layout.node_ids, now=1.0, start_ns=7 * W_NS + phase + 900_000_000)
    assert moved.grid_start_ns != window.grid_start_ns


def early_parts(layout, **early):
    from edge_runtime.window_assembler import EarlyClose

    features = {m: s.features for m, s in layout.modalities.items()}
    return WindowAssembler(features, 2.0, deadline_s=1.0, max_open=3,
                           early=EarlyClose(min_samples=5, margin_s=0.02, **early))


def pairs(layout, nodes=None):
    return [(n, m) for n in (nodes or layout.node_ids) for m in layout.node(n).modalities]


def feed_timed(layout, registry, assembler, window, arrivals):
    """``arrivals``: ((node, modality), monotonic time) in arrival order."""
    closed = []
    for (node, modality), at in arrivals:
        closed += assembler.add(node, modality, window * W_NS, tokens_for(layout, modality, 1.0),
                                registry.snapshot(), at).closed
    return closed


def test_a_window_missing_a_lost_message_closes_once_the_learned_lag_has_passed(parts):
    """Learned: every message comes within 60 ms of its window's first. A window that lost one
    message closes 60 ms + margin after its first message, not at the 1 s deadline; and it waits
    while the missing message may still come."""
    layout, _, registry, _ = parts
    assembler = early_parts(layout)
    everything = pairs(layout)
    for k in range(6):  # complete windows, arrivals spread over 60 ms
        closed = feed_timed(layout, registry, assembler, k,
                            [(p, 10.0 * k + 0.004 * i) for i, p in enumerate(everything)])
        assert [w.reason for w in closed] == ["complete"]
    lost = everything[5]
    feed_timed(layout, registry, assembler, 6, [(p, 100.0 + 0.004 * i) for i, p in enumerate(everything) if p != lost])
    due = assembler.next_deadline_s(registry.snapshot())
    assert due == pytest.approx(100.0 + 0.02 + 0.02, abs=1e-9)  # its pair's lag quantile (20 ms) + margin
    assert assembler.expire(registry.snapshot(), 100.03) == []  # it may still come
    [window] = assembler.expire(registry.snapshot(), 100.05)
    assert window.reason == "early" and window.received == len(everything) - 1 and not window.complete
    assert assembler.counts["closed_early"] == 1


def test_early_close_waits_for_the_deadline_without_enough_samples(parts):
    layout, _, registry, _ = parts
    assembler = early_parts(layout)
    everything = pairs(layout)
    feed_timed(layout, registry, assembler, 0, [(p, 1.0) for p in everything[1:]])  # one window of history
    assert assembler.next_deadline_s(registry.snapshot()) == pytest.approx(2.0)
    assert assembler.expire(registry.snapshot(), 1.5) == []
    assert [w.reason for w in assembler.expire(registry.snapshot(), 2.0)] == ["deadline"]


def test_a_late_message_teaches_the_tail(parts):
    """Messages that came after an early close are late, and their lag is learned: the quantile
    grows, so the next windows wait long enough for them."""
    layout, _, registry, _ = parts
    assembler = early_parts(layout, quantile=0.9)
    everything = pairs(layout)
    slow = everything[3]
    for k in range(6):
        feed_timed(layout, registry, assembler, k, [(p, 10.0 * k) for p in everything])
    feed_timed(layout, registry, assembler, 6, [(p, 100.0) for p in everything if p != slow])
    [window] = assembler.expire(registry.snapshot(), 100.03)
    assert window.reason == "early"
    # The slow pair now comes 0.4 s after the others: window 7 closes early without it (late) ...
    feed_timed(layout, registry, assembler, 7, [(p, 70.0) for p in everything if p != slow])
    assert [w.reason for w in assembler.expire(registry.snapshot(), 70.1)] == ["early"]
    feed_timed(layout, registry, assembler, 7, [(slow, 70.4)])
    assert assembler.counts["late"] == 1
    # ... and from then on its windows wait for it: one late sample is above the 90 % quantile.
    feed_timed(layout, registry, assembler, 8, [(p, 80.0) for p in everything if p != slow])
    assert assembler.next_deadline_s(registry.snapshot()) == pytest.approx(80.0 + 0.4 + 0.02)
    assert assembler.expire(registry.snapshot(), 80.1) == []
    closed = feed_timed(layout, registry, assembler, 8, [(slow, 80.4)])
    assert [w.reason for w in closed] == ["complete"] and assembler.counts["late"] == 1


def test_a_node_that_sent_a_later_window_is_not_waited_for(parts):
    layout, _, registry, _ = parts
    assembler = early_parts(layout)
    everything = pairs(layout)
    for k in range(6):
        feed_timed(layout, registry, assembler, k, [(p, 10.0 * k + 0.5 * (p[0] == "n08")) for p in everything])
    # n08's messages usually come 0.5 s after the others; in window 6 they are lost, and n08's
    # window-7 message already arrived: nothing more will come for window 6 from n08.
    feed_timed(layout, registry, assembler, 6, [(p, 100.0) for p in everything if p[0] != "n08"])
    feed_timed(layout, registry, assembler, 7, [(("n08", layout.node("n08").modalities[0]), 100.01)])
    [window] = assembler.expire(registry.snapshot(), 100.03)
    assert window.window_index == 6 and window.reason == "early"


def test_no_window_closes_early_across_a_broker_outage(parts):
    """What the broker held back during an outage arrives in a burst after the reconnect, later than
    any learned lag: windows open when the link went down, or opened within a deadline after it came
    back, wait for their deadline."""
    layout, _, registry, _ = parts
    assembler = early_parts(layout)
    everything = pairs(layout)
    for k in range(6):
        feed_timed(layout, registry, assembler, k, [(p, 10.0 * k) for p in everything])
    feed_timed(layout, registry, assembler, 6, [(p, 100.0) for p in everything[:-1]])
    assembler.hold_early()  # the link goes down
    assert assembler.next_deadline_s(registry.snapshot()) == pytest.approx(101.0)
    assert assembler.expire(registry.snapshot(), 100.5) == []
    assembler.resume_early(100.6)  # back: the held-back message comes late, still in time
    closed = feed_timed(layout, registry, assembler, 6, [(everything[-1], 100.8)])
    assert [w.reason for w in closed] == ["complete"]
    feed_timed(layout, registry, assembler, 7, [(p, 101.2) for p in everything[:-1]])  # opened in the hold
    assert assembler.expire(registry.snapshot(), 101.5) == []
    assert [w.reason for w in assembler.expire(registry.snapshot(), 102.3)] == ["deadline"]
    feed_timed(layout, registry, assembler, 8, [(p, 110.0) for p in everything[:-1]])  # after it
    # The late message's 0.8 s lag is learned: window 8 waits that long for its missing pair, not 1 s.
    assert assembler.expire(registry.snapshot(), 110.5) == []
    assert [(w.window_index, w.reason) for w in assembler.expire(registry.snapshot(), 110.85)] == [(8, "early")]


def test_a_duplicate_teaches_no_lag(parts):
    """The link duplicates ~1 % of messages, the copy arriving later: learning its lag would make
    every window wait for copies nobody needs."""
    layout, _, registry, _ = parts
    assembler = early_parts(layout)
    everything = pairs(layout)
    copied = everything[1]
    for k in range(6):  # everything[0] never comes: each window closes at its deadline
        arrivals = [(p, 10.0 * k) for p in everything[1:]] + [(copied, 10.0 * k + 0.5)]
        feed_timed(layout, registry, assembler, k, arrivals)
        assembler.expire(registry.snapshot(), 10.0 * k + 1.0)
    assert assembler.counts["duplicate"] == 6
    feed_timed(layout, registry, assembler, 6, [(p, 100.0) for p in everything if p != copied])
    # Only `copied` is missing now: its learned lag is 0, not the copies' 0.5 s.
    assert assembler.next_deadline_s(registry.snapshot()) == pytest.approx(100.0 + 0.02)
