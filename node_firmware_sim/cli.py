"""``spar-node``: run a simulated sensor node."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from node_firmware_sim.errors import NodeError
from spar_wire.codecs import CodecSpec
from spar_wire.errors import WireError
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.site_layout import load_site_layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spar-node", description="Simulated spar-edge sensor nodes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sk = sub.add_parser("skeleton", help="one node publishing sine-wave tokens to a broker",
                        description="Publish sine-wave token windows for one node of a site through "
                        "the real feature, codec and MQTT path (walking skeleton).")
    sk.add_argument("--site", type=Path, required=True, help="site layout TOML")
    sk.add_argument("--node", default=None, help="node id (default: the site's first node)")
    sk.add_argument("--host", default="127.0.0.1", help="broker host (default: %(default)s)")
    sk.add_argument("--port", type=int, default=1883, help="broker port (default: %(default)s)")
    sk.add_argument("--windows", type=int, default=5, help="windows per modality (default: %(default)s)")
    sk.add_argument("--codec", default="webp:85", help="raw32 | raw | png | jpeg:Q | webp:Q | webp:lossless")
    sk.add_argument("--fast", action="store_true", help="do not wait for real time between windows")
    sk.set_defaults(func=_cmd_skeleton)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (WireError, NodeError) as exc:
        print(f"spar-node {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _cmd_skeleton(args: argparse.Namespace) -> int:
    from node_firmware_sim.mqtt_publisher import NodePublisher
    from node_firmware_sim.skeleton_node import publish_sine_windows

    if args.windows < 1:
        raise NodeError("--windows must be >= 1")
    layout = load_site_layout(args.site)
    node_id = args.node or layout.node_ids[0]
    settings = MqttSettings(host=args.host, port=args.port)
    with NodePublisher(layout, node_id, settings) as node:
        published = publish_sine_windows(node, args.windows, CodecSpec.parse(args.codec),
                                         realtime=not args.fast)
    acked = sum(p.acknowledged for p in published)
    print(f"node {node_id}: {len(published)} messages, {acked} acknowledged, "
          f"{sum(p.bytes for p in published)} bytes")
    return 0 if acked == len(published) else 1


if __name__ == "__main__":
    sys.exit(main())
