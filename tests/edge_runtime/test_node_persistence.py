"""Birth bounds and restarts with field changes (issue 19): real SQLite files, and the real aggregator
with a tiny ONNX model behind a real Mosquitto on 127.0.0.1.

- A birth whose position float32 cannot hold, or that lies far outside the site, is refused and
  counted; the node keeps its last good position, so results stay finite.
- Joined and moved nodes are kept in the aggregator's database and restored before the first
  message, so the backlog that arrives before the retained births lands with the right nodes and
  positions instead of being refused as ``unknown_node``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge_runtime.config import AggregatorConfig, load_config
from edge_runtime.errors import AggregatorError
from edge_runtime.node_registry import NodeRegistry
from edge_runtime.node_store import NodeStore
from edge_runtime.result_store import SCHEMA_VERSION, ResultStore
from edge_runtime.service import Aggregator
from edge_runtime.window_assembler import WindowAssembler
from node_firmware_sim.firmware import FirmwareConfig, NodeFirmware
from node_firmware_sim.scenarios import make_scenario
from spar_wire.codecs import CodecSpec
from spar_wire.errors import WireError
from spar_wire.lifecycle import BirthMessage, ModalityInfo, parse_birth
from spar_wire.model_manifest import ModalityRequirement, ModelManifest, TensorSpec
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.site_layout import NodeSpec
from spar_wire.topics import birth_topic, data_topic

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "configs/sites/parking_lot.toml"
W_NS = 2 * 10**9
JOINED = (20.0, 15.0)  # n09 joins in the middle of the lot (the layout spans [0, 40] x [0, 30])
MOVED = (27.0, 10.0)  # n03 moves from (27, 0.5)


# ---------------------------------------------------------------------------------------------- helpers
def manifest_for(layout, **hash_overrides):
    mods = {name: ModalityRequirement(hash_overrides.get(name, spec.features.hash), spec.features.n_tokens,
                                      spec.features.token_dim)
            for name, spec in layout.modalities.items()}
    return ModelManifest(name="t", version="1", task="classification", artifact_file="m.onnx",
                         artifact_format="onnx", precision="fp32", sha256="0" * 64, position_dim=2,
                         node_range=(1, 64), modalities=mods, inputs=(),
                         outputs=(TensorSpec("logits", "float32", ("batch", 5), "class_logits"),))


def birth(layout, node, position=None, bd_seq=0, feature_hash=None, description=""):
    names = layout.node(node).modalities if node in layout.node_ids else tuple(layout.modalities)
    mods = {m: ModalityInfo(feature_hash or layout.modalities[m].features.hash, 1.0, 1) for m in names}
    return BirthMessage(site=layout.site_id, node=node, bd_seq=bd_seq,
                        position=position or layout.node(node).position, modalities=mods, description=description)


def mic_hash(layout):
    return layout.modalities["microphone"].features.hash


def with_node(layout, node_id, position):
    """The layout plus one node (what a joined node's firmware knows)."""
    return dataclasses.replace(layout, nodes=layout.nodes + (NodeSpec(node_id, position, tuple(layout.modalities)),))


def positions_of(snapshot):
    return {node: tuple(float(v) for v in snapshot.positions[i]) for i, node in enumerate(snapshot.node_ids)}


@pytest.fixture
def database(tmp_path):
    return tmp_path / "aggregator.sqlite3"


def registry_on(layout, database, manifest=None, **kw):
    return NodeRegistry(layout, manifest or manifest_for(layout), store=NodeStore(database), **kw)


# ---------------------------------------------------------------------------------------------- birth bounds
def test_a_position_float32_cannot_hold_is_refused_counted_and_the_layout_position_kept(parking_lot):
    registry = NodeRegistry(parking_lot, manifest_for(parking_lot))
    decision = registry.on_birth(birth(parking_lot, "n01", position=(1e39, 0.0)))
    assert not decision.accepted and decision.reason == "position_out_of_site"
    assert registry.counts["refused.position_out_of_site"] == 1
    snapshot = registry.snapshot()
    assert np.isfinite(snapshot.positions).all()
    assert positions_of(snapshot)["n01"] == (0.0, 0.0)
    # Its data keeps flowing at its last good position: one bad birth does not take a node out.
    assert registry.check_data("n01", "microphone", mic_hash(parking_lot)).accepted
    # A window assembled after the refused birth feeds finite positions to the model.
    features = {m: s.features for m, s in parking_lot.modalities.items()}
    assembler = WindowAssembler(features, 2.0, deadline_s=1.0, max_open=3)
    for node in parking_lot.nodes:
        for modality in node.modalities:
            cfg = parking_lot.modalities[modality].features
            closed = assembler.add(node.id, modality, 5 * W_NS, np.ones((cfg.n_tokens, cfg.token_dim), np.float32),
                                   registry.snapshot(), 0.0).closed
    (window,) = closed
    assert np.isfinite(window.inputs["positions"]).all()
    np.testing.assert_array_equal(window.inputs["positions"][0], [0.0, 0.0])


def test_a_position_50_km_away_is_refused_and_a_near_move_accepted(parking_lot):
    registry = NodeRegistry(parking_lot, manifest_for(parking_lot))
    assert registry.on_birth(birth(parking_lot, "n03", position=(50_000.0, 0.5))).reason == "position_out_of_site"
    assert positions_of(registry.snapshot())["n03"] == (27.0, 0.5)
    # An unknown node far away does not join, and its data is refused with the reason.
    refused = registry.on_birth(birth(parking_lot, "n09", position=(0.0, -50_000.0)))
    assert refused.reason == "position_out_of_site" and "n09" not in registry.snapshot().node_ids
    data = registry.check_data("n09", "microphone", mic_hash(parking_lot))
    assert data.reason == "refused_node" and "outside the site" in data.detail
    # Just outside the layout's extent (its bounding box, not its centroid) is a real move.
    assert registry.on_birth(birth(parking_lot, "n04", position=(60.0, 2.0))).accepted
    assert positions_of(registry.snapshot())["n04"] == (60.0, 2.0)
    # A known node's later bad birth leaves its last accepted position in use.
    assert not registry.on_birth(birth(parking_lot, "n04", position=(60.0, 1e12))).accepted
    assert positions_of(registry.snapshot())["n04"] == (60.0, 2.0)
    assert registry.counts["refused.position_out_of_site"] == 3


def test_the_distance_bound_is_configurable(parking_lot, tmp_path):
    strict = NodeRegistry(parking_lot, manifest_for(parking_lot), max_node_distance_m=10.0)
    assert strict.on_birth(birth(parking_lot, "n04", position=(49.0, 2.0))).accepted
    assert strict.on_birth(birth(parking_lot, "n04", position=(51.0, 2.0))).reason == "position_out_of_site"
    for bad in (0, -1.0, float("nan"), float("inf"), True, "100"):
        with pytest.raises(AggregatorError, match="max_node_distance_m"):
            AggregatorConfig(site=SITE, model=tmp_path / "m.json", max_node_distance_m=bad)
    config = tmp_path / "aggregator.toml"
    config.write_text(f'[aggregator]\nsite = "{SITE}"\nmodel = "m.json"\nmax_node_distance_m = 250\n')
    assert load_config(config).max_node_distance_m == 250
    assert AggregatorConfig(site=SITE, model=tmp_path / "m.json").max_node_distance_m == 1000.0


@pytest.mark.parametrize("position", [b"[1e999, 0]", b"[Infinity, 0]", b"[-Infinity, 0]", b"[NaN, 0]",
                                      b"[1" + b"0" * 400 + b", 0]"])
def test_parse_birth_refuses_positions_no_float_holds(position):
    payload = (b'{"site":"s","node":"n","bdSeq":0,"position":' + position + b',"modalities":{"m":'
               b'{"feature_hash":"0123456789abcdef","sample_rate_hz":1,"channels":1}}}')
    with pytest.raises(WireError) as info:
        parse_birth(payload)
    assert info.value.reason == "bad_birth" and "position" in info.value.detail


# ---------------------------------------------------------------------------------------------- persistence
def test_a_joined_node_is_known_with_its_position_after_a_restart(parking_lot, database):
    registry = registry_on(parking_lot, database)
    assert registry.on_birth(birth(parking_lot, "n09", position=JOINED, bd_seq=4, description="mid-lot")).accepted
    slot = {n.id: n for n in registry.nodes()}["n09"].node_index
    registry.close()

    restarted = registry_on(parking_lot, database)  # no birth has arrived yet
    assert restarted.check_data("n09", "microphone", mic_hash(parking_lot)).accepted  # not unknown_node
    node = {n.id: n for n in restarted.nodes()}["n09"]
    assert (node.position, node.node_index, node.bd_seq, node.description, node.from_layout, node.online) == (
        JOINED, slot, 4, "mid-lot", False, False)
    snapshot = restarted.snapshot()
    assert positions_of(snapshot)["n09"] == JOINED
    # Offline until its birth, like every node after a restart: before any birth the whole set,
    # joined node included, is what a complete window holds.
    assert ("n09", "microphone") in snapshot.expected and len(snapshot.expected) == 18
    assert restarted.counts["restored"] == 1
    # Its retained birth arrives: the same node, online, not a second join.
    assert restarted.on_birth(birth(parking_lot, "n09", position=JOINED, bd_seq=5)).accepted
    assert restarted.counts["joined"] == 0 and {n.id: n for n in restarted.nodes()}["n09"].online
    restarted.close()


def test_a_moved_layout_node_keeps_its_new_position_after_a_restart(parking_lot, database):
    registry = registry_on(parking_lot, database)
    slot = {n.id: n for n in registry.nodes()}["n03"].node_index
    assert registry.on_birth(birth(parking_lot, "n03", position=MOVED, description="traffic island")).accepted
    registry.close()

    restarted = registry_on(parking_lot, database)
    assert positions_of(restarted.snapshot())["n03"] == MOVED
    node = {n.id: n for n in restarted.nodes()}["n03"]
    assert node.from_layout and node.node_index == slot and node.description == "traffic island"
    # Moved back to its layout place, as the layout describes it: nothing is left to keep.
    assert restarted.on_birth(birth(parking_lot, "n03", description=parking_lot.node("n03").description)).accepted
    restarted.close()
    again = registry_on(parking_lot, database)
    assert positions_of(again.snapshot())["n03"] == (27.0, 0.5)
    assert again.counts["restored"] == 0
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT COUNT(*) FROM field_nodes").fetchone()[0] == 0
    again.close()


def test_stored_nodes_the_model_or_the_layout_no_longer_takes_are_not_restored(parking_lot, database, caplog):
    registry = registry_on(parking_lot, database)
    assert registry.on_birth(birth(parking_lot, "n09", position=JOINED)).accepted
    assert registry.on_birth(birth(parking_lot, "n03", position=MOVED)).accepted
    registry.close()
    upgraded = manifest_for(parking_lot, microphone="0123456789abcdef")  # new features for microphone
    with caplog.at_level(logging.WARNING, logger="edge_runtime.node_registry"):
        restarted = registry_on(parking_lot, database, manifest=upgraded)
    assert "n09" not in restarted.snapshot().node_ids
    assert positions_of(restarted.snapshot())["n03"] == (27.0, 0.5)  # the layout's, until its birth
    assert restarted.counts["not_restored"] == 2
    assert "model upgraded" in caplog.text and "n09" in caplog.text
    restarted.close()
    # A tighter bound today refuses what an older one accepted.
    tight = registry_on(parking_lot, database, max_node_distance_m=1.0)
    assert positions_of(tight.snapshot())["n03"] == MOVED  # within the lot
    tight.close()
    registry = registry_on(parking_lot, database)
    assert registry.on_birth(birth(parking_lot, "n10", position=(45.0, 15.0))).accepted  # 5 m outside
    registry.close()
    tight = registry_on(parking_lot, database, max_node_distance_m=1.0)
    assert "n10" not in tight.snapshot().node_ids and "n09" in tight.snapshot().node_ids
    tight.close()


def test_a_joined_node_refused_later_is_forgotten(parking_lot, database):
    registry = registry_on(parking_lot, database)
    assert registry.on_birth(birth(parking_lot, "n09", position=JOINED)).accepted
    assert registry.on_birth(birth(parking_lot, "n09", position=JOINED, feature_hash="0123456789abcdef")
                             ).reason == "feature_hash_mismatch"
    registry.close()
    assert "n09" not in registry_on(parking_lot, database).snapshot().node_ids


def test_a_failed_write_is_counted_and_never_raises(parking_lot, database):
    registry = NodeRegistry(parking_lot, manifest_for(parking_lot), store=NodeStore(database, busy_timeout_s=0.05))
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: SQLite says "database is locked"
    try:
        assert registry.on_birth(birth(parking_lot, "n09", position=JOINED)).accepted
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert registry.counts["node_store_failed"] == 1
    assert registry.check_data("n09", "microphone", mic_hash(parking_lot)).accepted  # memory is right
    assert registry.on_birth(birth(parking_lot, "n09", position=JOINED, bd_seq=1)).accepted  # the next one lands
    registry.close()
    assert registry.on_birth(birth(parking_lot, "n11", position=JOINED)).accepted  # closed store: counted too
    assert registry.counts["node_store_failed"] == 2
    assert "n09" in registry_on(parking_lot, database).snapshot().node_ids


def test_the_node_table_shares_the_result_database_without_touching_it(parking_lot, database):
    store = NodeStore(database)  # first: the result store still migrates the file afterwards
    results = ResultStore(database)
    registry = NodeRegistry(parking_lot, manifest_for(parking_lot), store=store)
    assert registry.on_birth(birth(parking_lot, "n09", position=JOINED)).accepted
    assert results.store([{"site": "parking_lot", "window_start_ns": 0, "nodes_present": 1}]) == 1
    registry.close()
    results.close()
    with sqlite3.connect(database) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(ResultStore(database, readonly=True).query()) == 1
    with pytest.raises(AggregatorError, match="node store"):
        bad = database.parent / "not_a_db.sqlite3"
        bad.write_bytes(b"not a database" * 100)
        NodeStore(bad)


# ---------------------------------------------------------------------------------------------- the aggregator
def aggregator_config(broker, model_dir, tmp_path, **kw):
    return AggregatorConfig(site=SITE, model=model_dir / "manifest.json", database=tmp_path / "results.sqlite3",
                            metrics_port=None, deadline_fraction=0.5,
                            mqtt=MqttSettings(host=broker.host, port=broker.port), **kw)


class Publisher:
    """A plain MQTT client publishing QoS 1 (retained births, token messages without any birth)."""

    def __init__(self, port):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-publisher", protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic, payload, retain=False):
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def windows(self, layout, starts_ns, seed=1):
        """Every node's token messages for windows starting at ``starts_ns``."""
        firmware = {node: NodeFirmware(layout, node, FirmwareConfig(codec=CodecSpec.parse("png")))
                    for node in layout.node_ids}
        scenario = make_scenario("sine", layout, seed)
        for k, start_ns in enumerate(starts_ns):
            signals = scenario.window(k).signals
            for node in layout.nodes:
                for modality in node.modalities:
                    frame = firmware[node.id].encode(modality, signals[(node.id, modality)], start_ns)
                    self.publish(data_topic(layout.site_id, node.id, modality), frame.frame)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def past_windows(count, ago=100):
    first = (time.time_ns() // W_NS - ago) * W_NS
    return [first + k * W_NS for k in range(count)]


@pytest.mark.mosquitto
def test_a_poisoned_retained_birth_leaves_every_result_finite(mosquitto, parking_lot, model_dir, tmp_path):
    publisher = Publisher(mosquitto.port)
    starts = past_windows(2)
    with Aggregator(aggregator_config(mosquitto, model_dir, tmp_path)) as agg:
        publisher.publish(birth_topic("parking_lot", "n01"), birth(parking_lot, "n01", position=(1e39, 0.0)).to_json(),
                          retain=True)
        assert wait_for(lambda: agg.processor.snapshot_counts().get("refused.position_out_of_site", 0) == 1
                        or agg.processor.snapshot_counts().get("birth", 0) == 1)
        publisher.windows(parking_lot, starts)
        assert wait_for(lambda: agg.worker.snapshot_counts().get("results", 0) == 2)
        counts = agg.processor.snapshot_counts()
    publisher.close()
    assert counts.get("refused.position_out_of_site") == 1 and counts["accepted"] == 32
    stored = ResultStore(tmp_path / "results.sqlite3", readonly=True).query(newest_first=False)
    assert [r["window_start_ns"] for r in stored] == starts
    for result in stored:
        assert result["complete"] and np.isfinite(result["outputs"]["logits"]).all()
        assert np.isfinite(result["positions"]).all()  # on the old code n01 was at inf
        assert result["positions"][result["nodes"].index("n01")] == [0.0, 0.0]


@pytest.mark.mosquitto
def test_backlog_of_joined_and_moved_nodes_after_a_restart(mosquitto, parking_lot, model_dir, tmp_path):
    """The aggregator learns a joined n09 and a moved n03 from their births and stops. While it is
    away every node, n09 included, sends a window (no new births: the nodes stayed connected). After
    the restart the broker hands that backlog over before the retained births: it is assembled with
    n09 and n03's new position, not refused as unknown_node."""
    config = aggregator_config(mosquitto, model_dir, tmp_path)
    publisher = Publisher(mosquitto.port)
    with Aggregator(config) as agg:
        publisher.publish(birth_topic("parking_lot", "n09"),
                          birth(parking_lot, "n09", position=JOINED, bd_seq=1).to_json(), retain=True)
        publisher.publish(birth_topic("parking_lot", "n03"),
                          birth(parking_lot, "n03", position=MOVED, bd_seq=1).to_json(), retain=True)
        assert wait_for(lambda: agg.processor.snapshot_counts().get("birth", 0) == 2)
    field = with_node(parking_lot, "n09", JOINED)
    (start,) = past_windows(1)
    publisher.windows(field, [start])  # queued by the broker for the aggregator's persistent session
    with Aggregator(config) as agg:
        assert wait_for(lambda: agg.worker.snapshot_counts().get("results", 0) == 1)
        # The retained births come after the backlog; wait for them so the counts are final.
        assert wait_for(lambda: agg.processor.snapshot_counts().get("birth", 0) == 2)
        counts = agg.processor.snapshot_counts()
    publisher.close()
    assert "rejected.unknown_node" not in counts and counts["accepted"] == 18
    (result,) = ResultStore(tmp_path / "results.sqlite3", readonly=True).query()
    assert result["window_start_ns"] == start and result["complete"] and result["nodes_present"] == 9
    positions = dict(zip(result["nodes"], result["positions"], strict=True))
    assert positions["n09"] == list(JOINED) and positions["n03"] == list(MOVED)
    assert json.dumps(result["outputs"]) and np.isfinite(result["outputs"]["logits"]).all()
