"""One site's security folder: where each file lives, and ``security.json``, what ``init`` generated.

The layout and the manifest are what every other part of ``spar-aggregator secure`` agrees on (the
certificates in :mod:`edge_runtime.site_pki`, the passwords in :mod:`edge_runtime.site_passwords`, the
broker's ACL and config in :mod:`edge_runtime.site_broker_config`, the operations in
:mod:`edge_runtime.site_security`), so it lives apart from all of them and imports none of them.
The folder's contents are described in :mod:`edge_runtime.site_security`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_runtime.errors import AggregatorError
from spar_wire.atomic_file import write_atomic
from spar_wire.errors import WireError
from spar_wire.mqtt_settings import user_files
from spar_wire.topics import AGGREGATOR, AGGREGATOR_RESULTS, check_id

MONITOR = "monitor"  # optional read-only user for dashboards
RESERVED_USERS = (AGGREGATOR, AGGREGATOR_RESULTS, MONITOR)  # no node may take these names
MANIFEST_NAME = "security.json"
MANIFEST_FORMAT = 1


@dataclass
class SecurityManifest:
    """``security.json``: what ``init`` generated, so later operations need no repeated options."""

    site: str
    port: int
    hostnames: list[str]
    install_dir: str
    data_dir: str
    monitor: bool
    broker_user: str
    nodes: list[str] = field(default_factory=list)
    # Removed nodes whose certificates are on the CRL. Kept so the ACL keeps denying their usernames:
    # Mosquitto checks the CRL only in a new TLS handshake, never for a connection already open.
    revoked: list[str] = field(default_factory=list)
    # Whether the folder has the results publisher's identity (aggregator-results). False for a folder
    # from before it (its manifest has no such key, see open_folder): its ACL still lets "aggregator" write
    # results, as the aggregator of that time needs, until `upgrade` adds the identity.
    results_identity: bool = True
    format: int = MANIFEST_FORMAT

    @property
    def users(self) -> list[str]:
        return [AGGREGATOR, *([AGGREGATOR_RESULTS] if self.results_identity else []),
                *([MONITOR] if self.monitor else []), *self.nodes]


@dataclass(frozen=True)
class SiteFolder:
    """Paths inside one site's security folder."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def conf(self) -> Path:
        return self.root / "mosquitto.conf"

    @property
    def ca_cert(self) -> Path:
        return user_files(self.root, "any")["ca"]

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "broker" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "broker" / "server.key"

    @property
    def passwd(self) -> Path:
        return self.root / "broker" / "passwd"

    @property
    def acl(self) -> Path:
        return self.root / "broker" / "acl"

    @property
    def crl(self) -> Path:
        return self.root / "broker" / "crl.pem"

    # A user's own files follow the layout clients read (spar_wire.mqtt_settings.with_credentials).
    def client_cert(self, user: str) -> Path:
        return user_files(self.root, user)["cert"]

    def client_key(self, user: str) -> Path:
        return user_files(self.root, user)["key"]

    def password_file(self, user: str) -> Path:
        return user_files(self.root, user)["password"]

    def generated(self) -> list[Path]:
        """Top-level entries ``init`` creates (``data/`` excluded: it holds the broker's sessions)."""
        return [self.manifest, self.conf, self.ca_cert, self.ca_key, self.root / "broker",
                self.root / "clients", self.root / "credentials"]


def open_folder(folder_path: str | Path) -> tuple[SiteFolder, SecurityManifest]:
    """The folder and its manifest; an :class:`AggregatorError` naming ``init`` when it has none."""
    folder = SiteFolder(Path(folder_path))
    try:
        data = json.loads(folder.manifest.read_text())
    except OSError:
        raise AggregatorError(f"{folder.root}: no {MANIFEST_NAME}; create the folder with "
                              "`spar-aggregator secure init`") from None
    except ValueError as exc:
        raise AggregatorError(f"{folder.manifest}: not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise AggregatorError(f"{folder.manifest}: unknown format (expected {MANIFEST_FORMAT})")
    # Written before the results publisher had its own identity: the folder has no aggregator-results.
    data.setdefault("results_identity", False)
    try:
        return folder, SecurityManifest(**data)
    except TypeError as exc:
        raise AggregatorError(f"{folder.manifest}: {exc}") from None


def save_manifest(folder: SiteFolder, manifest: SecurityManifest) -> None:
    """Rewrite ``security.json`` atomically (operations call it last: a run that stops half way leaves
    the manifest of before, never half of one)."""
    write_atomic(folder.manifest, json.dumps(asdict(manifest), indent=2) + "\n", mode=0o644, keep_owner=True)


def checked_id(node_id: str) -> str:
    """``node_id`` if it can be a node (and so an MQTT username and a topic level), else an AggregatorError."""
    try:
        return check_id(node_id, "node id")
    except WireError as exc:
        raise AggregatorError(exc.detail) from None


def check_new_node(manifest: SecurityManifest, node_id: str) -> None:
    """Refuse an id that is invalid, reserved for the aggregator or monitor, or already a node."""
    checked_id(node_id)
    if node_id in RESERVED_USERS:
        raise AggregatorError(f"node id {node_id!r} is reserved for the {node_id} user")
    if node_id in manifest.nodes:
        raise AggregatorError(f"node {node_id!r} already exists in site {manifest.site!r}")
