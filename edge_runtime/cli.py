"""``spar-aggregator``: the edge aggregator service and its tools."""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_runtime.errors import AggregatorError
from spar_wire.errors import WireError
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.site_layout import load_site_layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spar-aggregator", description="spar-edge aggregator service.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_query(sub)
    _add_skeleton(sub)
    _add_secure(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (WireError, AggregatorError, ConnectionError) as exc:
        print(f"spar-aggregator {args.command}: error: {exc}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- run
def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="run the aggregator for one site",
        description="Subscribe to the site's node traffic, assemble a placement tensor per window, run the "
        "model (TensorRT or ONNX Runtime), store results in SQLite and publish them to "
        "spar/v1/{site}/aggregator/results. Prometheus metrics on http://HOST:PORT/metrics. "
        "SIGTERM or Ctrl-C drains: every window closed by then is stored and published; messages of windows "
        "still open stay with the broker (persistent session) and complete their windows after a restart.")
    p.add_argument("--config", type=Path, required=True, help="aggregator TOML, e.g. configs/aggregator.toml")
    p.add_argument("--host", default=None, help="override [mqtt] host")
    p.add_argument("--port", type=int, default=None, help="override [mqtt] port")
    p.add_argument("--database", type=Path, default=None, help="override the SQLite path")
    p.add_argument("--metrics-port", type=int, default=None, help="override the metrics port (0: any free)")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default=None,
                   help="override the inference backend")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--strict-layout", action="store_true",
                   help="refuse to start when the site is not the one the model was trained on (other node ids, "
                   "moved nodes, or a manifest that does not record its training site); default: log the "
                   "slot binding and warn ([aggregator] strict_layout)")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ... (default: INFO)")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_runtime.config import load_config
    from edge_runtime.service import Aggregator

    _setup_logging(args.log_format, args.log_level)
    config = load_config(args.config)
    overrides: dict[str, Any] = {}
    if args.database is not None:
        overrides["database"] = args.database
    if args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    if args.backend is not None:
        overrides["backend"] = args.backend
    if args.strict_layout:  # the flag only tightens: without it the config file's strict_layout holds
        overrides["strict_layout"] = True
    if args.host is not None or args.port is not None:
        # Both sessions go to the same broker: the results publisher's own settings move with it.
        for name in ("mqtt", "results_mqtt"):
            mqtt = getattr(config, name)
            if mqtt is not None:
                overrides[name] = MqttSettings(**{**mqtt.__dict__, "host": args.host or mqtt.host,
                                                  "port": args.port or mqtt.port})
    config = config.replace(**overrides)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    aggregator = Aggregator(config).start()
    print(f"aggregator running: site {aggregator.site}, model {aggregator.manifest.name}@"
          f"{aggregator.manifest.version}, broker {config.mqtt.host}:{config.mqtt.port}, metrics port "
          f"{aggregator.metrics.port}", file=sys.stderr, flush=True)
    if aggregator.dashboard is not None:
        print(f"dashboard: {aggregator.metrics.url}/", file=sys.stderr, flush=True)
    stop.wait(args.duration)
    aggregator.stop()
    counts = aggregator.worker.snapshot_counts()
    print(f"stopped: {counts.get('results', 0)} results stored and published; "
          f"messages {aggregator.processor.snapshot_counts()}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- query
def _add_query(sub: Any) -> None:
    p = sub.add_parser("query", help="read stored results back from the SQLite database",
                       description="Print stored results, newest first, as a table or JSON lines.")
    p.add_argument("--database", type=Path, required=True, help="the aggregator's SQLite file")
    p.add_argument("--site", default=None, help="only this site")
    p.add_argument("--since", default=None, help="window start at or after: ISO time or ns since epoch")
    p.add_argument("--until", default=None, help="window start before: ISO time or ns since epoch")
    p.add_argument("--limit", type=int, default=20, help="at most this many results (default: %(default)s)")
    p.add_argument("--oldest-first", action="store_true", help="oldest first")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(func=_cmd_query)


def _cmd_query(args: argparse.Namespace) -> int:
    from edge_runtime.result_store import ResultStore

    if not args.database.exists():
        raise AggregatorError(f"{args.database}: no such database")
    with ResultStore(args.database, retention_rows=None, retention_days=None, readonly=True) as store:
        rows = store.query(site=args.site, since_ns=_time_ns(args.since), until_ns=_time_ns(args.until),
                           limit=args.limit, newest_first=not args.oldest_first)
    if args.json:
        for row in rows:
            print(json.dumps(row, separators=(",", ":")))
        return 0
    print(f"{'window start (UTC)':<24}{'site':<16}{'nodes':>6}  {'complete':<9}{'result':<32}{'e2e ms':>9}")
    for row in rows:
        start = datetime.fromtimestamp(row["window_start_ns"] / 1e9, tz=timezone.utc)
        outputs = row.get("outputs", {})
        label = row.get("class") or next(iter(outputs), "-")
        if "hypocentre" in outputs:  # an earthquake: where, in the site frame, in km
            x, y, depth = (float(v) / 1000 for v in outputs["hypocentre"][:3])
            label = f"({x:.1f}, {y:.1f}) km, {depth:.1f} km deep"
        if "detection_logits" in outputs:  # several vehicles: how many, and where (metres)
            label = _detections_label(outputs["detection_logits"], outputs.get("detection_positions", []))
        if "class_probabilities" in row:
            label = f"{label} ({max(row['class_probabilities'].values()):.2f})"
        e2e = (row.get("latency_ms") or {}).get("end_to_end")
        print(f"{start:%Y-%m-%d %H:%M:%S}.{start.microsecond // 1000:03d} {row['site']:<16}"
              f"{row['nodes_present']:>6}  {str(row.get('complete', '')):<9}{label:<32}"
              f"{'-' if e2e is None else f'{e2e:.1f}':>9}")
    print(f"{len(rows)} result(s)")
    return 0


def _detections_label(logits: list[list[float]], positions: list[list[float]], threshold: float = 0.5) -> str:
    """"2 detected: (12, 4) (30, 21)": queries whose best real class (not the last, "no object") has
    a probability of at least ``threshold``."""
    found = []
    for row, place in zip(logits, positions, strict=False):
        top = max(row)
        weights = [math.exp(v - top) for v in row]
        if max(weights[:-1]) / sum(weights) >= threshold:
            found.append(f"({place[0]:.0f}, {place[1]:.0f})")
    return f"{len(found)} detected" + (": " + " ".join(found[:3]) if found else "")


def _time_ns(text: str | None) -> int | None:
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise AggregatorError(f"bad time {text!r}: use ISO 8601 (2026-11-27T10:00:00) or ns") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1e9)


# --------------------------------------------------------------------------- skeleton
def _add_skeleton(sub: Any) -> None:
    p = sub.add_parser("skeleton", help="decode and print every message of a site (walking skeleton)",
                       description="Subscribe to spar/v1/{site}/#, decode every message and print it; "
                       "malformed input is counted by reason. Stops on Ctrl-C / SIGTERM or after "
                       "--duration.")
    p.add_argument("--site", type=Path, required=True, help="site layout TOML")
    p.add_argument("--host", default="127.0.0.1", help="broker host (default: %(default)s)")
    p.add_argument("--port", type=int, default=1883, help="broker port (default: %(default)s)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.set_defaults(func=_cmd_skeleton)


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


# --------------------------------------------------------------------------- secure
_RELOAD_HINT = "reload Mosquitto so it takes effect: kill -HUP $(pidof mosquitto) (or systemctl reload mosquitto)"


def _add_secure(sub: Any) -> None:
    p = sub.add_parser(
        "secure", help="provision the site broker's TLS certificates, passwords and ACL",
        description="Create and maintain a site's broker security folder: a local CA, the broker's TLS "
        "certificate, a client certificate + key and a random MQTT password per node and for the aggregator's "
        "two sessions ('aggregator' reads node traffic, 'aggregator-results' publishes results), a Mosquitto "
        "password file, an ACL (a node may only publish under spar/v1/{site}/{node}/ and read nothing), a "
        "revocation list and a mosquitto.conf with a single TLS listener, where the client certificate is the "
        "login. Passwords go to credentials/<user>.password (0600) and are never printed unless asked.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_secure_init(actions)
    _add_secure_add_node(actions)
    _add_secure_rotate(actions)
    _add_secure_remove_node(actions)
    _add_secure_upgrade(actions)


def _add_secure_init(actions: Any) -> None:
    p = actions.add_parser(
        "init", help="generate everything for a site layout",
        description="Generate the CA, broker certificate, revocation list, certificates and passwords for every "
        "node of a site layout and for the aggregator's two identities, password file, ACL and mosquitto.conf. "
        "Refuses an existing, "
        "non-empty folder unless --force. Run as root on the broker box, it hands broker/ and data/ to "
        "--broker-user; otherwise it says what to chown.")
    p.add_argument("--site", type=Path, required=True, help="site layout TOML, e.g. configs/sites/parking_lot.toml")
    p.add_argument("--out", type=Path, required=True, help="security folder to create, e.g. secure/parking_lot")
    p.add_argument("--hostname", action="append", default=None, metavar="NAME_OR_IP",
                   help="name or IP clients use to reach the broker, put into its certificate (repeatable; "
                   "default: localhost and 127.0.0.1)")
    p.add_argument("--port", type=int, default=8883, help="TLS listener port (default: %(default)s)")
    p.add_argument("--install-dir", default=None,
                   help="absolute path the folder will have on the broker box, used in mosquitto.conf "
                   "(default: --out, resolved)")
    p.add_argument("--data-dir", default=None,
                   help="absolute path of Mosquitto's persistence folder (default: INSTALL_DIR/data)")
    p.add_argument("--broker-user", default="mosquitto",
                   help="user Mosquitto drops root privileges to (default: %(default)s)")
    p.add_argument("--monitor", action="store_true",
                   help="also create a read-only 'monitor' user for dashboards (reads aggregator results)")
    p.add_argument("--force", action="store_true",
                   help="replace the certificates and passwords of an existing folder (keeps data/)")
    p.add_argument("--show-passwords", action="store_true", help="also print the generated passwords")
    p.set_defaults(func=_cmd_secure_init)


def _add_secure_add_node(actions: Any) -> None:
    p = actions.add_parser(
        "add-node", help="certificate and password for one more node",
        description="Issue a client certificate and a password for a new node and append it to the password "
        "file. The ACL needs no change (its pattern covers any node). Needs ca.key in the folder.")
    p.add_argument("node", metavar="NODE_ID", help="the new node's id (= its MQTT username)")
    p.add_argument("--dir", type=Path, required=True, help="the site's security folder (from secure init)")
    p.add_argument("--show-password", action="store_true", help="also print the new password")
    p.set_defaults(func=_cmd_secure_add_node)


def _add_secure_rotate(actions: Any) -> None:
    p = actions.add_parser(
        "rotate-password", help="new password for one user",
        description="Generate a new password for a node, 'aggregator', 'aggregator-results' or 'monitor'. The "
        "password file is rewritten atomically, other entries unchanged. The generated TLS listener never "
        "checks passwords (the client certificate is the login), so this matters only on a listener without "
        "client certificates that you added: there, after SIGHUP, Mosquitto refuses the old password and "
        "disconnects sessions that logged in with it. To lock out a leaked key, use remove-node (and add-node).")
    p.add_argument("user", metavar="USER", help="node id, 'aggregator', 'aggregator-results' or 'monitor'")
    p.add_argument("--dir", type=Path, required=True, help="the site's security folder (from secure init)")
    p.add_argument("--show-password", action="store_true", help="also print the new password")
    p.set_defaults(func=_cmd_secure_rotate)


def _add_secure_remove_node(actions: Any) -> None:
    p = actions.add_parser(
        "remove-node", help="revoke one node's access",
        description="Revoke a node: its certificate goes on the site's revocation list (broker/crl.pem), its "
        "username is denied everything in the ACL, and its password entry, certificate, key and credentials "
        "are deleted. Needs ca.key in the folder (the revocation list is signed by the site CA) and the "
        "node's certificate in clients/. After SIGHUP Mosquitto refuses the certificate in the TLS handshake, "
        "and a connection the node still has open may publish and read nothing; a restart also closes it.")
    p.add_argument("node", metavar="NODE_ID", help="the node to remove")
    p.add_argument("--dir", type=Path, required=True, help="the site's security folder (from secure init)")
    p.set_defaults(func=_cmd_secure_remove_node)


def _add_secure_upgrade(actions: Any) -> None:
    p = actions.add_parser(
        "upgrade", help="bring a security folder from an older version up to date",
        description="Issue what a folder made by an older version lacks: the identity of the aggregator's "
        "results publisher, 'aggregator-results' (certificate, key, password), so that the aggregator's two "
        "sessions no longer share one identity and close each other. Rewrites the ACL: 'aggregator-results' "
        "publishes results, 'aggregator' only reads node traffic. Needs ca.key in the folder. Then copy the "
        "new files to the aggregator's credentials folder, reload Mosquitto and start the aggregator: after "
        "the reload an aggregator of the older version can no longer publish results. Nothing to do on a "
        "current folder.")
    p.add_argument("--dir", type=Path, required=True, help="the site's security folder (from secure init)")
    p.add_argument("--show-password", action="store_true", help="also print the new password")
    p.set_defaults(func=_cmd_secure_upgrade)


def _cmd_secure_init(args: argparse.Namespace) -> int:
    from edge_runtime.site_security import BrokerOptions, init_site

    options = BrokerOptions(hostnames=tuple(args.hostname or ("localhost", "127.0.0.1")), port=args.port,
                            install_dir=args.install_dir, data_dir=args.data_dir, monitor=args.monitor,
                            broker_user=args.broker_user)
    done = init_site(args.site, args.out, options, overwrite=args.force)
    root = done.folder.root
    print(f"site {done.site}: {len(done.passwords)} users ({', '.join(done.passwords)}) in {root}")
    print(f"  broker:  mosquitto -c {args.install_dir or root.resolve()}/mosquitto.conf   (TLS on port {args.port})")
    print(f"  clients: {root}/ca.crt, {root}/clients/<user>.crt + .key, {root}/credentials/<user>.password")
    print(f"  keep {root}/ca.key secret (needed only for add-node, remove-node and upgrade); never copy it to "
          "nodes")
    _print_secure_result(done, args.show_passwords)
    return 0


def _cmd_secure_add_node(args: argparse.Namespace) -> int:
    from edge_runtime.site_security import add_node

    done = add_node(args.dir, args.node)
    folder = done.folder
    print(f"node {args.node} added to site {done.site}: {folder.client_cert(args.node)}, "
          f"{folder.client_key(args.node)}, {folder.password_file(args.node)}")
    print(_RELOAD_HINT)
    _print_secure_result(done, args.show_password)
    return 0


def _cmd_secure_rotate(args: argparse.Namespace) -> int:
    from edge_runtime.site_security import rotate_password

    done = rotate_password(args.dir, args.user)
    print(f"new password for {args.user} in {done.folder.password_file(args.user)}; update that client's "
          "configuration, then " + _RELOAD_HINT)
    _print_secure_result(done, args.show_password)
    return 0


def _cmd_secure_remove_node(args: argparse.Namespace) -> int:
    from edge_runtime.site_security import remove_node

    done = remove_node(args.dir, args.node)
    print(f"node {args.node} removed from site {done.site}; " + _RELOAD_HINT)
    _print_secure_result(done, False)
    return 0


def _cmd_secure_upgrade(args: argparse.Namespace) -> int:
    from edge_runtime.site_security import upgrade_site
    from spar_wire.topics import AGGREGATOR_RESULTS

    done = upgrade_site(args.dir)
    folder = done.folder
    if AGGREGATOR_RESULTS in done.passwords:
        print(f"site {done.site}: added {AGGREGATOR_RESULTS}, the aggregator's results publisher: "
              f"{folder.client_cert(AGGREGATOR_RESULTS)}, {folder.client_key(AGGREGATOR_RESULTS)}, "
              f"{folder.password_file(AGGREGATOR_RESULTS)} (copy them where the aggregator's credentials_dir "
              "points, if elsewhere); ACL rewritten")
    else:
        print(f"site {done.site}: the folder is up to date; ACL rewritten as generated")
    print(_RELOAD_HINT + "; then start the aggregator")
    _print_secure_result(done, args.show_password)
    return 0


def _print_secure_result(done: Any, show_passwords: bool) -> None:
    for note in done.notes:
        print(f"note: {note}")
    if show_passwords:
        for user, password in done.passwords.items():
            print(f"password {user}: {password}")


# --------------------------------------------------------------------------- logging
class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {"time": round(time.time(), 3), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body)


def _setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    try:
        root.setLevel(level.upper())
    except ValueError:
        raise AggregatorError(f"unknown log level {level!r}") from None


if __name__ == "__main__":
    sys.exit(main())
