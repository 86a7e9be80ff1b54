"""Broker security for one site: a local CA, TLS certificates, Mosquitto passwords, ACL and mosquitto.conf.

``spar-aggregator secure ...`` drives this module. Everything for a site lives in one folder::

    secure/parking_lot/
        security.json                  what was generated (site, listener, users); read by add-node & co.
        mosquitto.conf                 the broker's config; the paths in it are absolute (install_dir)
        ca.crt                         the site CA: the broker and every client trust it
        ca.key                         0600; needed to add, remove nodes and upgrade: keep it off the broker box
        broker/server.crt, server.key  the broker's TLS identity (SAN: the hostnames / IPs given)
        broker/passwd, broker/acl      Mosquitto's password file ($7$ PBKDF2-SHA512) and ACL
        broker/crl.pem                 revoked client certificates (remove-node), signed by the site CA
        clients/<user>.crt, .key       one per node, the aggregator's two (and the monitor); CN = MQTT username
        credentials/<user>.password    0600; the MQTT password in clear, for that user's config only
        data/                          Mosquitto's persistence database

Mosquitto reads the files under ``broker/`` plus ``ca.crt``; a node needs ``ca.crt``, its own
``clients/<node>.*`` and ``credentials/<node>.password``. Stdlib + ``cryptography`` only.

The aggregator has two identities because it has two MQTT sessions and the broker keeps one connection
per identity (below): ``aggregator``, its persistent subscriber, reads node traffic and writes nothing;
``aggregator-results``, its results publisher, writes results and its health and reads nothing. With one
identity for both, each connection closed the other, forever. A folder from before the second identity
gets it from ``upgrade_site`` (``spar-aggregator secure upgrade``).

Who a client is, on the generated TLS listener, is decided by its certificate alone:
``use_identity_as_username`` makes the certificate's CN the MQTT username, so the ACL applies to the
certificate's owner whatever username and password the client sends, and ``use_username_as_clientid``
makes it the client id too, so no client can take over another's session. Without it, Mosquitto checks the
certificate only against the CA and the password against *any* user, so node n01's certificate plus a
leaked aggregator password logged in as the aggregator. Mosquitto 2.0 skips the password check
entirely on such a listener (src/handle_connect.c: "Authentication assumed to be cleared"), so:

- revoking a client means revoking its certificate: ``remove-node`` adds it to ``broker/crl.pem``
  (Mosquitto rebuilds the listener's TLS context with the CRL on SIGHUP) and denies its username
  everything in the ACL (which also covers a connection it still has open);
- the password file and the per-user passwords gate only a listener without client certificates that
  an operator adds (e.g. loopback-only, for local tools); clients send the password anyway, so the
  same credentials work on both.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_runtime.errors import AggregatorError
from spar_wire.errors import WireError
from spar_wire.message import WireLimits
from spar_wire.mqtt_settings import user_files
from spar_wire.site_layout import load_site_layout
from spar_wire.topics import AGGREGATOR, AGGREGATOR_RESULTS, PREFIX, check_id

MONITOR = "monitor"  # optional read-only user for dashboards
RESERVED_USERS = (AGGREGATOR, AGGREGATOR_RESULTS, MONITOR)  # no node may take these names
MANIFEST_NAME = "security.json"
MANIFEST_FORMAT = 1
CA_DAYS = 3650
LEAF_DAYS = 730
# Passwords are 32 random bytes (256 bits), so key stretching adds no real protection; the broker
# runs PBKDF2 on every CONNECT, so a modest count keeps a reconnect storm of a big site cheap.
PASSWORD_ITERATIONS = 1000
SALT_BYTES = 12  # Mosquitto 2.0.11 never accepts a login against a $7$ entry with another salt length
PASSWORD_BYTES = 32
_HOSTNAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class BrokerOptions:
    """How the site's broker is reached and where its files will live."""

    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1")  # server certificate SAN; clients connect to one
    port: int = 8883
    install_dir: str | None = None  # folder path on the broker box; default: where it is generated
    data_dir: str | None = None  # persistence folder; default: {install_dir}/data
    monitor: bool = False  # also create the read-only ``monitor`` user
    broker_user: str = "mosquitto"  # Mosquitto drops root privileges to this user


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
    # from before it (its manifest has no such key, see _open): its ACL still lets "aggregator" write
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


@dataclass(frozen=True)
class Credentials:
    """What one MQTT user needs to connect."""

    user: str
    password: str
    ca: Path
    cert: Path
    key: Path
    password_file: Path

    def mqtt_settings(self, host: str, port: int, **overrides: object):
        """``MqttSettings`` for this user (TLS with client certificate + username/password);
        ``overrides`` replace any field."""
        from spar_wire.mqtt_settings import MqttSettings

        fields = {"host": host, "port": port, "username": self.user, "password": self.password,
                  "tls_ca": str(self.ca), "tls_cert": str(self.cert), "tls_key": str(self.key)}
        return MqttSettings(**{**fields, **overrides})


@dataclass(frozen=True)
class Provisioned:
    """Result of an operation: the folder, and the passwords it generated (shown only on request)."""

    folder: SiteFolder
    site: str
    passwords: dict[str, str]
    notes: tuple[str, ...] = ()  # what the operator still has to do


# --------------------------------------------------------------------------- operations
def init_site(site_layout: str | Path, out: str | Path, options: BrokerOptions = BrokerOptions(), *,
              overwrite: bool = False) -> Provisioned:
    """Create CA, certificates, passwords, ACL and mosquitto.conf for every node of a site layout.

    Refuses an existing non-empty ``out`` unless ``overwrite`` (which replaces what init generates
    and keeps ``data/``, the broker's persistence).
    """
    layout = _load_layout(site_layout)
    _check_options(options)
    folder = SiteFolder(Path(out))
    install_dir = options.install_dir or str(folder.root.resolve())
    manifest = SecurityManifest(
        site=layout.site_id, port=options.port, hostnames=list(options.hostnames), install_dir=install_dir,
        data_dir=options.data_dir or f"{install_dir.rstrip('/')}/data", monitor=options.monitor,
        broker_user=options.broker_user, nodes=[])
    for node in layout.node_ids:
        _check_new_node(manifest, node)
        manifest.nodes.append(node)
    _prepare_out(folder, overwrite)
    ca_key, ca_cert = _make_ca(layout.site_id)
    _write_key(folder.ca_key, ca_key)
    _write_atomic(folder.ca_cert, _cert_pem(ca_cert), 0o644)
    # An empty CRL from the start: mosquitto.conf names it, and remove-node only has to rewrite it.
    _write_atomic(folder.crl, _crl_pem(ca_key, ca_cert, []), 0o644)
    server_key = _new_key()
    _write_key(folder.server_key, server_key)
    _write_atomic(folder.server_cert, _cert_pem(_server_cert(server_key, ca_key, ca_cert, options.hostnames)), 0o644)
    passwords = {user: _issue_user(folder, user, ca_key, ca_cert) for user in manifest.users}
    write_password_file(folder.passwd, {user: hash_password(pw) for user, pw in passwords.items()})
    _write_acl(folder, manifest)
    _write_atomic(folder.conf, mosquitto_conf_text(manifest), 0o644)
    (folder.root / "data").mkdir(mode=0o700, exist_ok=True)
    _save_manifest(folder, manifest)
    notes = _grant_broker_access(folder, manifest.broker_user)
    return Provisioned(folder, manifest.site, passwords, notes)


def add_node(folder_path: str | Path, node_id: str) -> Provisioned:
    """Certificate and password for one more node; appended to the password file.

    The ACL needs no change (its ``%u`` pattern already covers any username), unless the id was
    removed before: then its deny entry goes, and only the old certificate stays revoked (CRL).
    Send SIGHUP to Mosquitto so it reloads the ACL and password file.
    """
    folder, manifest = _open(folder_path)
    _check_new_node(manifest, node_id)
    entries = read_password_file(folder.passwd)
    if node_id in entries:
        raise AggregatorError(f"{folder.passwd}: user {node_id!r} already exists")
    ca_key, ca_cert = _load_ca(folder)
    password = _issue_user(folder, node_id, ca_key, ca_cert)
    write_password_file(folder.passwd, {**entries, node_id: hash_password(password)})
    manifest.nodes.append(node_id)
    notes: tuple[str, ...] = ()
    if node_id in manifest.revoked:
        manifest.revoked = [n for n in manifest.revoked if n != node_id]
        _write_acl(folder, manifest)
        # The ACL works by username: a connection the old certificate still has open would get the
        # new node's rights back. A restart closes it, and the CRL keeps it from coming back.
        notes = (f"{node_id} was removed before: restart Mosquitto (not only reload) if that node's old "
                 "certificate may still have a connection open",)
    _save_manifest(folder, manifest)
    return Provisioned(folder, manifest.site, {node_id: password}, notes)


def rotate_password(folder_path: str | Path, user: str) -> Provisioned:
    """New random password for one user; the password file is rewritten atomically (0600, whatever
    the old file's mode), other entries byte for byte as they were.

    The generated TLS listener logs clients in by certificate and never checks a password (see the
    module docstring): the new password matters on a listener without client certificates. There
    Mosquitto uses it after SIGHUP and drops sessions of the old one. To replace a node's leaked key,
    remove the node and add it again (its old certificate is revoked).
    """
    folder, manifest = _open(folder_path)
    entries = read_password_file(folder.passwd)
    if user not in entries:
        raise AggregatorError(f"unknown user {user!r}: {folder.passwd} has {', '.join(entries) or 'no users'}")
    password = _new_password()
    # Credential file first: if we stop in between, the broker still accepts the old password and the
    # new one is on disk to retry with, instead of a hash nobody knows the password of.
    _write_atomic(folder.password_file(user), password, 0o600)
    write_password_file(folder.passwd, {**entries, user: hash_password(password)})
    return Provisioned(folder, manifest.site, {user: password})


def remove_node(folder_path: str | Path, node_id: str) -> Provisioned:
    """Revoke a node: its certificate goes on the CRL, its username is denied everything in the ACL,
    and its password entry, certificate, key and credentials are deleted. Needs ``ca.key`` (the CRL
    is signed by the site CA) and the node's certificate in ``clients/``.

    After SIGHUP Mosquitto refuses the certificate in the TLS handshake and the node's open
    connection, if any, can publish and read nothing; a restart also closes that connection.
    """
    folder, manifest = _open(folder_path)
    # A node of an older folder may carry a name reserved since (aggregator-results): it can go.
    if node_id in RESERVED_USERS and node_id not in manifest.nodes:
        raise AggregatorError(f"{node_id!r} is not a node; it cannot be removed")
    entries = read_password_file(folder.passwd)
    if node_id not in entries and node_id not in manifest.nodes:
        raise AggregatorError(f"unknown node {node_id!r}: {folder.passwd} has {', '.join(entries) or 'no users'}")
    # Revoke first: if anything below fails, the node is still listed and a second run finishes the job.
    ca_key, ca_cert = _load_ca(folder)
    cert = folder.client_cert(node_id)
    if cert.exists() or node_id not in manifest.revoked:  # else revoked by a run that stopped half way
        _revoke(folder, ca_key, ca_cert, _cert_serial(cert, node_id))
    if node_id not in manifest.revoked:
        manifest.revoked.append(node_id)
    _write_acl(folder, manifest)
    write_password_file(folder.passwd, {u: h for u, h in entries.items() if u != node_id})
    for path in (folder.client_cert(node_id), folder.client_key(node_id), folder.password_file(node_id)):
        path.unlink(missing_ok=True)
    manifest.nodes = [n for n in manifest.nodes if n != node_id]
    _save_manifest(folder, manifest)
    # A folder from before revocation existed: its listener ignores the CRL and checks passwords
    # only, so the deleted password entry is what keeps the node out, until the config is fixed.
    return Provisioned(folder, manifest.site, {}, _outdated_conf_notes(folder, manifest))


def upgrade_site(folder_path: str | Path) -> Provisioned:
    """Bring a folder from an older version up to date: issue the results publisher's identity
    (``aggregator-results``: certificate, key, password) when the folder has none, and rewrite the ACL
    so that this identity, no longer ``aggregator``, publishes results. Needs ``ca.key``.

    Returns the new password (none when the folder was current). Then copy the identity's files to the
    aggregator's credentials folder, reload Mosquitto (SIGHUP) and start the aggregator that uses it:
    after the reload an older aggregator, with one identity, can no longer publish results.
    """
    folder, manifest = _open(folder_path)
    passwords: dict[str, str] = {}
    notes: list[str] = []
    if not manifest.results_identity:
        if AGGREGATOR_RESULTS in manifest.nodes:
            raise AggregatorError(f"node {AGGREGATOR_RESULTS!r} has the name of the aggregator's results identity: "
                                  f"remove it (secure remove-node {AGGREGATOR_RESULTS}) and add it under another "
                                  "id, then run upgrade again")
        entries = read_password_file(folder.passwd)
        ca_key, ca_cert = _load_ca(folder)
        password = _issue_user(folder, AGGREGATOR_RESULTS, ca_key, ca_cert)
        write_password_file(folder.passwd, {**entries, AGGREGATOR_RESULTS: hash_password(password)})
        passwords[AGGREGATOR_RESULTS] = password
        manifest.results_identity = True
        if AGGREGATOR_RESULTS in manifest.revoked:
            # A node of that name was removed: its certificate stays on the CRL, but its ACL deny would
            # take every right from the new identity (the ACL works by username), as in add_node.
            manifest.revoked = [n for n in manifest.revoked if n != AGGREGATOR_RESULTS]
            notes.append(f"a removed node was called {AGGREGATOR_RESULTS}: restart Mosquitto (not only reload) "
                         "if its old certificate may still have a connection open")
    _write_acl(folder, manifest)
    _save_manifest(folder, manifest)
    return Provisioned(folder, manifest.site, passwords, (*notes, *_outdated_conf_notes(folder, manifest)))


def _outdated_conf_notes(folder: SiteFolder, manifest: SecurityManifest) -> tuple[str, ...]:
    """What a mosquitto.conf from before certificate logins and revocation lacks, as a note (the
    operator may have edited the file, so it is not rewritten)."""
    crlfile = f"crlfile {manifest.install_dir.rstrip('/')}/broker/crl.pem"
    if crlfile in _read_text(folder.conf).splitlines():
        return ()
    return (f"{folder.conf} does not name the CRL: add `use_identity_as_username true`, "
            f"`use_username_as_clientid true` and `{crlfile}` under its listener "
            "(see configs/mosquitto/mosquitto.conf)",)


def credentials(folder_path: str | Path, user: str) -> Credentials:
    """The files and password of one user, read from the folder."""
    folder = SiteFolder(Path(folder_path))
    secret = folder.password_file(user)
    if not secret.exists():
        raise AggregatorError(f"no credentials for user {user!r} in {folder.root}")
    return Credentials(user, secret.read_text().strip(), folder.ca_cert, folder.client_cert(user),
                       folder.client_key(user), secret)


# --------------------------------------------------------------------------- Mosquitto files
def hash_password(password: str, *, iterations: int = PASSWORD_ITERATIONS, salt: bytes | None = None) -> str:
    """Mosquitto 2's ``$7$`` hash (what follows ``user:`` in the password file).

    ``$7$<iterations>$<base64 12-byte salt>$<base64 PBKDF2-HMAC-SHA512, 64 bytes>``, checked against
    ``mosquitto_passwd`` 2.0.11 output and by authenticating against a real broker (tests).
    """
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES or iterations < 1:
        raise AggregatorError(f"a Mosquitto hash needs a {SALT_BYTES}-byte salt and >= 1 iteration")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(hashed: str, password: str) -> bool:
    """True when ``password`` matches a ``$7$`` hash (as written by us or by mosquitto_passwd)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, expected = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    if not expected:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(expected))
    return hmac.compare_digest(digest, expected)


def read_password_file(path: Path) -> dict[str, str]:
    """``{user: hash}`` in file order; hashes are kept verbatim so rewrites leave other users untouched."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise AggregatorError(f"cannot read password file {path}: {exc.strerror}") from None
    entries: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise AggregatorError(f"{path}:{number}: not a 'user:hash' line")
        entries[user] = hashed
    return entries


def write_password_file(path: Path, entries: dict[str, str]) -> None:
    """Atomically (re)write a Mosquitto password file, so a SIGHUP never reads half of it."""
    _write_atomic(path, "".join(f"{user}:{hashed}\n" for user, hashed in entries.items()), 0o600)


def acl_text(site: str, *, monitor: bool = False, revoked: tuple[str, ...] | list[str] = (),
             results_identity: bool = True) -> str:
    """The site's Mosquitto ACL: nodes write their own subtree and read nothing; the aggregator's
    subscriber reads node traffic and writes nothing, its results publisher writes results and reads
    nothing; removed nodes (``revoked``) nothing at all.

    ``results_identity=False``: the ACL of a folder from before ``aggregator-results`` existed, where
    ``aggregator`` also publishes the results (what the aggregator of that time does).
    """
    base = f"{PREFIX}/{check_id(site, 'site')}"
    lines = [
        f"# Mosquitto 2 ACL for spar-edge site {site!r} (spar-aggregator secure init). Reloaded on SIGHUP.",
        "# Anything not granted here is denied. No line grants read to a node: a node cannot read results,",
        "# other nodes' data or retained lifecycle messages.",
        "",
        "# Each user writes only under its own topic: %u is its username (= node id). A pattern applies to",
        "# every user, so a new node needs no new line. %u must fill a whole topic level; node ids always do.",
        f"pattern write {base}/%u/#",
        "",
    ]
    if results_identity:
        lines += [
            "# The aggregator has two identities, one per MQTT session: the broker keeps one connection per",
            "# identity (use_username_as_clientid), so two sessions of one identity would close each other.",
            f"# '{AGGREGATOR}', the persistent subscriber, reads exactly the node topics it subscribes to and",
            "# writes nothing (acknowledging a message needs no ACL). Deny lines are checked first: this one",
            f"# closes the write the pattern above grants on {base}/{AGGREGATOR}/#.",
            f"user {AGGREGATOR}",
            f"topic deny {base}/{AGGREGATOR}/#",
            f"topic read {base}/+/birth",
            f"topic read {base}/+/state",
            f"topic read {base}/+/data/+",
            "",
            f"# '{AGGREGATOR_RESULTS}', the results publisher, writes results and the aggregator's health",
            "# (its retained state and 'offline' will) and reads nothing; the deny closes the pattern's grant.",
            f"user {AGGREGATOR_RESULTS}",
            f"topic write {base}/{AGGREGATOR}/#",
            f"topic deny {base}/{AGGREGATOR_RESULTS}/#",
        ]
    else:
        lines += [
            "# The aggregator reads exactly the node topics it subscribes to, and publishes results + its health.",
            "# (A folder from before the results identity: `spar-aggregator secure upgrade` splits this user.)",
            f"user {AGGREGATOR}",
            f"topic read {base}/+/birth",
            f"topic read {base}/+/state",
            f"topic read {base}/+/data/+",
            f"topic write {base}/{AGGREGATOR}/#",
        ]
    if monitor:
        lines += [
            "",
            "# Dashboards: read results and aggregator health, write nothing. The pattern above would let",
            f"# '{MONITOR}' write {base}/{MONITOR}/#; deny lines are checked first and close that.",
            f"user {MONITOR}",
            f"topic read {base}/{AGGREGATOR}/#",
            f"topic deny {base}/{MONITOR}/#",
        ]
    if revoked:
        lines += [
            "",
            "# Removed nodes (secure remove-node): their certificates are on the CRL, which Mosquitto checks",
            "# only when a connection starts. These lines take everything from a connection still open.",
        ]
        for node in revoked:
            lines += [f"user {_checked_id(node)}", "topic deny #"]
    return "\n".join(lines) + "\n"


def mosquitto_conf_text(manifest: SecurityManifest) -> str:
    """The site's mosquitto.conf, every setting commented with why."""
    root = manifest.install_dir.rstrip("/")
    data = manifest.data_dir.rstrip("/") + "/"
    limit = WireLimits().max_message_bytes
    sections = [
        f"# Mosquitto 2 configuration for spar-edge site {manifest.site!r}, written by `spar-aggregator secure`.",
        f"# Start: mosquitto -c {root}/mosquitto.conf",
        "# After add-node / rotate-password / remove-node / upgrade: kill -HUP <mosquitto pid> reloads",
        "# passwords, ACL and CRL.",
        "",
        "# One set of security settings for all listeners (password_file and acl_file below apply to each).",
        "per_listener_settings false",
        "# No client without an identity: on the TLS listener its certificate, elsewhere a password.",
        "allow_anonymous false",
        "# Not checked on the TLS listener below (use_identity_as_username: the certificate is the login);",
        "# it gates a listener without client certificates, should you add one (e.g. loopback, local tools).",
        f"password_file {root}/broker/passwd",
        "# Nodes may write only under their own topic; the aggregator reads node traffic, its results publisher",
        "# (user aggregator-results) writes results.",
        f"acl_file {root}/broker/acl",
        "# Started as root, Mosquitto drops to this user: it must be able to read broker/ and ca.crt (also",
        "# on reload, after privileges are dropped) and write the persistence folder.",
        f"user {manifest.broker_user}",
        "",
        "# The only listener, TLS: no plain-text port, so neither passwords nor tokens cross the network in clear.",
        f"listener {manifest.port}",
        "# The site's own CA: the broker accepts client certificates signed by it and nothing else.",
        f"cafile {root}/ca.crt",
        f"certfile {root}/broker/server.crt",
        f"keyfile {root}/broker/server.key",
        "# Mutual TLS: a client without a certificate of the site CA fails the handshake, so a leaked",
        "# password alone is not enough.",
        "require_certificate true",
        "# The certificate's CN (= node id, aggregator, aggregator-results, monitor) is the username, whatever",
        "# username and password the client sends, so the ACL applies to the certificate's owner. Without it",
        "# any node's certificate logs in with another user's password. Mosquitto then checks no password here.",
        "use_identity_as_username true",
        "# ... and the client id: a session belongs to one certificate. Otherwise a node connecting with the",
        "# aggregator's client id takes over the aggregator's persistent session: the aggregator is cut off",
        "# and the messages queued for it are lost (checked with 2.0.11). One connection per identity: the",
        "# aggregator's two sessions have one each (aggregator, aggregator-results).",
        "use_username_as_clientid true",
        "# Certificates of removed nodes (secure remove-node); re-read on SIGHUP, checked at each handshake.",
        f"crlfile {root}/broker/crl.pem",
        "# The lowest TLS version accepted: 1.0 and 1.1 are refused.",
        "tls_version tlsv1.2",
        "",
        "# Persistence: sessions, subscriptions, retained and queued QoS 1 messages survive a restart.",
        "persistence true",
        f"persistence_location {data}",
        "# Mosquitto acknowledges a message before it saves it. With autosave_on_changes the interval counts",
        "# changes, so 1 saves after every change and a SIGKILL loses at most the message being handled (the",
        "# default saves every 1800 s). Each save rewrites the whole database: slow disks and",
        "# very long queues make this expensive; raise the interval if you accept losing that many messages.",
        "autosave_interval 1",
        "autosave_on_changes true",
        "# QoS 1 messages in flight to one client. The aggregator acknowledges a message only once its window",
        "# is stored, so it holds every message of its open windows; the default of 20 stalls sites of > 20 nodes.",
        "max_inflight_messages 1000",
        "# Send small packets at once. Those acknowledgements come late, so the aggregator's TCP ACKs are",
        "# delayed (40 ms), and with Nagle on the broker holds the next messages of a window until one",
        "# arrives: measured 46 ms instead of 5 ms to assemble an 8-node window.",
        "set_tcp_nodelay true",
        "# Messages queued per persistent client while it is away (default 1000): lets the aggregator restart",
        "# or be upgraded without losing the site's traffic meanwhile.",
        "max_queued_messages 100000",
        "# Largest accepted payload, the same as spar_wire.message.WireLimits.max_message_bytes: anything bigger",
        "# would be refused by the aggregator anyway. Mosquitto 2.0 drops it; it answers an MQTT 5 QoS 1",
        "# publisher with a PUBACK code paho cannot parse, so that client reconnects and resends it, again",
        "# and again: keep frames below the limit.",
        f"message_size_limit {limit}",
        "",
        "# Logging to stderr: systemd's journal (or the caller) keeps it. connection_messages logs every",
        "# connect with client id and username, and every refusal: what you need to debug credentials.",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "log_timestamp true",
    ]
    return "\n".join(sections) + "\n"


# --------------------------------------------------------------------------- certificates
def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    # Backdated a little: a node whose clock is a few minutes behind must not see a "future" certificate.
    now = dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(minutes=10), now + dt.timedelta(days=days)


def _name(common_name: str, site: str | None = None):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spar-edge")]
    if site is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, site))
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(site: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _new_key()
    name = _name(f"spar-edge {site} CA", site)
    start, end = _validity(CA_DAYS)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(public_key, subject, ca_key, ca_cert, usage, extra=()):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    start, end = _validity(LEAF_DAYS)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(public_key)
               .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False))
    for extension in extra:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _server_cert(key, ca_key, ca_cert, hostnames: tuple[str, ...]):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    names = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hostnames]
    return _leaf(key.public_key(), _name(hostnames[0]), ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH,
                 [x509.SubjectAlternativeName(names)])


def _client_cert(key, user: str, ca_key, ca_cert):
    from cryptography.x509.oid import ExtendedKeyUsageOID

    return _leaf(key.public_key(), _name(user), ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH)


def _crl_pem(ca_key, ca_cert, revoked) -> bytes:
    """The site CRL listing ``revoked`` (``x509.RevokedCertificate``s), signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    # OpenSSL refuses *every* client while the CRL is "not yet valid" or expired, so its validity is
    # the CA's: a broker box whose clock is behind (booted without NTP) or a CRL never refreshed must
    # not lock the whole site out. Issued from the CA's start, valid until the CA expires.
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(ca_cert.not_valid_before_utc).next_update(ca_cert.not_valid_after_utc)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
               .add_extension(x509.CRLNumber(len(revoked)), critical=False))
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _revoke(folder: SiteFolder, ca_key, ca_cert, serial: int) -> None:
    """Add one certificate serial to ``broker/crl.pem`` (created when a folder predates it)."""
    from cryptography import x509

    revoked = []
    if folder.crl.exists():
        try:
            crl = x509.load_pem_x509_crl(folder.crl.read_bytes())
        except ValueError as exc:
            raise AggregatorError(f"{folder.crl}: not a CRL: {exc}") from None
        if not crl.is_signature_valid(ca_cert.public_key()):
            raise AggregatorError(f"{folder.crl} is not signed by this site's CA; refusing to extend it")
        revoked = list(crl)
    if any(entry.serial_number == serial for entry in revoked):
        return
    revoked.append(x509.RevokedCertificateBuilder().serial_number(serial)
                   .revocation_date(dt.datetime.now(dt.timezone.utc)).build())
    _write_atomic(folder.crl, _crl_pem(ca_key, ca_cert, revoked), 0o644)


def _cert_serial(path: Path, user: str) -> int:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).serial_number
    except OSError as exc:
        raise AggregatorError(f"cannot revoke {user!r}: its certificate {path} is unreadable ({exc.strerror}); "
                              "put the node's copy of it back there and run again") from None
    except ValueError as exc:
        raise AggregatorError(f"cannot revoke {user!r}: {path} is not a certificate: {exc}") from None


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    # Unencrypted PKCS#8: Mosquitto and unattended nodes cannot type a passphrase; 0600 protects it.
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_atomic(path, pem, 0o600)


def _load_ca(folder: SiteFolder):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(folder.ca_key.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(folder.ca_cert.read_bytes())
    except OSError as exc:
        raise AggregatorError(f"cannot read the site CA ({exc.filename}): {exc.strerror}; add-node, remove-node "
                              "and upgrade need ca.key in the security folder") from None
    except ValueError as exc:
        raise AggregatorError(f"{folder.root}: the site CA is unreadable: {exc}") from None
    return key, cert


def _issue_user(folder: SiteFolder, user: str, ca_key, ca_cert) -> str:
    """Key, certificate and password file for one user; returns the new password."""
    key = _new_key()
    _write_key(folder.client_key(user), key)
    _write_atomic(folder.client_cert(user), _cert_pem(_client_cert(key, user, ca_key, ca_cert)), 0o644)
    password = _new_password()
    _write_atomic(folder.password_file(user), password, 0o600)
    return password


def _new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


# --------------------------------------------------------------------------- checks and files
def _load_layout(path: str | Path):
    try:
        return load_site_layout(path)
    except WireError as exc:
        raise AggregatorError(f"site layout: {exc.detail}") from None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_options(options: BrokerOptions) -> None:
    if not options.hostnames:
        raise AggregatorError("give at least one hostname or IP address for the broker certificate")
    for host in options.hostnames:
        if not (_is_ip(host) or _HOSTNAME.fullmatch(host)):
            raise AggregatorError(f"bad hostname {host!r}: use a DNS name (letters, digits, '-', '.') or an IP")
    if isinstance(options.port, bool) or not isinstance(options.port, int) or not 0 < options.port < 65536:
        raise AggregatorError(f"port must be in 1..65535, got {options.port!r}")
    for name in ("install_dir", "data_dir"):
        value = getattr(options, name)
        if value is not None and (not value.startswith("/") or any(c.isspace() for c in value)):
            raise AggregatorError(f"{name} must be an absolute path without spaces (Mosquitto reads it), "
                                  f"got {value!r}")
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", options.broker_user):
        raise AggregatorError(f"broker user {options.broker_user!r} is not a valid Unix user name")


def _checked_id(node_id: str) -> str:
    try:
        return check_id(node_id, "node id")
    except WireError as exc:
        raise AggregatorError(exc.detail) from None


def _check_new_node(manifest: SecurityManifest, node_id: str) -> None:
    _checked_id(node_id)
    if node_id in RESERVED_USERS:
        raise AggregatorError(f"node id {node_id!r} is reserved for the {node_id} user")
    if node_id in manifest.nodes:
        raise AggregatorError(f"node {node_id!r} already exists in site {manifest.site!r}")


def _prepare_out(folder: SiteFolder, overwrite: bool) -> None:
    root = folder.root
    if root.exists() and not root.is_dir():
        raise AggregatorError(f"{root} exists and is not a folder")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise AggregatorError(f"{root} already exists and is not empty; pass --force to replace its "
                                  "certificates and passwords (every node then needs new ones)")
        if not folder.manifest.exists():
            raise AggregatorError(f"{root} has no {MANIFEST_NAME}: not a security folder, refusing to replace it")
        for path in folder.generated():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    for sub, mode in (("broker", 0o700), ("clients", 0o700), ("credentials", 0o700)):
        (root / sub).mkdir(mode=mode, exist_ok=True)


def _grant_broker_access(folder: SiteFolder, broker_user: str) -> tuple[str, ...]:
    """Hand ``broker/`` and ``data/`` to the broker's user: Mosquitto 2.0 reads the password file after
    dropping root privileges (checked: "Unable to open pwfile" otherwise) and saves its database as that
    user. Client keys, credentials and the CA key stay with whoever ran this."""
    import pwd

    paths = [folder.root / "broker", *sorted((folder.root / "broker").iterdir()), folder.root / "data"]
    try:
        account = pwd.getpwnam(broker_user)
    except KeyError:
        account = None
    if os.geteuid() == 0 and account is not None:
        for path in paths:
            os.chown(path, account.pw_uid, account.pw_gid)
        return ()
    where = " ".join(str(p.resolve()) for p in (folder.root / "broker", folder.root / "data"))
    return (f"Mosquitto, running as user {broker_user!r}, must own broker/ and data/ on the broker box: "
            f"sudo chown -R {broker_user}: {where}",)


def _open(folder_path: str | Path) -> tuple[SiteFolder, SecurityManifest]:
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


def _write_acl(folder: SiteFolder, manifest: SecurityManifest) -> None:
    text = acl_text(manifest.site, monitor=manifest.monitor, revoked=manifest.revoked,
                    results_identity=manifest.results_identity)
    _write_atomic(folder.acl, text, 0o644)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise AggregatorError(f"cannot read {path}: {exc.strerror}") from None


def _save_manifest(folder: SiteFolder, manifest: SecurityManifest) -> None:
    _write_atomic(folder.manifest, json.dumps(asdict(manifest), indent=2) + "\n", 0o644)


def _write_atomic(path: Path, data: str | bytes, mode: int) -> None:
    """Write through a temporary file in the same folder and rename: a reader (Mosquitto on SIGHUP)
    never sees half a file, and a crash leaves the old file or the new one.

    The new file gets exactly ``mode``, whatever the old one had: a password file someone made 0640
    must not stay group-readable after a rewrite (secrets are 0600; the broker reads its files as
    their owner, see _grant_broker_access). The owner and group of a file being replaced are kept, so a
    password file chown'ed to the broker's user stays readable by it. Mode and owner are set before
    the first byte is written, so the content is never readable by anyone the final file excludes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    old = path.stat() if path.exists() else None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600, owned by us
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            if old is not None:
                # Only root may give a file away; anyone else writes files it owns already.
                with contextlib.suppress(PermissionError):
                    os.fchown(handle.fileno(), old.st_uid, old.st_gid)
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: without it a power cut can bring back the old file (or none)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
