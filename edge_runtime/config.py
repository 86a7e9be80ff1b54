"""Aggregator configuration (``configs/aggregator.toml``), validated on load.

Relative paths in the file are relative to the file itself, so a config can travel with its site
layout and model folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import AggregatorError
from spar_wire.errors import WireError
from spar_wire.mqtt_settings import MqttSettings, with_credentials
from spar_wire.numbers import is_finite_number
from spar_wire.toml_file import read_toml
from spar_wire.topics import AGGREGATOR, AGGREGATOR_RESULTS


@dataclass(frozen=True)
class AggregatorConfig:
    site: Path  # site layout TOML
    model: Path  # manifest.json of the model to run
    database: Path = Path("results.sqlite3")  # SQLite results (WAL)
    backend: str = "auto"  # auto | onnxruntime | tensorrt
    device: str = "auto"  # auto | cpu | cuda
    deadline_fraction: float = 0.5  # a window closes this x window length after its first message
    # Close a window before its deadline once every missing message is known lost or overdue by this
    # quantile of its (node, modality)'s learned arrival lag plus the margin (see window_assembler). A
    # message later than that misses its window: a higher quantile keeps more, a lower closes sooner.
    early_close: bool = True
    early_close_quantile: float = 0.99
    early_close_margin_s: float = 0.02
    max_open_windows: int = 16  # more open windows force-close the oldest
    ingest_queue_size: int = 128  # received live token messages waiting to be decoded; overflow drops the oldest
    # A token message whose window ended longer ago than this (node clock) is backlog the broker kept
    # while we were away: never shed, only paced by the broker's in-flight limit.
    backlog_after_s: float = 30.0
    queue_size: int = 64  # closed windows waiting for inference; overflow drops the oldest
    # Token messages those queued windows may hold unacknowledged; beyond it the oldest window is
    # dropped. This + ingest_queue_size + the messages of open windows must stay below the broker's
    # max_inflight_messages (1000 in configs/mosquitto), or the broker stops sending and queues the
    # overload itself, where nothing bounds its latency.
    max_held_messages: int = 400
    broker_max_inflight: int = 1000  # the broker's max_inflight_messages; the service warns if the above exceed it
    # Clock sanity (edge_runtime/clock_guard.py): a token message whose window start is further than
    # max_clock_skew_s from the site's other nodes, or (before two other nodes were heard) more than
    # max_clock_ahead_s ahead of / max_clock_behind_s behind this box's clock, is refused and counted.
    max_clock_ahead_s: float = 60.0
    max_clock_behind_s: float = 2 * 86_400.0  # older than this cannot be backlog (session expiry: 1 day)
    max_clock_skew_s: float = 30.0
    # SQLite commit durability: FULL (fsync per batch; an acknowledged window survives a power cut) or
    # NORMAL (fsync at checkpoints only: faster on slow SD cards, may lose acknowledged windows on power
    # loss). `spar-bench runtime` measures both.
    synchronous: str = "FULL"
    # ONNX Runtime treats denormal floats as zero (~5x faster attention on windows with absent nodes).
    # It changes the floating-point mode of the thread that loads the model and of ONNX Runtime's own
    # threads: on for `spar-aggregator run` (the shipped configs set it), off by default so that a
    # process embedding the aggregator (tests, trials) keeps IEEE subnormals.
    flush_denormals: bool = False
    # /healthz says "stalled" when token messages were accepted but no result was stored for this many
    # window lengths.
    stall_windows: int = 10
    max_batch: int = 8  # windows per inference call when a backlog has formed
    # ... and at most this many node-windows per call: activation memory grows with batch x
    # (nodes x tokens)^2, and ONNX Runtime's arena keeps its peak. Measured with the student at 64
    # nodes: batch 1 peaks at 0.6 GB, batch 8 at 4.4 GB, for the same time per window.
    max_batch_nodes: int = 64
    retention_rows: int | None = 1_000_000
    retention_days: float | None = 90.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9108  # None: no HTTP endpoint
    dashboard: bool = True  # the live page and its JSON API on the metrics server (edge_runtime/dashboard.py)
    # A file holding the dashboard's password (HTTP Basic, any user name), e.g. a secure site's
    # credentials/monitor.password; None: no password (the server listens on loopback by default).
    dashboard_password_file: Path | None = None
    client_id: str = "aggregator"  # MQTT client id is "{site}.{client_id}"
    log_interval_s: float = 10.0  # rate limit of repeated warnings per reason
    # A birth may place a node at most this far (metres) outside the bounding box of the site
    # layout's positions; further is refused (refused.position_out_of_site) and the node keeps its
    # last good position: a typo or a GPS glitch in one retained birth must not poison every result.
    max_node_distance_m: float = 1000.0
    # Refuse to start when the site is not the one the model was trained on (other node ids, nodes
    # moved, or a manifest without training_site); false: log the slot binding and warn.
    strict_layout: bool = False
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    # The results publisher's session (results, retained health, "offline" will); None: the same as
    # mqtt. With [mqtt] credentials_dir it has its own identity (aggregator-results): on a broker that
    # makes the certificate the client id, two sessions of one identity would close each other.
    results_mqtt: MqttSettings | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dashboard, bool):
            raise AggregatorError(f"dashboard must be true or false, got {self.dashboard!r}")
        if not (isinstance(self.deadline_fraction, (int, float)) and math.isfinite(self.deadline_fraction)
                and 0 < self.deadline_fraction <= 10):
            raise AggregatorError(f"deadline_fraction must be in (0, 10], got {self.deadline_fraction!r}")
        for name in ("max_open_windows", "ingest_queue_size", "queue_size", "max_batch", "max_batch_nodes",
                     "max_held_messages", "broker_max_inflight", "stall_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AggregatorError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.backlog_after_s, (int, float)) and math.isfinite(self.backlog_after_s)
                and self.backlog_after_s >= 0):
            raise AggregatorError(f"backlog_after_s must be a number >= 0, got {self.backlog_after_s!r}")
        for name in ("strict_layout", "flush_denormals", "early_close"):
            if not isinstance(getattr(self, name), bool):
                raise AggregatorError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (is_finite_number(self.max_node_distance_m) and self.max_node_distance_m > 0):
            raise AggregatorError(f"max_node_distance_m must be a finite number of metres > 0, got "
                                  f"{self.max_node_distance_m!r}")
        for name in ("max_clock_ahead_s", "max_clock_behind_s", "max_clock_skew_s"):
            value = getattr(self, name)
            if not (is_finite_number(value) and value > 0):
                raise AggregatorError(f"{name} must be a number > 0 (seconds), got {value!r}")
        if not (isinstance(self.early_close_quantile, (int, float)) and 0 < self.early_close_quantile <= 1):
            raise AggregatorError(f"early_close_quantile must be in (0, 1], got {self.early_close_quantile!r}")
        if not (isinstance(self.early_close_margin_s, (int, float)) and 0 <= self.early_close_margin_s < 60):
            raise AggregatorError(f"early_close_margin_s must be in [0, 60) seconds, got {self.early_close_margin_s!r}")
        if self.synchronous not in ("FULL", "NORMAL"):
            raise AggregatorError(f"synchronous must be FULL or NORMAL, got {self.synchronous!r}")
        if self.backend not in ("auto", "onnxruntime", "tensorrt"):
            raise AggregatorError(f"backend must be auto, onnxruntime or tensorrt, got {self.backend!r}")

    def replace(self, **changes: Any) -> AggregatorConfig:
        return dataclasses.replace(self, **changes)


_PATH_KEYS = ("site", "model", "database", "dashboard_password_file")
_MQTT_KEYS = {f.name for f in dataclasses.fields(MqttSettings)} | {"password_env", "credentials_dir"}


def load_config(path: str | Path) -> AggregatorConfig:
    """Read ``[aggregator]`` and ``[mqtt]`` from a TOML file; AggregatorError naming the field."""
    path = Path(path)
    try:
        data = read_toml(path)
    except WireError as exc:
        raise AggregatorError(exc.detail) from None
    section = dict(data.get("aggregator", {}))
    known = {f.name for f in dataclasses.fields(AggregatorConfig)} - {"mqtt", "results_mqtt"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise AggregatorError(f"{path}: [aggregator]: unknown field '{unknown[0]}'; known: {', '.join(sorted(known))}")
    for key in ("site", "model"):
        if key not in section:
            raise AggregatorError(f"{path}: [aggregator]: '{key}' is required")
    for key in _PATH_KEYS:
        if key in section:
            section[key] = (path.parent / section[key]).resolve()
    mqtt = dict(data.get("mqtt", {}))
    unknown = sorted(set(mqtt) - _MQTT_KEYS)
    if unknown:
        raise AggregatorError(f"{path}: [mqtt]: unknown field '{unknown[0]}'; known: {', '.join(sorted(_MQTT_KEYS))}")
    password_env = mqtt.pop("password_env", None)
    if password_env:
        mqtt["password"] = os.environ.get(password_env)
    credentials_dir = mqtt.pop("credentials_dir", None)
    for key in ("tls_ca", "tls_cert", "tls_key"):
        if mqtt.get(key):
            mqtt[key] = str((path.parent / mqtt[key]).resolve())
    try:
        settings = MqttSettings(**mqtt)
        results = None
        if credentials_dir:
            # The site security folder of `spar-aggregator secure init`: user "aggregator" (the subscriber)
            # and "aggregator-results" (the publisher), their passwords, certificates and keys, and the
            # site CA, instead of naming each.
            folder = (path.parent / credentials_dir).resolve()
            aggregator = with_credentials(settings, folder, AGGREGATOR)
            results = _results_credentials(settings, folder, path)
            settings = aggregator
        return AggregatorConfig(**section, mqtt=settings, results_mqtt=results)
    except (TypeError, WireError) as exc:
        raise AggregatorError(f"{path}: {exc}") from None


def _results_credentials(settings: MqttSettings, folder: Path, path: Path) -> MqttSettings:
    try:
        return with_credentials(settings, folder, AGGREGATOR_RESULTS)
    except WireError as exc:
        # Most likely a folder made before the publisher had its own identity: say how to add it.
        raise AggregatorError(
            f"{path}: [mqtt] credentials_dir: {exc.detail}. The aggregator's results publisher has its own "
            f"identity, {AGGREGATOR_RESULTS!r}, which a security folder from an older version lacks: add it with "
            f"`spar-aggregator secure upgrade --dir {folder}` (run it on the folder that holds ca.key; if this is "
            f"a copy, then copy clients/{AGGREGATOR_RESULTS}.crt, .key and credentials/{AGGREGATOR_RESULTS}.password "
            "here), reload Mosquitto (kill -HUP) and start the aggregator again") from None
