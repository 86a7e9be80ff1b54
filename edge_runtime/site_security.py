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

This module holds the operations; the parts they share live beside it, each importing only those above
it: :mod:`edge_runtime.site_folder` (the layout and ``security.json``), :mod:`edge_runtime.site_passwords`
(``$7$`` hashes, the password file), :mod:`edge_runtime.site_pki` (CA, certificates, CRL) and
:mod:`edge_runtime.site_broker_config` (ACL, mosquitto.conf).

Every file is written with :func:`spar_wire.atomic_file.write_atomic` (``keep_owner=True``): a reader
(Mosquitto on SIGHUP) never sees half a file, and a crash leaves the old file or the new one. The new
file gets exactly the mode asked for, whatever the old one had: a password file someone made 0640 must not
stay group-readable after a rewrite (secrets are 0600; the broker reads its files as their owner, see
_grant_broker_access). The owner and group of a file being replaced are kept, so a password file chown'ed
to the broker's user stays readable by it. Mode and owner are set before the first byte is written, so
the content is never readable by anyone the final file excludes.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_runtime.errors import AggregatorError
from edge_runtime.site_broker_config import mosquitto_conf_text, outdated_conf_notes, write_acl
from edge_runtime.site_folder import (
    MANIFEST_NAME,
    RESERVED_USERS,
    SecurityManifest,
    SiteFolder,
    check_new_node,
    open_folder,
    save_manifest,
)
from edge_runtime.site_passwords import hash_password, new_password, read_password_file, write_password_file
from edge_runtime.site_pki import (
    cert_pem,
    cert_serial,
    client_cert,
    crl_pem,
    is_ip,
    load_ca,
    make_ca,
    new_key,
    revoke,
    server_cert,
    write_key,
)
from spar_wire.atomic_file import write_atomic
from spar_wire.errors import WireError
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.site_layout import SiteLayout, load_site_layout
from spar_wire.topics import AGGREGATOR_RESULTS

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

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


@dataclass(frozen=True)
class Credentials:
    """What one MQTT user needs to connect."""

    user: str
    password: str
    ca: Path
    cert: Path
    key: Path
    password_file: Path

    def mqtt_settings(self, host: str, port: int, **overrides: object) -> MqttSettings:
        """``MqttSettings`` for this user (TLS with client certificate + username/password);
        ``overrides`` replace any field."""
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
        check_new_node(manifest, node)
        manifest.nodes.append(node)
    _prepare_out(folder, overwrite)
    ca_key, ca_cert = make_ca(layout.site_id)
    write_key(folder.ca_key, ca_key)
    write_atomic(folder.ca_cert, cert_pem(ca_cert), mode=0o644, keep_owner=True)
    # An empty CRL from the start: mosquitto.conf names it, and remove-node only has to rewrite it.
    write_atomic(folder.crl, crl_pem(ca_key, ca_cert, []), mode=0o644, keep_owner=True)
    server_key = new_key()
    write_key(folder.server_key, server_key)
    write_atomic(folder.server_cert, cert_pem(server_cert(server_key, ca_key, ca_cert, options.hostnames)),
                 mode=0o644, keep_owner=True)
    passwords = {user: _issue_user(folder, user, ca_key, ca_cert) for user in manifest.users}
    write_password_file(folder.passwd, {user: hash_password(pw) for user, pw in passwords.items()})
    write_acl(folder, manifest)
    write_atomic(folder.conf, mosquitto_conf_text(manifest), mode=0o644, keep_owner=True)
    (folder.root / "data").mkdir(mode=0o700, exist_ok=True)
    save_manifest(folder, manifest)
    notes = _grant_broker_access(folder, manifest.broker_user)
    return Provisioned(folder, manifest.site, passwords, notes)


def add_node(folder_path: str | Path, node_id: str) -> Provisioned:
    """Certificate and password for one more node; appended to the password file.

    The ACL needs no change (its ``%u`` pattern already covers any username), unless the id was
    removed before: then its deny entry goes, and only the old certificate stays revoked (CRL).
    Send SIGHUP to Mosquitto so it reloads the ACL and password file.
    """
    folder, manifest = open_folder(folder_path)
    check_new_node(manifest, node_id)
    entries = read_password_file(folder.passwd)
    if node_id in entries:
        raise AggregatorError(f"{folder.passwd}: user {node_id!r} already exists")
    ca_key, ca_cert = load_ca(folder)
    password = _issue_user(folder, node_id, ca_key, ca_cert)
    write_password_file(folder.passwd, {**entries, node_id: hash_password(password)})
    manifest.nodes.append(node_id)
    notes: tuple[str, ...] = ()
    if node_id in manifest.revoked:
        manifest.revoked = [n for n in manifest.revoked if n != node_id]
        write_acl(folder, manifest)
        # The ACL works by username: a connection the old certificate still has open would get the
        # new node's rights back. A restart closes it, and the CRL keeps it from coming back.
        notes = (f"{node_id} was removed before: restart Mosquitto (not only reload) if that node's old "
                 "certificate may still have a connection open",)
    save_manifest(folder, manifest)
    return Provisioned(folder, manifest.site, {node_id: password}, notes)


def rotate_password(folder_path: str | Path, user: str) -> Provisioned:
    """New random password for one user; the password file is rewritten atomically (0600, whatever
    the old file's mode), other entries byte for byte as they were.

    The generated TLS listener logs clients in by certificate and never checks a password (see the
    module docstring): the new password matters on a listener without client certificates. There
    Mosquitto uses it after SIGHUP and drops sessions of the old one. To replace a node's leaked key,
    remove the node and add it again (its old certificate is revoked).
    """
    folder, manifest = open_folder(folder_path)
    entries = read_password_file(folder.passwd)
    if user not in entries:
        raise AggregatorError(f"unknown user {user!r}: {folder.passwd} has {', '.join(entries) or 'no users'}")
    password = new_password()
    # Credential file first: if we stop in between, the broker still accepts the old password and the
    # new one is on disk to retry with, instead of a hash nobody knows the password of.
    write_atomic(folder.password_file(user), password, mode=0o600, keep_owner=True)
    write_password_file(folder.passwd, {**entries, user: hash_password(password)})
    return Provisioned(folder, manifest.site, {user: password})


def remove_node(folder_path: str | Path, node_id: str) -> Provisioned:
    """Revoke a node: its certificate goes on the CRL, its username is denied everything in the ACL,
    and its password entry, certificate, key and credentials are deleted. Needs ``ca.key`` (the CRL
    is signed by the site CA) and the node's certificate in ``clients/``.

    After SIGHUP Mosquitto refuses the certificate in the TLS handshake and the node's open
    connection, if any, can publish and read nothing; a restart also closes that connection.
    """
    folder, manifest = open_folder(folder_path)
    # A node of an older folder may carry a name reserved since (aggregator-results): it can go.
    if node_id in RESERVED_USERS and node_id not in manifest.nodes:
        raise AggregatorError(f"{node_id!r} is not a node; it cannot be removed")
    entries = read_password_file(folder.passwd)
    if node_id not in entries and node_id not in manifest.nodes:
        raise AggregatorError(f"unknown node {node_id!r}: {folder.passwd} has {', '.join(entries) or 'no users'}")
    # Revoke first: if anything below fails, the node is still listed and a second run finishes the job.
    ca_key, ca_cert = load_ca(folder)
    cert = folder.client_cert(node_id)
    if cert.exists() or node_id not in manifest.revoked:  # else revoked by a run that stopped half way
        revoke(folder, ca_key, ca_cert, cert_serial(cert, node_id))
    if node_id not in manifest.revoked:
        manifest.revoked.append(node_id)
    write_acl(folder, manifest)
    write_password_file(folder.passwd, {u: h for u, h in entries.items() if u != node_id})
    for path in (folder.client_cert(node_id), folder.client_key(node_id), folder.password_file(node_id)):
        path.unlink(missing_ok=True)
    manifest.nodes = [n for n in manifest.nodes if n != node_id]
    save_manifest(folder, manifest)
    # A folder from before revocation existed: its listener ignores the CRL and checks passwords
    # only, so the deleted password entry is what keeps the node out, until the config is fixed.
    return Provisioned(folder, manifest.site, {}, outdated_conf_notes(folder, manifest))


def upgrade_site(folder_path: str | Path) -> Provisioned:
    """Bring a folder from an older version up to date: issue the results publisher's identity
    (``aggregator-results``: certificate, key, password) when the folder has none, and rewrite the ACL
    so that this identity, no longer ``aggregator``, publishes results. Needs ``ca.key``.

    Returns the new password (none when the folder was current). Then copy the identity's files to the
    aggregator's credentials folder, reload Mosquitto (SIGHUP) and start the aggregator that uses it:
    after the reload an older aggregator, with one identity, can no longer publish results.
    """
    folder, manifest = open_folder(folder_path)
    passwords: dict[str, str] = {}
    notes: list[str] = []
    if not manifest.results_identity:
        if AGGREGATOR_RESULTS in manifest.nodes:
            raise AggregatorError(f"node {AGGREGATOR_RESULTS!r} has the name of the aggregator's results identity: "
                                  f"remove it (secure remove-node {AGGREGATOR_RESULTS}) and add it under another "
                                  "id, then run upgrade again")
        entries = read_password_file(folder.passwd)
        ca_key, ca_cert = load_ca(folder)
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
    write_acl(folder, manifest)
    save_manifest(folder, manifest)
    return Provisioned(folder, manifest.site, passwords, (*notes, *outdated_conf_notes(folder, manifest)))


def credentials(folder_path: str | Path, user: str) -> Credentials:
    """The files and password of one user, read from the folder."""
    folder = SiteFolder(Path(folder_path))
    secret = folder.password_file(user)
    if not secret.exists():
        raise AggregatorError(f"no credentials for user {user!r} in {folder.root}")
    return Credentials(user, secret.read_text().strip(), folder.ca_cert, folder.client_cert(user),
                       folder.client_key(user), secret)


def _issue_user(folder: SiteFolder, user: str, ca_key: CertificateIssuerPrivateKeyTypes,
                ca_cert: x509.Certificate) -> str:
    """Key, certificate and password file for one user; returns the new password."""
    key = new_key()
    write_key(folder.client_key(user), key)
    write_atomic(folder.client_cert(user), cert_pem(client_cert(key, user, ca_key, ca_cert)), mode=0o644,
                 keep_owner=True)
    password = new_password()
    write_atomic(folder.password_file(user), password, mode=0o600, keep_owner=True)
    return password


# --------------------------------------------------------------------------- checks and files
def _load_layout(path: str | Path) -> SiteLayout:
    try:
        return load_site_layout(path)
    except WireError as exc:
        raise AggregatorError(f"site layout: {exc.detail}") from None


def _check_options(options: BrokerOptions) -> None:
    if not options.hostnames:
        raise AggregatorError("give at least one hostname or IP address for the broker certificate")
    for host in options.hostnames:
        if not (is_ip(host) or _HOSTNAME.fullmatch(host)):
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
