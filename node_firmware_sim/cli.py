"""``spar-node``: simulated sensor nodes — field runs, dataset export, the walking skeleton."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from node_firmware_sim.errors import NodeError
from node_firmware_sim.scenarios import SCENARIOS, parse_scenario_params
from spar_wire.codecs import CodecSpec
from spar_wire.errors import WireError
from spar_wire.mqtt_settings import MqttSettings, with_credentials
from spar_wire.site_layout import load_site_layout

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_SITES = {"parking_lot": "parking_lot.toml", "earthquakes": "ridgecrest_like.toml",
                 "body_har": "body_har.toml", "indoor_csi": "indoor_csi.toml", "sine": "parking_lot.toml"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spar-node", description="Simulated spar-edge sensor nodes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_dataset(sub)
    _add_skeleton(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (WireError, NodeError) as exc:
        print(f"spar-node {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- run
def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="run every node of a site through a lossy link to a broker",
        description="Run all nodes of a site in this process (or --procs processes): each samples "
        "the scenario (or replays recordings), computes spectrogram tokens, compresses and frames "
        "them, and publishes them over MQTT (QoS 1) through the lossy link model. Prints a summary "
        "of messages, bytes and the losses injected.")
    _add_source_args(p)
    p.add_argument("--duration", type=float, default=60.0,
                   help="trial length in seconds (default: %(default)s)")
    p.add_argument("--link", type=Path, default=None,
                   help="link config TOML, e.g. configs/links/lossy.toml (default: a perfect link)")
    p.add_argument("--codec", default="webp:85", help="raw32 | raw | png | jpeg:Q | webp:Q | webp:lossless "
                   "(default: %(default)s)")
    p.add_argument("--fast", action="store_true", help="as fast as possible instead of real time")
    p.add_argument("--speed", type=float, default=1.0,
                   help="real time compressed by this factor: windows, link delays and outages all run "
                   "SPEED times faster on the wall clock (default: %(default)s)")
    p.add_argument("--procs", type=int, default=1, help="split the nodes over this many processes")
    p.add_argument("--clock-offset-std-ms", type=float, default=0.0,
                   help="node clock offsets ~ N(0, this) in ms, seeded per node (default: 0)")
    p.add_argument("--outage-buffer", type=int, default=512,
                   help="frames a node keeps while its uplink is down (default: %(default)s)")
    p.add_argument("--link-log", type=Path, default=None, help="write every link decision here (JSON lines)")
    p.add_argument("--truth-log", type=Path, default=None, help="write ground truth per window (JSON lines)")
    p.add_argument("--summary-json", type=Path, default=None, help="write the summary as JSON")
    p.add_argument("--dry-run", action="store_true", help="no broker: encode and run the link model only")
    _add_mqtt_args(p)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field_parallel
    from node_firmware_sim.firmware import FirmwareConfig
    from node_firmware_sim.link_model import LinkConfig, load_link_config

    layout = load_site_layout(_site_path(args))
    config = FieldConfig(
        layout=layout,
        source=SourceSpec(args.scenario, args.seed, parse_scenario_params(args.param),
                          str(args.recordings) if args.recordings else None),
        duration_s=args.duration,
        link=load_link_config(args.link) if args.link else LinkConfig(),
        firmware=FirmwareConfig(codec=CodecSpec.parse(args.codec), outage_buffer_messages=args.outage_buffer),
        clock_offset_std_s=args.clock_offset_std_ms / 1000.0,
        mqtt=None if args.dry_run else _mqtt_settings(args),
        realtime=not args.fast,
        speed=args.speed,
        link_log=str(args.link_log) if args.link_log else None,
        truth_log=str(args.truth_log) if args.truth_log else None,
        credentials_dir=str(args.credentials_dir) if args.credentials_dir else None,
    )
    source = "recordings " + str(args.recordings) if args.recordings else f"scenario {args.scenario}"
    target = "no broker (dry run)" if args.dry_run else f"broker {args.host}:{args.port}"
    print(f"site {layout.site_id}: {len(layout.nodes)} nodes, {source}, {args.duration:g} s "
          f"{'as fast as possible' if args.fast else 'in real time'}, {target}", file=sys.stderr)
    with _progress("windows") as bar:
        summary = run_field_parallel(config, args.procs, bar)
    print(summary.format_table())
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    total = summary.total()
    if not args.dry_run and total.acked < total.published:
        print(f"warning: {total.published - total.acked} published copies were not acknowledged",
              file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- dataset
def _add_dataset(sub: Any) -> None:
    p = sub.add_parser(
        "dataset", help="export training shards computed exactly as the firmware computes them",
        description="Generate windows from a scenario, encode them with the node firmware (features, "
        "uint8 quantization, codec) and decode them as the aggregator would, and write npz shards "
        "plus dataset.json (feature hashes, seed, shapes, class names, sha256 per shard). "
        "Deterministic for a seed; uses --workers processes.")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), required=True, help="scenario to sample")
    p.add_argument("--site", type=Path, default=None, help="site layout TOML (default: the scenario's own)")
    p.add_argument("--windows", type=int, required=True, help="number of windows")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--codec", default="png", help="png (default: lossless after quantization) or a lossy "
                   "codec such as jpeg:85 / webp:75 to train on what a bandwidth-limited link delivers")
    p.add_argument("--shard-size", type=int, default=1000, help="windows per shard (default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: all cores, %(default)s)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="scenario parameter, e.g. --param max_vehicles=1 (repeatable; JSON values)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.set_defaults(func=_cmd_dataset, recordings=None)


def _cmd_dataset(args: argparse.Namespace) -> int:
    from node_firmware_sim.dataset import DatasetSpec, export_dataset

    spec = DatasetSpec(site=str(_site_path(args)), scenario=args.scenario, windows=args.windows,
                       seed=args.seed, codec=args.codec, shard_size=args.shard_size,
                       params=parse_scenario_params(args.param))
    with _progress("windows") as bar:
        report = export_dataset(spec, args.out, workers=args.workers, overwrite=args.overwrite, progress=bar)
    print(f"wrote {report.windows} windows in {report.shards} shard(s), {report.bytes / 1e6:.1f} MB, "
          f"to {report.out} in {report.elapsed_s:.1f} s ({report.windows_per_s:.1f} windows/s)")
    return 0


# --------------------------------------------------------------------------- skeleton
def _add_skeleton(sub: Any) -> None:
    p = sub.add_parser("skeleton", help="one node publishing sine-wave tokens to a broker",
                       description="Publish sine-wave token windows for one node of a site through "
                       "the real feature, codec and MQTT path (walking skeleton).")
    p.add_argument("--site", type=Path, required=True, help="site layout TOML")
    p.add_argument("--node", default=None, help="node id (default: the site's first node)")
    p.add_argument("--windows", type=int, default=5, help="windows per modality (default: %(default)s)")
    p.add_argument("--codec", default="webp:85", help="raw32 | raw | png | jpeg:Q | webp:Q | webp:lossless")
    p.add_argument("--fast", action="store_true", help="do not wait for real time between windows")
    _add_mqtt_args(p)
    p.set_defaults(func=_cmd_skeleton)


def _cmd_skeleton(args: argparse.Namespace) -> int:
    from node_firmware_sim.mqtt_publisher import NodePublisher
    from node_firmware_sim.skeleton_node import publish_sine_windows

    if args.windows < 1:
        raise NodeError("--windows must be >= 1")
    layout = load_site_layout(args.site)
    node_id = args.node or layout.node_ids[0]
    settings = _mqtt_settings(args)
    if args.credentials_dir:
        settings = with_credentials(settings, args.credentials_dir, node_id)
    with NodePublisher(layout, node_id, settings) as node:
        published = publish_sine_windows(node, args.windows, CodecSpec.parse(args.codec),
                                         realtime=not args.fast)
    acked = sum(p.acknowledged for p in published)
    print(f"node {node_id}: {len(published)} messages, {acked} acknowledged, "
          f"{sum(p.bytes for p in published)} bytes")
    return 0 if acked == len(published) else 1


# --------------------------------------------------------------------------- shared
def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", type=Path, default=None, help="site layout TOML (default: the scenario's own)")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="parking_lot",
                   help="physics scenario (default: %(default)s)")
    p.add_argument("--recordings", type=Path, default=None,
                   help="replay recordings (TOML listing WAV / miniSEED files) instead of a scenario")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenario and the link (default: 0)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="scenario parameter (repeatable; JSON values)")


def _add_mqtt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker")
    g.add_argument("--host", default="127.0.0.1", help="broker host (default: %(default)s)")
    g.add_argument("--port", type=int, default=1883, help="broker port (default: %(default)s)")
    g.add_argument("--protocol", choices=("5", "3.1.1"), default="5", help="MQTT version (default: 5)")
    g.add_argument("--username", default=None, help="broker user name")
    g.add_argument("--password-env", default="SPAR_MQTT_PASSWORD",
                   help="environment variable holding the password (default: %(default)s)")
    g.add_argument("--tls-ca", default=None, help="CA certificate file; turns TLS on")
    g.add_argument("--tls-cert", default=None, help="client certificate (mutual TLS)")
    g.add_argument("--tls-key", default=None, help="client key (mutual TLS)")
    g.add_argument("--credentials-dir", type=Path, default=None,
                   help="site security folder (spar-aggregator secure init): each node connects as its own "
                   "id with its password, certificate and key from there, and the site CA")


def _mqtt_settings(args: argparse.Namespace) -> MqttSettings:
    password = os.environ.get(args.password_env) if args.username else None
    return MqttSettings(host=args.host, port=args.port, protocol=args.protocol, username=args.username,
                        password=password, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)


def _site_path(args: argparse.Namespace) -> Path:
    if args.site is not None:
        return args.site
    if getattr(args, "recordings", None):
        raise NodeError("--recordings needs --site")
    name = DEFAULT_SITES[args.scenario]
    local = Path("configs/sites") / name
    return local if local.exists() else REPO_CONFIGS / "sites" / name


class _progress:
    """A tqdm bar on stderr used as a ``progress(done, total)`` callback; silent without tqdm."""

    def __init__(self, unit: str):
        self.unit = unit
        self.bar = None

    def __enter__(self) -> _progress:
        return self

    def __call__(self, done: int, total: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, unit=self.unit, file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
