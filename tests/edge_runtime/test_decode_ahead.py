"""Decoding token images ahead on a thread pool: same outcome as inline, in arrival order, bounded."""

import dataclasses
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.config import AggregatorConfig
from edge_runtime.decode_ahead import DecodeAhead
from edge_runtime.errors import AggregatorError
from edge_runtime.ingest import RawMessage
from edge_runtime.service import Aggregator
from node_firmware_sim.firmware import FirmwareConfig, NodeFirmware
from node_firmware_sim.scenarios import make_scenario
from spar_wire.codecs import CodecSpec
from spar_wire.message import decode_message, encode_message
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.topics import data_topic

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "configs/sites/parking_lot.toml"
EPOCH = (time.time_ns() // (2 * 10**9) - 10) * 2 * 10**9


def test_results_come_back_in_submission_order_whatever_each_decode_takes():
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.004) for _ in range(60)]
    running, most = [0], [0]
    lock = threading.Lock()

    def decode(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(delays[i])
        with lock:
            running[0] -= 1
        return i * 10

    ahead = DecodeAhead(decode, threads=3)
    got = []
    for i in range(60):
        ahead.submit(i)
        assert ahead.pending <= ahead.limit
        got += list(ahead.ready(wait=ahead.full))
    got += list(ahead.ready(wait=True))
    while ahead.pending:
        got += list(ahead.ready(wait=True))
    ahead.close()
    assert got == [(i, i * 10) for i in range(60)]
    assert 1 < most[0] <= 3  # decoded in parallel, never more than the pool's threads


def test_one_thread_decodes_nothing_ahead_and_bad_counts_are_refused():
    calls = []
    ahead = DecodeAhead(calls.append, threads=1)
    ahead.submit("a")
    assert list(ahead.ready(wait=False)) == [("a", None)] and calls == []
    for bad in (0, 17, True, 2.0):
        with pytest.raises(ValueError, match="decode threads"):
            DecodeAhead(calls.append, threads=bad)
    with pytest.raises(AggregatorError, match="decode_threads"):
        AggregatorConfig(site=SITE, model=Path("m.json"), decode_threads=0)


def _messages(layout) -> list[RawMessage]:
    """Window 0 of every node, a corrupt image from a known node and from an unknown one, a birth."""
    window = make_scenario("sine", layout, 1).window(0)
    frames = []
    for node in layout.node_ids:
        firmware = NodeFirmware(layout, node, FirmwareConfig(codec=CodecSpec.parse("webp:85")))
        for modality in layout.modalities:
            frames.append((node, modality, firmware.encode(modality, window.signals[(node, modality)], EPOCH).frame))
    good = decode_message(frames[0][2])
    corrupt = encode_message(dataclasses.replace(good, payload=b"RIFF\x00\x00\x00\x00WEBPjunk", seq=7))
    stranger = encode_message(dataclasses.replace(good, node="n99", payload=b"junk", seq=8))
    extra = [(good.node, good.modality, corrupt), ("n99", good.modality, stranger)]
    raws = [RawMessage(data_topic(layout.site_id, n, m), f, time.monotonic(), time.time_ns()) for n, m, f in
            [*frames[:5], *extra, *frames[5:]]]
    birth = RawMessage(f"spar/v1/{layout.site_id}/n01/birth", b"{not json", time.monotonic(), time.time_ns())
    return [*raws, birth]


def test_decoded_ahead_or_inline_a_message_ends_the_same(parking_lot, model_dir, tmp_path):
    """Same counts under the same reasons (a corrupt image of an unknown node is refused as unknown,
    not as a bad payload), the same window with the same tokens."""
    outcomes = []
    for threads in (1, 2):
        config = AggregatorConfig(site=SITE, model=model_dir / "manifest.json", decode_threads=threads,
                                  database=tmp_path / f"r{threads}.sqlite3", metrics_port=None,
                                  mqtt=MqttSettings(host="127.0.0.1", port=1))
        agg = Aggregator(config)
        ahead = DecodeAhead(agg.processor.predecode, threads)
        for raw in _messages(parking_lot):
            ahead.submit(raw)
            for message, decoded in ahead.ready(wait=True):
                if threads > 1 and "/data/" in message.topic:
                    assert decoded is not None
                agg.processor.handle(message, decoded)
        ahead.close()
        window = agg.window_queue.get_nowait()
        outcomes.append((agg.processor.snapshot_counts(), window))
        agg.store.close()
        agg.registry.close()
    (inline_counts, inline_window), (ahead_counts, ahead_window) = outcomes
    assert inline_counts == ahead_counts, (inline_counts, ahead_counts)
    assert inline_counts["accepted"] == 16 and inline_counts["rejected.bad_payload"] == 1
    assert inline_counts["rejected.unknown_node"] == 1 and inline_counts["rejected.bad_birth"] == 1
    assert inline_window.complete and ahead_window.complete
    for name, value in inline_window.inputs.items():
        np.testing.assert_array_equal(value, ahead_window.inputs[name])
