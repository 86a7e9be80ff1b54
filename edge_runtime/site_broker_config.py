"""What the site's Mosquitto is told: its ACL (``broker/acl``) and its ``mosquitto.conf``.

Both are plain text generated from the manifest, every line commented with why, so an operator reading
them on the broker box needs no other document. ``configs/mosquitto/`` ships an example of each, and a test
checks that the examples say what these functions generate.
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.errors import AggregatorError
from edge_runtime.site_folder import MONITOR, SecurityManifest, SiteFolder, checked_id
from spar_wire.atomic_file import write_atomic
from spar_wire.message import WireLimits
from spar_wire.topics import AGGREGATOR, AGGREGATOR_RESULTS, PREFIX, check_id


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
            lines += [f"user {checked_id(node)}", "topic deny #"]
    return "\n".join(lines) + "\n"


def write_acl(folder: SiteFolder, manifest: SecurityManifest) -> None:
    """(Re)write ``broker/acl`` from the manifest; atomic, as Mosquitto may re-read it (SIGHUP) at any time."""
    text = acl_text(manifest.site, monitor=manifest.monitor, revoked=manifest.revoked,
                    results_identity=manifest.results_identity)
    write_atomic(folder.acl, text, mode=0o644, keep_owner=True)


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


def outdated_conf_notes(folder: SiteFolder, manifest: SecurityManifest) -> tuple[str, ...]:
    """What a mosquitto.conf from before certificate logins and revocation lacks, as a note (the
    operator may have edited the file, so it is not rewritten)."""
    crlfile = f"crlfile {manifest.install_dir.rstrip('/')}/broker/crl.pem"
    if crlfile in _read_text(folder.conf).splitlines():
        return ()
    return (f"{folder.conf} does not name the CRL: add `use_identity_as_username true`, "
            f"`use_username_as_clientid true` and `{crlfile}` under its listener "
            "(see configs/mosquitto/mosquitto.conf)",)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise AggregatorError(f"cannot read {path}: {exc.strerror}") from None
