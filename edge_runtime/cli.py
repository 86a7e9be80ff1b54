"""``spar-aggregator``: the edge aggregator service."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from spar_wire.errors import WireError
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.site_layout import load_site_layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spar-aggregator", description="spar-edge aggregator service.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sk = sub.add_parser("skeleton", help="decode and print every message of a site (walking skeleton)",
                        description="Subscribe to spar/v1/{site}/#, decode every message and print it; "
                        "malformed input is counted by reason. Stops on Ctrl-C / SIGTERM or after "
                        "--duration.")
    sk.add_argument("--site", type=Path, required=True, help="site layout TOML")
    sk.add_argument("--host", default="127.0.0.1", help="broker host (default: %(default)s)")
    sk.add_argument("--port", type=int, default=1883, help="broker port (default: %(default)s)")
    sk.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    sk.set_defaults(func=_cmd_skeleton)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (WireError, ConnectionError) as exc:
        print(f"spar-aggregator {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _cmd_skeleton(args: argparse.Namespace) -> int:
    from edge_runtime.skeleton_ingest import IngestStub
    from spar_wire.features import patchify

    layout = load_site_layout(args.site)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def show(message) -> None:
        tokens = patchify(message.image(), layout.modalities[message.modality].features)
        print(f"{message.node}/{message.modality} window_start_ns={message.window_start_ns} "
              f"seq={message.seq} codec={message.codec} tokens={tokens.shape}", flush=True)

    with IngestStub(layout.site_id, MqttSettings(host=args.host, port=args.port), on_token=show) as stub:
        try:
            stop.wait(args.duration)
        except KeyboardInterrupt:
            pass
        print(f"counts: {stub.snapshot()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
