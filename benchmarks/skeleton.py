"""Walking skeleton: local Mosquitto + one sine-wave node + the decoding aggregator stub.

Proves the seams end to end: features -> quantization -> codec -> framing -> MQTT QoS 1 ->
topic parsing -> decoding, with the counts on both sides compared at the end. ``register`` adds
the ``spar-bench skeleton`` subcommand.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cli_support import DEFAULT_SITE
from edge_runtime.skeleton_ingest import IngestStub
from node_firmware_sim.mqtt_publisher import NodePublisher
from node_firmware_sim.skeleton_node import PublishedWindow, publish_sine_windows
from spar_wire.codecs import CodecSpec
from spar_wire.features import patchify
from spar_wire.message import TokenMessage
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.site_layout import SiteLayout, load_site_layout
from testbed.local_broker import LocalBroker


@dataclass
class SkeletonResult:
    published: list[PublishedWindow]
    received: list[TokenMessage]
    counts: dict[str, int]
    broker_port: int
    elapsed_s: float
    tokens_shape: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def all_delivered(self) -> bool:
        sent = {(p.modality, p.window_start_ns, p.seq) for p in self.published if p.acknowledged}
        got = {(m.modality, m.window_start_ns, m.seq) for m in self.received}
        return bool(sent) and sent == got


def run_skeleton(layout: SiteLayout, node_id: str, windows: int, codec: CodecSpec, *,
                 realtime: bool = False, print_fn: Callable[[str], None] | None = None,
                 settle_timeout_s: float = 10.0) -> SkeletonResult:
    """Start a broker, the stub and one node; publish ``windows`` windows; compare both ends."""
    started = time.monotonic()
    with LocalBroker() as broker:
        settings = MqttSettings(host=broker.host, port=broker.port)
        shapes: dict[str, tuple[int, int]] = {}

        def show(message: TokenMessage) -> None:
            tokens = patchify(message.image(), layout.modalities[message.modality].features)
            shapes[message.modality] = tokens.shape
            if print_fn:
                print_fn(_describe(message, tokens))

        with IngestStub(layout.site_id, settings, on_token=show) as stub:
            with NodePublisher(layout, node_id, settings) as node:
                published = publish_sine_windows(node, windows, codec, realtime=realtime)
            expected = sum(p.acknowledged for p in published)
            deadline = time.monotonic() + settle_timeout_s
            while stub.snapshot().get("accepted", 0) < expected and time.monotonic() < deadline:
                time.sleep(0.02)
            received = list(stub.tokens)
            counts = stub.snapshot()
        return SkeletonResult(published, received, counts, broker.port,
                              time.monotonic() - started, shapes)


def _describe(message: TokenMessage, tokens: np.ndarray) -> str:
    start = datetime.fromtimestamp(message.window_start_ns / 1e9, tz=timezone.utc)
    clock = start.strftime("%H:%M:%S.%f")[:-3]
    return (f"  <- {message.node}/{message.modality:<11} window {clock} UTC seq {message.seq:3d}  "
            f"{message.codec:<5} {len(message.payload):6d} B  tokens "
            f"{tokens.shape[0]}x{tokens.shape[1]}  mean {tokens.mean():7.1f} dB")


# --------------------------------------------------------------------------- command line
def register(subparsers: Any) -> None:
    """Add ``spar-bench skeleton`` to ``subparsers`` (``parser.add_subparsers()``)."""
    sk = subparsers.add_parser(
        "skeleton", help="walking skeleton: local Mosquitto + one sine node + decoding aggregator stub",
        description="Start a private Mosquitto on a free loopback port, one "
        "simulated node publishing sine-wave tokens, and an aggregator stub that "
        "decodes and prints what arrived; then compare sent and received counts.")
    sk.add_argument("--site", type=Path, default=DEFAULT_SITE, help="site layout TOML (default: %(default)s)")
    sk.add_argument("--node", default=None, help="node id (default: the site's first node)")
    sk.add_argument("--duration", type=float, default=10.0,
                    help="seconds of signal to publish, in real time (default: %(default)s)")
    sk.add_argument("--codec", default="webp:85", help="raw32 | raw | png | jpeg:Q | webp:Q | "
                    "webp:lossless (default: %(default)s)")
    sk.add_argument("--fast", action="store_true", help="publish as fast as possible instead of in real time")
    sk.set_defaults(func=_cmd_skeleton)


def _cmd_skeleton(args: argparse.Namespace) -> int:
    layout = load_site_layout(args.site)
    node_id = args.node or layout.node_ids[0]
    window_s = layout.window_s(layout.node(node_id).modalities)  # an unknown node fails here, by name
    windows = max(1, int(args.duration // window_s))
    print(f"walking skeleton: site {layout.site_id}, node {node_id}, {windows} window(s) of "
          f"{window_s:g} s, codec {CodecSpec.parse(args.codec).label}")
    result = run_skeleton(layout, node_id, windows, CodecSpec.parse(args.codec),
                          realtime=not args.fast, print_fn=print)
    sent = sum(p.acknowledged for p in result.published)
    print(f"broker 127.0.0.1:{result.broker_port}: node published {len(result.published)} "
          f"messages ({sent} acknowledged, {sum(p.bytes for p in result.published)} bytes); "
          f"aggregator stub counted {result.counts} in {result.elapsed_s:.1f} s")
    if not result.all_delivered:
        print("error: sent and received messages differ", file=sys.stderr)
        return 1
    print("ok: every acknowledged message arrived and decoded")
    return 0
