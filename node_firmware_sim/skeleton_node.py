"""Walking-skeleton node: sine-wave samples through the real feature, codec and MQTT path."""

from __future__ import annotations

import time
from dataclasses import dataclass

from node_firmware_sim.mqtt_publisher import NodePublisher
from node_firmware_sim.sine_source import sine_window
from spar_wire.codecs import CodecSpec
from spar_wire.features import compute_token_image
from spar_wire.message import encode_message, make_message


@dataclass
class PublishedWindow:
    modality: str
    window_start_ns: int
    seq: int
    bytes: int
    acknowledged: bool  # PUBACK received within the timeout


def publish_sine_windows(publisher: NodePublisher, windows: int, codec: CodecSpec, *,
                         start_ns: int | None = None, realtime: bool = False,
                         ack_timeout_s: float = 5.0) -> list[PublishedWindow]:
    """Publish ``windows`` consecutive windows of every modality of the node.

    Window k of a modality starts at ``start_ns + k * window length`` (``start_ns`` defaults to
    now); seq counts messages of the node across modalities. With ``realtime`` a window is sent
    only once its end has passed on the wall clock, as a sampling node would. Waits for each
    PUBACK (QoS 1) before returning.
    """
    layout, node = publisher.layout, publisher.node
    start_ns = time.time_ns() if start_ns is None else start_ns
    pending, seq = [], 0
    longest_s = max(layout.window_s((m,)) for m in node.modalities)
    for k in range(windows):
        if realtime:
            _sleep_until_ns(start_ns + int(round((k + 1) * longest_s * 1e9)))
        for name in node.modalities:
            cfg = layout.modalities[name].features
            window_ns = start_ns + int(round(k * cfg.window_s * 1e9))
            samples = sine_window(cfg, node.id, start_s=window_ns / 1e9)
            msg = make_message(compute_token_image(samples, cfg), cfg, codec, site=layout.site_id,
                               node=node.id, modality=name, window_start_ns=window_ns, seq=seq)
            frame = encode_message(msg)
            pending.append((PublishedWindow(name, window_ns, seq, len(frame), False),
                            publisher.publish_token(name, frame)))
            seq += 1
    deadline = time.monotonic() + ack_timeout_s
    for record, info in pending:
        # Polled: paho's wait_for_publish raises at once for a message it resends after a reconnect.
        outcome = publisher.outcome(info)
        while outcome == "pending" and time.monotonic() < deadline:
            time.sleep(0.01)
            outcome = publisher.outcome(info)
        record.acknowledged = outcome == "acked"
    return [record for record, _ in pending]


def _sleep_until_ns(deadline_ns: int) -> None:
    remaining = (deadline_ns - time.time_ns()) / 1e9
    if remaining > 0:
        time.sleep(remaining)
