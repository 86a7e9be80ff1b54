"""Model-to-site binding: a site's nodes take the structural slots the model learned for them (by id,
else by nearest trained position), the aggregator logs it at start, warns, or with strict_layout refuses."""

import dataclasses
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.config import AggregatorConfig, load_config
from edge_runtime.errors import AggregatorError
from edge_runtime.inference import load_backend
from edge_runtime.node_registry import NodeRegistry
from edge_runtime.result_store import ResultStore
from edge_runtime.service import Aggregator
from edge_runtime.site_binding import bind_site
from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field
from node_firmware_sim.firmware import FirmwareConfig, NodeFirmware
from node_firmware_sim.scenarios import make_scenario
from spar_wire.codecs import CodecSpec
from spar_wire.features import patchify
from spar_wire.lifecycle import BirthMessage, ModalityInfo
from spar_wire.message import decode_message
from spar_wire.model_manifest import TrainedNode, TrainingSite, load_manifest, present_input, tokens_input
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.site_layout import load_site_layout
from testbed.tiny_onnx_model import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
SITES = REPO / "configs/sites"
LOGGER = "edge_runtime.site_binding"
# parking_lot_east's six nodes, each bound to the nearest parking_lot node (worked out by hand:
# e01 (6, 7) is 8.9 m from n02 (13, 1.5) and 9.2 m from n01 (0, 0), ...). Layout order would give 0..5.
EAST_SLOTS = {"e01": 1, "e02": 2, "e03": 3, "e04": 5, "e05": 6, "e06": 7}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, parking_lot):
    """The tiny ONNX model twice: ``manifest.json`` records parking_lot as its training site,
    ``legacy.manifest.json`` is the same model as manifests were written before training_site."""
    out = tmp_path_factory.mktemp("model")
    legacy = build_tiny_model(parking_lot, out, max_nodes=8)
    legacy.write(out / "legacy.manifest.json")
    site = TrainingSite("parking_lot", tuple(TrainedNode(n.id, n.position) for n in parking_lot.nodes))
    dataclasses.replace(legacy, training_site=site).write(out / "manifest.json")
    return out


def site_toml(path, nodes, site_id="parking_lot"):
    """A site like parking_lot.toml with ``nodes`` [(id, (x, y))] in this order."""
    header = (SITES / "parking_lot.toml").read_text().split("[[nodes]]")[0]
    header = header.replace('id = "parking_lot"', f'id = "{site_id}"')
    blocks = [f'[[nodes]]\nid = "{i}"\nposition = [{x}, {y}]\nmodalities = ["microphone", "geophone"]\n'
              for i, (x, y) in nodes]
    path.write_text(header + "\n".join(blocks))
    return path


def reversed_site(tmp_path, parking_lot):
    """parking_lot's nodes where they are, listed n08 first: node i of this layout is not slot i."""
    return site_toml(tmp_path / "reversed.toml", [(n.id, n.position) for n in reversed(parking_lot.nodes)])


def config_for(tmp_path, site, model, **kw):
    return AggregatorConfig(site=site, model=model, database=tmp_path / "results.sqlite3", metrics_port=0,
                            mqtt=MqttSettings(host="127.0.0.1", port=kw.pop("port", 1)), **kw)


def close(agg):
    """Release what Aggregator.__init__ opened (no broker connection is made before start())."""
    agg.store.close()
    getattr(agg.backend, "close", lambda: None)()


def binding_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- binding
def test_permuted_ids_take_their_trained_slots_not_layout_order(tmp_path, parking_lot, model_dir):
    layout = load_site_layout(reversed_site(tmp_path, parking_lot))
    manifest = load_manifest(model_dir / "manifest.json")
    binding = bind_site(layout, manifest)
    assert binding.exact and [a.how for a in binding.assignments] == ["id"] * 8
    snapshot = NodeRegistry(layout, manifest).snapshot()
    slots = dict(zip(snapshot.node_ids, snapshot.node_index.tolist(), strict=True))
    assert slots == {f"n0{i + 1}": i for i in range(8)}  # layout order would have given n08 slot 0


def test_other_site_maps_by_nearest_trained_position_and_warns(tmp_path, model_dir, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    east = SITES / "parking_lot_east.toml"
    agg = Aggregator(config_for(tmp_path, east, model_dir / "manifest.json"))
    try:
        assert agg.site_binding.slots == EAST_SLOTS and not agg.site_binding.exact
        snapshot = agg.registry.snapshot()
        assert dict(zip(snapshot.node_ids, snapshot.node_index.tolist(), strict=True)) == EAST_SLOTS
        # A node joining in the field takes the slot of the nearest *trained* node: (38, 28) is next to n05
        # (slot 4); among this site's nodes it is nearest e04, whose slot would be 5.
        east_layout = agg.layout
        mods = {m: ModalityInfo(s.features.hash, 1.0, 1) for m, s in east_layout.modalities.items()}
        assert agg.registry.on_birth(BirthMessage("parking_lot_east", "e07", 0, (38.0, 28.0), mods)).accepted
        assert agg.registry.snapshot().node_index[-1] == 4
    finally:
        close(agg)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "  e01 -> slot 1 (n02), by nearest trained position, 8.90 m from the trained position" in lines
    assert any(line.startswith("  e06 -> slot 7 (n08), by nearest") for line in lines)
    [warning] = binding_warnings(caplog)
    assert "site parking_lot_east is not the site model tiny-spar was trained on (parking_lot)" in warning
    assert "e01 -> n02 (8.9 m)" in warning and "--strict-layout" in warning


def test_strict_layout_refuses_another_site_naming_the_mismatches(tmp_path, parking_lot, model_dir):
    with pytest.raises(AggregatorError, match=r"strict_layout: site parking_lot_east .* is not the site model .*"
                       r"not trained on, bound to the nearest trained node's slot: e01 -> n02 \(8.9 m\), "
                       r"e02 -> n03"):
        Aggregator(config_for(tmp_path, SITES / "parking_lot_east.toml", model_dir / "manifest.json",
                              strict_layout=True))
    # The training ids, but n03 5 m from where the model learned it: moved, refused too.
    moved = site_toml(tmp_path / "moved.toml", [(n.id, (n.position[0], n.position[1] + (5.0 if n.id == "n03"
                                                                                         else 0.0)))
                                                for n in parking_lot.nodes])
    with pytest.raises(AggregatorError, match=r"more than 1 m from their trained position: n03 \(5.0 m\)"):
        Aggregator(config_for(tmp_path, moved, model_dir / "manifest.json", strict_layout=True))
    # The training site itself (and the same nodes in another order) starts, strict or not.
    for site in (SITES / "parking_lot.toml", reversed_site(tmp_path, parking_lot)):
        close(Aggregator(config_for(tmp_path, site, model_dir / "manifest.json", strict_layout=True)))


def test_strict_layout_from_the_cli_flag_and_the_config_file(tmp_path, model_dir):
    toml = tmp_path / "aggregator.toml"
    toml.write_text(f'[aggregator]\nsite = "{SITES / "parking_lot_east.toml"}"\n'
                    f'model = "{model_dir / "manifest.json"}"\ndatabase = "{tmp_path / "r.sqlite3"}"\n'
                    'metrics_port = 0\n[mqtt]\nhost = "127.0.0.1"\nport = 1\n')
    run = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "run", "--config", str(toml), "--strict-layout"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "spar-aggregator run: error: strict_layout: site parking_lot_east" in run.stderr
    assert "e01 -> n02" in run.stderr
    assert load_config(toml).strict_layout is False
    toml.write_text(toml.read_text().replace("metrics_port = 0\n", "metrics_port = 0\nstrict_layout = true\n"))
    assert load_config(toml).strict_layout is True


def test_manifest_without_training_site_keeps_layout_order_with_one_warning(tmp_path, parking_lot, model_dir,
                                                                            caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    site = reversed_site(tmp_path, parking_lot)
    agg = Aggregator(config_for(tmp_path, site, model_dir / "legacy.manifest.json"))
    try:
        assert agg.manifest.training_site is None and not agg.site_binding.known
        snapshot = agg.registry.snapshot()
        assert snapshot.node_ids[0] == "n08" and snapshot.node_index.tolist() == list(range(8))  # as before
    finally:
        close(agg)
    [warning] = binding_warnings(caplog)
    assert "does not record its training site" in warning and "layout order" in warning
    with pytest.raises(AggregatorError, match="strict_layout: .*does not record its training site"):
        Aggregator(config_for(tmp_path, site, model_dir / "legacy.manifest.json", strict_layout=True))


# --------------------------------------------------------------------------- end to end
def node_inputs(layout, present, slots, window_index, seed=1):
    """The placement tensor of one window, built here, of the nodes in ``present`` {modality: [node ids]}
    fed with ``slots``; the tiny model masks absent nodes out, so the aggregator's tensor of all eight
    nodes gives the same outputs."""
    window = make_scenario("sine", layout, seed).window(window_index)
    nodes = sorted(set().union(*present.values()))
    inputs = {"positions": np.array([layout.node(n).position for n in nodes], np.float32)[None],
              "node_index": np.array([slots[n] for n in nodes], np.int64)[None]}
    for modality, spec in layout.modalities.items():
        tokens = np.zeros((1, len(nodes), spec.features.n_tokens, spec.features.token_dim), np.float32)
        for i, node in enumerate(nodes):
            if node in present.get(modality, ()):
                firmware = NodeFirmware(layout, node, FirmwareConfig(codec=CodecSpec.parse("png")))
                frame = firmware.encode(modality, window.signals[(node, modality)], 0).frame
                tokens[0, i] = patchify(decode_message(frame).image(), spec.features)
        inputs[tokens_input(modality)] = tokens
        inputs[present_input(modality)] = np.array([[n in present.get(modality, ()) for n in nodes]])
    return inputs


@pytest.mark.mosquitto
@pytest.mark.parametrize("manifest_name, binding", [("manifest.json", "id"), ("legacy.manifest.json", "layout")])
def test_permuted_site_runs_on_the_slots_of_its_binding(mosquitto, tmp_path, parking_lot, model_dir, manifest_name,
                                                        binding):
    """Three nodes of the reversed layout send through Mosquitto; ONNX Runtime's results are those of the
    trained slots (0, 1, 2) with training_site, of the layout order (7, 6, 5) without it."""
    site = reversed_site(tmp_path, parking_lot)
    layout = load_site_layout(site)
    nodes = ("n01", "n02", "n03")
    # Windows of now (on the 2 s grid), so no clock check takes the nodes' stamps for a wrong clock.
    start_ns = time.time_ns() // (2 * 10**9) * (2 * 10**9)
    agg = Aggregator(config_for(tmp_path, site, model_dir / manifest_name, port=mosquitto.port,
                                deadline_fraction=0.5))
    with agg:
        run_field(FieldConfig(layout=layout, source=SourceSpec("sine", 1), duration_s=4.0, node_ids=nodes,
                              firmware=FirmwareConfig(codec=CodecSpec.parse("png")),
                              mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port), start_epoch_ns=start_ns))
        deadline = time.monotonic() + 15
        while agg.worker.snapshot_counts().get("results", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    stored = ResultStore(tmp_path / "results.sqlite3", readonly=True).query(newest_first=False)
    assert len(stored) == 2
    by_id = {"n01": 0, "n02": 1, "n03": 2}
    by_layout = {n: layout.node_ids.index(n) for n in nodes}  # 7, 6, 5
    want, other = (by_id, by_layout) if binding == "id" else (by_layout, by_id)
    backend = load_backend(agg.manifest, "onnxruntime")  # the aggregator's own closed with it
    for result in stored:
        # A node's birth may reach the broker after another node's first window (separate clients):
        # compare with the nodes each window really held.
        present = result["present"]
        k = (result["window_start_ns"] - start_ns) // (2 * 10**9)
        expected = backend.run(node_inputs(layout, present, want, k))["logits"][0]
        wrong = backend.run(node_inputs(layout, present, other, k))["logits"][0]
        np.testing.assert_allclose(result["outputs"]["logits"], expected, rtol=1e-5, atol=1e-6)
        assert np.abs(np.asarray(result["outputs"]["logits"]) - wrong).max() > 1e-4  # the slots matter
    assert stored[-1]["nodes_present"] == 3
