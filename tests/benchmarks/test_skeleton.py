"""The walking skeleton through a real Mosquitto on a loopback port."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from benchmarks.skeleton import run_skeleton
from edge_runtime.skeleton_ingest import IngestStub
from node_firmware_sim.mqtt_publisher import NodePublisher
from node_firmware_sim.sine_source import node_tone_hz, sine_window
from node_firmware_sim.skeleton_node import publish_sine_windows
from spar_wire.codecs import CodecSpec
from spar_wire.features import compute_token_image
from spar_wire.mqtt_settings import MqttSettings

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.mosquitto


def wait_for(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_one_message_passes_through_the_skeleton(parking_lot):
    result = run_skeleton(parking_lot, "n03", windows=2, codec=CodecSpec("webp", 85))
    assert len(result.published) == 4  # 2 windows x (microphone, geophone)
    assert all(p.acknowledged for p in result.published)
    assert result.all_delivered
    assert result.counts["accepted"] == 4 and result.counts["birth"] == 1
    assert result.tokens_shape == {"microphone": (32, 128), "geophone": (16, 32)}


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_tokens_arrive_intact(mosquitto, parking_lot, protocol):
    settings = MqttSettings(host=mosquitto.host, port=mosquitto.port, protocol=protocol)
    with IngestStub(parking_lot.site_id, settings) as stub:
        with NodePublisher(parking_lot, "n05", settings) as node:
            published = publish_sine_windows(node, 2, CodecSpec("png"), start_ns=10**18)
        assert wait_for(lambda: stub.snapshot().get("accepted", 0) == len(published))
        birth = stub.births["n05"]
    assert birth.position == parking_lot.node("n05").position
    assert birth.modalities["microphone"].feature_hash == parking_lot.feature_hashes()["microphone"]
    # What arrived is what the node computed, to within the uint8 quantization step.
    cfg = parking_lot.modalities["geophone"].features
    first = next(m for m in stub.tokens if m.modality == "geophone" and m.window_start_ns == 10**18)
    expected = compute_token_image(sine_window(cfg, "n05", start_s=1e9), cfg)
    assert np.abs(first.image() - expected).max() <= first.scale / 2 + 1e-3
    # The node's own tone is where the energy is.
    lo, _ = cfg.stft_bin_range
    peak_hz = (first.image().mean(axis=1).argmax() + lo) * cfg.sample_rate_hz / cfg.n_fft
    assert abs(peak_hz - node_tone_hz("n05", cfg)) <= cfg.sample_rate_hz / cfg.n_fft


def test_hostile_input_is_counted_not_fatal(mosquitto, parking_lot):
    settings = MqttSettings(host=mosquitto.host, port=mosquitto.port)
    with IngestStub(parking_lot.site_id, settings) as stub:
        attacker = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        attacker.connect(mosquitto.host, mosquitto.port)
        attacker.loop_start()
        site = parking_lot.site_id
        junk = [
            (f"spar/v1/{site}/n01/data/microphone", b"garbage"),
            (f"spar/v1/{site}/n01/data/microphone", b"SPAR\x01" + b"\x00" * 60),
            (f"spar/v1/{site}/n01/birth", b"{not json"),
            (f"spar/v1/{site}/n01/state", b'{"state": "sleepy", "bdSeq": 1}'),
            (f"spar/v1/{site}/n01/bogus", b"x"),
            (f"spar/v1/{site}/nœud/birth", b"x"),
        ]
        for topic, payload in junk:
            attacker.publish(topic, payload, qos=1).wait_for_publish(5)
        rejected = lambda: sum(v for k, v in stub.snapshot().items() if k.startswith("rejected."))  # noqa: E731
        assert wait_for(lambda: rejected() == len(junk))
        # A node whose message claims another node's identity is refused.
        with NodePublisher(parking_lot, "n02", settings) as node:
            frame = _frame_for(parking_lot, "n02")
            attacker.publish(f"spar/v1/{site}/n07/data/geophone", frame, qos=1).wait_for_publish(5)
            publish_sine_windows(node, 1, CodecSpec("jpeg", 80), start_ns=0)
        attacker.disconnect()
        attacker.loop_stop()
        assert wait_for(lambda: stub.snapshot().get("accepted", 0) == 2)
        counts = stub.snapshot()
    assert counts["rejected.topic_mismatch"] == 1
    assert counts["rejected.bad_topic"] == 2
    assert counts["rejected.bad_birth"] == 1 and counts["rejected.bad_state"] == 1
    assert counts["rejected.truncated"] == 1 and counts["rejected.trailing_bytes"] == 1
    assert "rejected.internal_error" not in counts


def _frame_for(layout, node_id):
    from spar_wire.message import encode_message, make_message

    cfg = layout.modalities["geophone"].features
    image = compute_token_image(sine_window(cfg, node_id, 0.0), cfg)
    return encode_message(make_message(image, cfg, CodecSpec("png"), site=layout.site_id,
                                       node=node_id, modality="geophone", window_start_ns=0, seq=0))


def test_node_reports_an_unreachable_broker(parking_lot):
    from node_firmware_sim.errors import NodeError
    from testbed.local_broker import free_loopback_port

    settings = MqttSettings(port=free_loopback_port())
    with pytest.raises(NodeError, match="cannot connect"):
        NodePublisher(parking_lot, "n01", settings).start(timeout_s=1.5)


@pytest.mark.slow
def test_demo_command_runs_the_skeleton():
    """`make demo` runs this command; here without real-time pacing."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.cli", "skeleton", "--duration", "4", "--fast",
         "--codec", "jpeg:80"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok: every acknowledged message arrived and decoded" in result.stdout
    assert result.stdout.count("<- n01/") == 4


def test_node_and_aggregator_commands_talk_through_a_broker(mosquitto):
    """The two stand-alone commands, as two processes, as a user would run them."""
    port = str(mosquitto.port)
    site = "configs/sites/parking_lot.toml"
    aggregator = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "skeleton", "--site", site, "--port", port,
         "--duration", "20"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # let it subscribe; the node's data is not retained
        node = subprocess.run(
            [sys.executable, "-m", "node_firmware_sim.cli", "skeleton", "--site", site, "--port", port,
             "--node", "n04", "--windows", "2", "--fast", "--codec", "webp:lossless"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
        assert node.returncode == 0, node.stderr
        assert "4 messages, 4 acknowledged" in node.stdout
        time.sleep(1.0)
    finally:
        aggregator.terminate()
        out, err = aggregator.communicate(timeout=20)
    assert aggregator.returncode == 0, err
    assert out.count("n04/microphone") == 2 and out.count("n04/geophone") == 2
    assert "'accepted': 4" in out
