import numpy as np
import pytest

from node_firmware_sim.delivery_scheduler import DeliveryScheduler
from node_firmware_sim.errors import NodeError
from node_firmware_sim.firmware import SEQ_MODULO, FirmwareConfig, NodeFirmware
from node_firmware_sim.link_model import LinkConfig, LinkModel, Outage
from node_firmware_sim.sine_source import sine_window
from node_firmware_sim.uplink import NodeUplink
from spar_wire.codecs import CodecSpec
from spar_wire.features import compute_token_image
from spar_wire.message import decode_message


def geophone_samples(layout, node="n01", start_s=0.0):
    return sine_window(layout.modalities["geophone"].features, node, start_s)


def test_encode_is_the_spar_wire_pipeline(parking_lot):
    firmware = NodeFirmware(parking_lot, "n02", FirmwareConfig(codec=CodecSpec("png")))
    samples = geophone_samples(parking_lot, "n02")
    frame = firmware.encode("geophone", samples, 5 * 10**18)
    msg = decode_message(frame.frame)
    cfg = parking_lot.modalities["geophone"].features
    assert (msg.site, msg.node, msg.modality, msg.seq) == ("parking_lot", "n02", "geophone", 0)
    assert msg.feature_hash == cfg.hash
    expected = compute_token_image(samples, cfg)
    kept = expected >= msg.offset  # below the 80 dB dynamic range the image is clipped
    assert np.abs(msg.image() - expected)[kept].max() <= msg.scale / 2 + 1e-4
    assert np.allclose(msg.image()[~kept], msg.offset)


def test_sequence_counts_across_modalities_and_wraps(parking_lot):
    firmware = NodeFirmware(parking_lot, "n01")
    seqs = [firmware.encode(m, sine_window(parking_lot.modalities[m].features, "n01", 0.0), 0).seq
            for m in ("microphone", "geophone", "geophone")]
    assert seqs == [0, 1, 2]
    firmware.seq = SEQ_MODULO - 1
    assert firmware.encode("geophone", geophone_samples(parking_lot), 0).seq == SEQ_MODULO - 1
    assert firmware.seq == 0


def test_clock_offset_stamps_the_window_start(parking_lot):
    firmware = NodeFirmware(parking_lot, "n01", FirmwareConfig(clock_offset_s=-0.25))
    frame = firmware.encode("geophone", geophone_samples(parking_lot), 10**18)
    assert frame.window_start_ns == 10**18 - 250_000_000
    assert decode_message(frame.frame).window_start_ns == frame.window_start_ns


def test_unknown_modality(parking_lot):
    with pytest.raises(NodeError, match="lidar"):
        NodeFirmware(parking_lot, "n01").encode("lidar", np.zeros((1, 10)), 0)


class Recorder:
    def __init__(self):
        self.published = []

    def __call__(self, frame):
        self.published.append(frame.seq)


def make_uplink(parking_lot, config, buffer_size=4, connected=lambda: True):
    recorder = Recorder()
    scheduler = DeliveryScheduler(realtime=False)
    uplink = NodeUplink("n01", LinkModel(config, 0), scheduler, recorder, buffer_size=buffer_size,
                        connected=connected)
    return uplink, scheduler, recorder


def test_outage_buffer_keeps_the_newest_and_replays_in_order(parking_lot):
    config = LinkConfig(outages=(Outage("n01", 1.0, 10.0),))
    uplink, scheduler, recorder = make_uplink(parking_lot, config, buffer_size=4)
    firmware = NodeFirmware(parking_lot, "n01")
    samples = geophone_samples(parking_lot)
    for t in range(12):  # t = 0 up, 1..10 down (10 frames into a buffer of 4), 11 up again
        uplink.send(firmware.encode("geophone", samples, 0), float(t))
        scheduler.run_due(float(t))
    assert recorder.published == [0, 7, 8, 9, 10, 11]  # frames 1-6 pushed out, oldest first
    assert uplink.counters.buffered == 10 and uplink.counters.buffer_dropped == 6
    assert not uplink.buffer


def test_disconnected_mqtt_session_buffers_too(parking_lot):
    state = {"up": False}
    uplink, scheduler, recorder = make_uplink(parking_lot, LinkConfig(), connected=lambda: state["up"])
    firmware = NodeFirmware(parking_lot, "n01")
    for t in range(3):
        uplink.send(firmware.encode("geophone", geophone_samples(parking_lot), 0), float(t))
    assert recorder.published == [] and len(uplink.buffer) == 3
    state["up"] = True
    assert uplink.flush(3.0) == 3
    scheduler.run_due(3.0)
    assert recorder.published == [0, 1, 2]


def test_zero_buffer_drops_everything_during_an_outage(parking_lot):
    config = LinkConfig(outages=(Outage("*", 0.0, 5.0),))
    uplink, scheduler, recorder = make_uplink(parking_lot, config, buffer_size=0)
    uplink.send(NodeFirmware(parking_lot, "n01").encode("geophone", geophone_samples(parking_lot), 0), 1.0)
    assert uplink.counters.buffer_dropped == 1 and not uplink.buffer


def test_scheduler_publishes_in_delivery_order(parking_lot):
    scheduler = DeliveryScheduler(realtime=False)
    order = []
    for t in (0.3, 0.1, 0.2, 5.0):
        scheduler.schedule(t, lambda t=t: order.append(t))
    assert scheduler.run_due(1.0) == 3 and order == [0.1, 0.2, 0.3]
    scheduler.drain()
    assert order[-1] == 5.0


def test_realtime_scheduler_waits_for_the_wall_clock():
    import time

    scheduler = DeliveryScheduler(realtime=True)
    stamps = []
    start = time.monotonic()
    scheduler.schedule(0.2, lambda: stamps.append(time.monotonic() - start))
    scheduler.schedule(0.05, lambda: stamps.append(time.monotonic() - start))
    scheduler.schedule(0.1, lambda: 1 / 0)  # a failing action is counted, not fatal
    scheduler.drain(timeout_s=5)
    assert len(stamps) == 2 and stamps[0] < stamps[1]
    assert stamps[0] >= 0.04 and stamps[1] >= 0.19
    assert scheduler.failures == 1


class FakeInfo:
    """Stands in for paho's MQTTMessageInfo: acknowledged or not."""

    rc = 0  # MQTT_ERR_SUCCESS: the publish call itself went through

    def __init__(self, acked):
        self.acked = acked

    def is_published(self):
        return self.acked

    def wait_for_publish(self, timeout=None):
        pass


def test_acknowledged_publishes_are_counted_and_forgotten(parking_lot):
    infos = iter([FakeInfo(True), FakeInfo(False), FakeInfo(True)])
    scheduler = DeliveryScheduler(realtime=False)
    uplink = NodeUplink("n01", LinkModel(LinkConfig(), 0), scheduler, lambda frame: next(infos), buffer_size=4,
                        record_acks=True)
    firmware = NodeFirmware(parking_lot, "n01")
    for t in range(3):
        uplink.send(firmware.encode("geophone", geophone_samples(parking_lot), t * 10**9), float(t))
    scheduler.run_due(10.0)
    assert uplink.collect_acks() == 1
    assert uplink.counters.acked == 2 and len(uplink.counters.pending) == 1
    assert uplink.counters.published == 3
    # Fault trials need to know which frames were acknowledged, not just how many.
    assert uplink.counters.acked_frames == [("geophone", 0), ("geophone", 2 * 10**9)]
