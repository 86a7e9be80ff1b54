"""Site broker security (spar-aggregator secure) against a real Mosquitto: TLS, passwords, ACL, operations.

Observed with Mosquitto 2.0.11 and MQTT 5: a refused login gets CONNACK 0x87 (not authorised); a QoS 1
publish outside the node's own topic gets PUBACK 0x87 and is dropped; a SUBSCRIBE without read access
is granted (SUBACK 0x01) but nothing is ever delivered on it; a will on another node's topic is dropped.
On the generated TLS listener the certificate's CN is the username and the client id
(use_identity_as_username, use_username_as_clientid) and no password is checked; passwords gate a
listener without client certificates (``plain_broker``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import re
import shutil
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from benchmarks.local_broker import LocalBroker, find_mosquitto
from edge_runtime import site_security as sec
from edge_runtime.cli import main as aggregator_main
from edge_runtime.errors import AggregatorError
from spar_wire.mqtt_settings import MqttSettings, connect_async, make_client

REPO = Path(__file__).resolve().parents[2]
SITE_TOML = REPO / "configs" / "sites" / "parking_lot.toml"
BASE = "spar/v1/parking_lot"
NOT_AUTHORIZED = 0x87
_ids = itertools.count()


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture
def site(tmp_path) -> Path:
    """A freshly provisioned security folder for parking_lot (with the monitor user)."""
    return sec.init_site(SITE_TOML, tmp_path / "secure", sec.BrokerOptions(monitor=True)).folder.root


@pytest.fixture
def broker(site, tmp_path) -> LocalBroker:
    """Mosquitto running the generated mosquitto.conf, its listener moved to a free loopback port."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` or `sudo apt-get install mosquitto`")
    with LocalBroker(workdir=tmp_path / "broker", config_file=site / "mosquitto.conf") as running:
        yield running


# What the generated config's TLS listener needs and a password listener does not have.
_TLS_OPTIONS = ("cafile", "certfile", "keyfile", "require_certificate", "use_identity_as_username",
                "use_username_as_clientid", "crlfile", "tls_version")


@pytest.fixture
def plain_broker(site, tmp_path) -> LocalBroker:
    """Mosquitto with the generated config, its listener without TLS: where passwords are checked (an
    operator's loopback listener for local tools). Same password file, ACL and reload behaviour."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` or `sudo apt-get install mosquitto`")
    lines = (site / "mosquitto.conf").read_text().splitlines()
    text = "\n".join(line for line in lines if line.split()[:1] not in [[o] for o in _TLS_OPTIONS]) + "\n"
    with LocalBroker(workdir=tmp_path / "plain-broker", config_text=text) as running:
        yield running


def plain(site: Path, broker: LocalBroker, user: str, **overrides) -> MqttSettings:
    """``user``'s username and password, no TLS."""
    return settings(site, broker, user, tls_ca=None, tls_cert=None, tls_key=None, **overrides)


def settings(site: Path, broker: LocalBroker, user: str, **overrides) -> MqttSettings:
    return sec.credentials(site, user).mqtt_settings(broker.host, broker.port, **overrides)


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(predicate())


class Session:
    """An MQTT 5 client that records CONNACK, PUBACK reason codes, messages and disconnects."""

    def __init__(self, mqtt: MqttSettings, *, will: tuple[str, bytes] | None = None):
        self.client = make_client(mqtt, f"test-{next(_ids)}", persistent=False, will=will)
        self.client.reconnect_delay_set(30, 30)  # a refused session must not retry during the test
        self.connack = None
        self.pubacks: dict[int, object] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self.disconnects = 0
        self.client.on_connect = lambda c, u, f, rc, p: setattr(self, "connack", rc)
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, rc)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_disconnect = lambda c, u, f, rc, p: setattr(self, "disconnects", self.disconnects + 1)
        connect_async(self.client, mqtt, persistent=False)
        self.client.loop_start()
        wait_for(lambda: self.connack is not None or self.disconnects > 0)

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, *filters: str) -> None:
        self.subscribed.clear()
        self.client.subscribe([(f, 1) for f in filters])
        assert self.subscribed.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes):
        """Publish at QoS 1 and return the PUBACK reason code (bounded wait)."""
        info = self.client.publish(topic, payload, qos=1)
        assert wait_for(lambda: info.mid in self.pubacks), f"no PUBACK for {topic}"
        return self.pubacks[info.mid]

    def received(self, topic: str) -> list[bytes]:
        return [payload for t, payload in list(self.messages) if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def sessions():
    opened: list[Session] = []

    def open_session(mqtt: MqttSettings, **kwargs) -> Session:
        opened.append(Session(mqtt, **kwargs))
        return opened[-1]

    yield open_session
    for session in opened:
        session.close()


def tls_outcome(mqtt: MqttSettings, timeout_s: float = 5.0) -> str:
    """'accepted', 'refused', 'tls-error' (handshake failed on our side) or 'closed' (broker hung up)."""
    client = make_client(mqtt, f"probe-{next(_ids)}", persistent=False)
    got: dict[str, object] = {}
    client.on_connect = lambda c, u, f, rc, p: got.setdefault("connack", rc)
    client.on_disconnect = lambda c, u, f, rc, p: got.setdefault("closed", rc)
    try:
        client.connect(mqtt.host, mqtt.port, keepalive=10)
    except ssl.SSLError:
        return "tls-error"
    except OSError:
        return "closed"
    deadline = time.monotonic() + timeout_s
    while not got and time.monotonic() < deadline:
        if client.loop(timeout=0.1) != 0:
            got.setdefault("closed", None)
    client.disconnect()
    if "connack" in got:
        return "refused" if got["connack"].is_failure else "accepted"
    return "closed" if got else "no answer"


def aggregator_listening(site, broker, sessions) -> Session:
    agg = sessions(settings(site, broker, "aggregator"))
    assert agg.accepted
    agg.subscribe(f"{BASE}/+/birth", f"{BASE}/+/state", f"{BASE}/+/data/+")
    return agg


# --------------------------------------------------------------------------- provisioning (no broker)
def test_init_writes_keys_0600_and_certificates_for_every_user(site):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = sec.SiteFolder(site)
    users = ["aggregator", "aggregator-results", "monitor", *[f"n0{i}" for i in range(1, 9)]]
    assert list(sec.read_password_file(folder.passwd)) == users
    for path in [folder.ca_key, folder.server_key, folder.passwd,
                 *[folder.client_key(u) for u in users], *[folder.password_file(u) for u in users]]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    ca = x509.load_pem_x509_certificate(folder.ca_cert.read_bytes())
    node = x509.load_pem_x509_certificate(folder.client_cert("n03").read_bytes())
    server = x509.load_pem_x509_certificate(folder.server_cert.read_bytes())
    # use_identity_as_username: the CN is the username the ACL and the password file know.
    for user in users:
        cert = x509.load_pem_x509_certificate(folder.client_cert(user).read_bytes())
        assert [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)] == [user]
    crl = x509.load_pem_x509_crl(folder.crl.read_bytes())
    assert len(crl) == 0 and crl.is_signature_valid(ca.public_key())
    assert crl.last_update_utc <= ca.not_valid_before_utc + dt.timedelta(seconds=1)
    assert crl.next_update_utc >= ca.not_valid_after_utc - dt.timedelta(seconds=1)
    assert node.issuer == ca.subject and isinstance(node.public_key().curve, ec.SECP256R1)
    assert 700 <= (node.not_valid_after_utc - node.not_valid_before_utc).days <= 731
    assert 3640 <= (ca.not_valid_after_utc - ca.not_valid_before_utc).days <= 3651
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    passwords = {sec.credentials(site, u).password for u in users}
    assert len(passwords) == len(users) and min(map(len, passwords)) >= 40


def test_bad_input_is_an_aggregator_error(site, tmp_path):
    with pytest.raises(AggregatorError, match="already exists"):
        sec.init_site(SITE_TOML, site)
    with pytest.raises(AggregatorError, match="must be 1-64 characters"):
        sec.add_node(site, "n/1")
    for reserved in ("aggregator", "aggregator-results", "monitor"):
        with pytest.raises(AggregatorError, match="reserved"):
            sec.add_node(site, reserved)
        with pytest.raises(AggregatorError, match="not a node"):
            sec.remove_node(site, reserved)
    with pytest.raises(AggregatorError, match="already exists"):
        sec.add_node(site, "n01")
    with pytest.raises(AggregatorError, match="unknown user 'n42'"):
        sec.rotate_password(site, "n42")
    with pytest.raises(AggregatorError, match="unknown node 'n42'"):
        sec.remove_node(site, "n42")
    with pytest.raises(AggregatorError, match="bad hostname"):
        sec.init_site(SITE_TOML, tmp_path / "other", sec.BrokerOptions(hostnames=("bad host",)))
    with pytest.raises(AggregatorError, match="no security.json"):
        sec.add_node(tmp_path, "n09")


def test_example_configs_match_what_init_generates():
    manifest = sec.SecurityManifest(site="parking_lot", port=8883, hostnames=["localhost"],
                                    install_dir="/etc/spar-edge/parking_lot",
                                    data_dir="/var/lib/spar-edge/parking_lot", monitor=True, broker_user="mosquitto")

    def settings_of(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]

    example = (REPO / "configs" / "mosquitto")
    assert settings_of(example.joinpath("mosquitto.conf").read_text()) == \
        settings_of(sec.mosquitto_conf_text(manifest))
    assert settings_of(example.joinpath("acl").read_text()) == settings_of(sec.acl_text("parking_lot", monitor=True))


def test_hash_format_matches_mosquitto_passwd(tmp_path):
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(tool).exists():
        pytest.skip("mosquitto_passwd is not installed")
    subprocess.run([tool, "-c", "-b", str(tmp_path / "pw"), "alice", "s3cret"], check=True, timeout=10)
    theirs = sec.read_password_file(tmp_path / "pw")["alice"]
    ours = sec.hash_password("s3cret")
    assert theirs.split("$")[1] == ours.split("$")[1] == "7"
    assert [len(part) for part in theirs.split("$")[3:]] == [len(part) for part in ours.split("$")[3:]]
    assert sec.verify_password(theirs, "s3cret") and not sec.verify_password(theirs, "s3cret!")
    assert sec.verify_password(ours, "s3cret") and not sec.verify_password(ours, "other")


# --------------------------------------------------------------------------- against Mosquitto
@pytest.mark.mosquitto
def test_a_node_certificate_with_the_aggregator_password_gets_no_aggregator_rights(site, broker, sessions):
    """Issue 19: n01's certificate + username "aggregator" + the aggregator's password. Without
    use_identity_as_username Mosquitto logged that in as the aggregator: it read every node's data and
    published results. Now the certificate's CN (n01) is the username, whatever the client sends."""
    agg = aggregator_listening(site, broker, sessions)
    monitor = sessions(settings(site, broker, "monitor"))
    monitor.subscribe(f"{BASE}/aggregator/#")
    aggregator = sec.credentials(site, "aggregator")
    impostor = sessions(settings(site, broker, "n01", username="aggregator", password=aggregator.password))
    assert impostor.accepted
    impostor.subscribe(f"{BASE}/+/birth", f"{BASE}/+/state", f"{BASE}/+/data/+", f"{BASE}/#")
    assert impostor.publish(f"{BASE}/aggregator/results", b"forged result").value == NOT_AUTHORIZED
    assert impostor.publish(f"{BASE}/n02/data/microphone", b"as n02").value == NOT_AUTHORIZED
    assert impostor.publish(f"{BASE}/n01/state", b"as itself").value == 0  # it is n01, nothing more
    node = sessions(settings(site, broker, "n02"))
    assert node.publish(f"{BASE}/n02/data/microphone", b"n02 data").value == 0
    results = sessions(settings(site, broker, "aggregator-results"))
    assert results.publish(f"{BASE}/aggregator/results", b"real result").value == 0
    assert wait_for(lambda: agg.received(f"{BASE}/n02/data/microphone") == [b"n02 data"])
    assert wait_for(lambda: monitor.received(f"{BASE}/aggregator/results") == [b"real result"])
    assert agg.received(f"{BASE}/n01/state") == [b"as itself"]
    assert impostor.messages == []


@pytest.mark.mosquitto
def test_a_node_cannot_take_over_the_aggregators_session(site, broker):
    """Found with issue 19: n01 connecting with the aggregator's client id took over its persistent
    session; the aggregator was cut off and the messages queued for it were gone. The client id is
    the certificate's CN now (use_username_as_clientid), so the two sessions stay apart."""
    agg_id = "parking_lot.aggregator"  # what the aggregator uses: "{site}.{client_id}"
    received: list[bytes] = []
    dropped: list[str] = []

    @contextlib.contextmanager
    def connected(user: str, client_id: str, subscribe: str | None = None):
        """A persistent MQTT 5 session, connected (and subscribed) on entry, disconnected on exit."""
        mqtt = settings(site, broker, user)
        client = make_client(mqtt, client_id, persistent=True)
        client.reconnect_delay_set(30, 30)
        ready = threading.Event()
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(subscribe, qos=1) if subscribe else ready.set()
        client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
        client.on_message = lambda c, u, m: received.append(m.payload)
        client.on_disconnect = lambda c, u, f, rc, p: None if rc.value == 0 else dropped.append(user)
        connect_async(client, mqtt, persistent=True)
        client.loop_start()
        try:
            assert ready.wait(5), f"{user}: no CONNACK / SUBACK"
            yield client
        finally:
            client.disconnect()
            client.loop_stop()

    with connected("aggregator", agg_id, subscribe=f"{BASE}/+/data/+"):
        with connected("n01", agg_id):  # while the aggregator is connected
            time.sleep(0.5)
        assert dropped == [], "a node using the aggregator's client id cut the aggregator off"
    # The aggregator is away: the broker keeps its session and queues what arrives for it.
    with connected("n02", "parking_lot.n02") as node:
        node.publish(f"{BASE}/n02/data/microphone", b"queued", qos=1).wait_for_publish(5)
    with connected("n01", agg_id):  # while the aggregator is away
        time.sleep(0.5)
    assert received == []
    with connected("aggregator", agg_id):
        assert wait_for(lambda: received == [b"queued"]), f"the aggregator's queued message is gone: {received}"


@pytest.mark.mosquitto
def test_the_certificate_is_the_login_on_the_tls_listener(site, broker, sessions):
    """Username and password are not checked on the TLS listener: n01's certificate is n01 with no
    password, a wrong one or another user's name, and never more than n01."""
    agg = aggregator_listening(site, broker, sessions)
    node = settings(site, broker, "n01")
    for mqtt in (dataclasses.replace(node, username=None, password=None),
                 dataclasses.replace(node, password="wrong"),
                 dataclasses.replace(node, username="n02")):
        session = sessions(mqtt)
        assert session.accepted, session.connack
        assert session.publish(f"{BASE}/n02/birth", b"spoof").value == NOT_AUTHORIZED
        assert session.publish(f"{BASE}/n01/birth", b"own").value == 0
    assert wait_for(lambda: agg.received(f"{BASE}/n01/birth") == [b"own"] * 3)
    assert agg.received(f"{BASE}/n02/birth") == []


@pytest.mark.mosquitto
def test_passwords_gate_a_listener_without_certificates(site, plain_broker, sessions):
    node = plain(site, plain_broker, "n01")
    assert sessions(node).accepted
    for mqtt in (dataclasses.replace(node, username=None, password=None),
                 dataclasses.replace(node, password="wrong"),
                 dataclasses.replace(node, username="n02")):  # n01's password is not n02's
        refused = sessions(mqtt)
        assert refused.connack is not None and refused.connack.value in (0x86, NOT_AUTHORIZED), refused.connack


@pytest.mark.mosquitto
def test_tls_needs_the_site_ca_and_a_client_certificate(site, broker, tmp_path):
    other = sec.init_site(SITE_TOML, tmp_path / "other-site").folder
    good = settings(site, broker, "n01")
    assert tls_outcome(good) == "accepted"
    # We do not trust a broker certificate from another CA: the handshake fails on our side.
    assert tls_outcome(dataclasses.replace(good, tls_ca=str(other.ca_cert))) == "tls-error"
    # The broker hangs up on a client without a certificate, or with one from another site's CA.
    assert tls_outcome(dataclasses.replace(good, tls_cert=None, tls_key=None)) in ("closed", "tls-error")
    foreign = dataclasses.replace(good, tls_cert=str(other.client_cert("n01")), tls_key=str(other.client_key("n01")))
    assert tls_outcome(foreign) in ("closed", "tls-error")
    assert tls_outcome(dataclasses.replace(good, tls_ca=None, tls_cert=None, tls_key=None)) in ("closed", "no answer")
    # The broker's own certificate (CN localhost, server use only) is no client identity.
    folder = sec.SiteFolder(site)
    server = dataclasses.replace(good, tls_cert=str(folder.server_cert), tls_key=str(folder.server_key))
    assert tls_outcome(server) in ("closed", "tls-error")


@pytest.mark.mosquitto
def test_a_node_publishes_under_its_own_topic_only(site, broker, sessions):
    agg = aggregator_listening(site, broker, sessions)
    node = sessions(settings(site, broker, "n01"))
    assert node.publish(f"{BASE}/n01/data/microphone", b"own").value == 0
    assert wait_for(lambda: agg.received(f"{BASE}/n01/data/microphone") == [b"own"])
    for foreign in (f"{BASE}/n02/data/microphone", f"{BASE}/n02/birth", f"{BASE}/aggregator/results"):
        assert node.publish(foreign, b"spoof").value == NOT_AUTHORIZED, foreign
    # Messages of one connection are handled in order: once this marker is in, a spoof would be too.
    node.publish(f"{BASE}/n01/state", b"marker")
    assert wait_for(lambda: agg.received(f"{BASE}/n01/state") == [b"marker"])
    assert [t for t, _ in agg.messages] == [f"{BASE}/n01/data/microphone", f"{BASE}/n01/state"]


@pytest.mark.mosquitto
def test_a_node_reads_nothing_and_cannot_fake_another_nodes_will(site, broker, sessions):
    agg = aggregator_listening(site, broker, sessions)
    monitor = sessions(settings(site, broker, "monitor"))
    monitor.subscribe(f"{BASE}/aggregator/#")
    node = sessions(settings(site, broker, "n01"))
    node.subscribe(f"{BASE}/aggregator/results", f"{BASE}/#")  # granted by Mosquitto 2.0, but filtered
    results = sessions(settings(site, broker, "aggregator-results"))
    assert results.publish(f"{BASE}/aggregator/results", b"result").value == 0
    assert wait_for(lambda: monitor.received(f"{BASE}/aggregator/results") == [b"result"])
    assert monitor.publish(f"{BASE}/monitor/birth", b"x").value == NOT_AUTHORIZED  # read-only
    # Both wills fire when their sockets vanish; only the one on the node's own topic is delivered.
    spoofer = sessions(settings(site, broker, "n02"), will=(f"{BASE}/n03/state", b"fake offline"))
    honest = sessions(settings(site, broker, "n04"), will=(f"{BASE}/n04/state", b"offline"))
    for session in (spoofer, honest):
        session.client.loop_stop()
        session.client.socket().close()
    assert wait_for(lambda: agg.received(f"{BASE}/n04/state") == [b"offline"])
    assert agg.received(f"{BASE}/n03/state") == []
    assert node.messages == []


@pytest.mark.mosquitto
def test_the_aggregators_two_identities_have_least_privilege(site, broker, sessions):
    """'aggregator' (the subscriber) reads node traffic and publishes nothing, not even its will;
    'aggregator-results' (the publisher) publishes results and health and reads nothing."""
    agg = aggregator_listening(site, broker, sessions)
    monitor = sessions(settings(site, broker, "monitor"))
    monitor.subscribe(f"{BASE}/aggregator/#")
    results = sessions(settings(site, broker, "aggregator-results"), will=(f"{BASE}/aggregator/state", b"offline"))
    results.subscribe(f"{BASE}/+/birth", f"{BASE}/+/state", f"{BASE}/+/data/+", f"{BASE}/#")
    node = sessions(settings(site, broker, "n01"))
    assert node.publish(f"{BASE}/n01/data/microphone", b"data").value == 0
    assert node.publish(f"{BASE}/n01/birth", b"birth").value == 0
    for topic in (f"{BASE}/aggregator/results", f"{BASE}/aggregator/state", f"{BASE}/aggregator/x",
                  f"{BASE}/n01/data/microphone"):
        assert agg.publish(topic, b"from the subscriber").value == NOT_AUTHORIZED, topic
    assert results.publish(f"{BASE}/aggregator-results/state", b"own subtree").value == NOT_AUTHORIZED
    assert results.publish(f"{BASE}/n01/birth", b"as n01").value == NOT_AUTHORIZED
    assert results.publish(f"{BASE}/aggregator/state", b"online").value == 0
    assert results.publish(f"{BASE}/aggregator/results", b"result").value == 0
    assert wait_for(lambda: monitor.received(f"{BASE}/aggregator/results") == [b"result"])
    assert wait_for(lambda: agg.received(f"{BASE}/n01/birth") == [b"birth"])
    assert agg.received(f"{BASE}/n01/data/microphone") == [b"data"]
    assert results.messages == []
    # Its +/state subscription does not bring the aggregator its own health: the deny covers reads too.
    assert agg.received(f"{BASE}/aggregator/state") == []
    # Wills: the publisher's "offline" is delivered; one the subscriber's identity set on the same topic
    # is not (that session takes agg's connection over: one per identity, and agg is done here).
    spoof = sessions(settings(site, broker, "aggregator"), will=(f"{BASE}/aggregator/state", b"fake offline"))
    for session in (spoof, results):
        session.client.loop_stop()
        session.client.socket().close()
    assert wait_for(lambda: b"offline" in monitor.received(f"{BASE}/aggregator/state"))
    assert monitor.received(f"{BASE}/aggregator/state") == [b"online", b"offline"]


def _as_before_the_results_identity(site: Path) -> None:
    """Make ``site`` look like a folder written before aggregator-results existed."""
    folder = sec.SiteFolder(site)
    for path in (folder.client_cert("aggregator-results"), folder.client_key("aggregator-results"),
                 folder.password_file("aggregator-results")):
        path.unlink()
    entries = sec.read_password_file(folder.passwd)
    sec.write_password_file(folder.passwd, {u: h for u, h in entries.items() if u != "aggregator-results"})
    manifest = json.loads(folder.manifest.read_text())
    del manifest["results_identity"]
    folder.manifest.write_text(json.dumps(manifest))
    folder.acl.write_text(sec.acl_text("parking_lot", monitor=True, results_identity=False))


def test_a_folder_from_before_the_results_identity_names_the_upgrade(site, tmp_path, capsys):
    from edge_runtime.config import load_config

    _as_before_the_results_identity(site)
    config_path = tmp_path / "aggregator.toml"
    config_path.write_text(f'[aggregator]\nsite = "site.toml"\nmodel = "manifest.json"\n'
                           f'[mqtt]\nhost = "localhost"\nport = 8883\ncredentials_dir = "{site}"\n')
    with pytest.raises(AggregatorError) as refused:
        load_config(config_path)
    message = str(refused.value)
    assert "'aggregator-results'" in message and f"spar-aggregator secure upgrade --dir {site}" in message
    assert "aggregator-results.crt" in message  # what is missing
    assert aggregator_main(["run", "--config", str(config_path)]) == 2
    assert "secure upgrade" in capsys.readouterr().err

    # Until the upgrade, operations keep the ACL the older aggregator needs ('aggregator' writes results).
    sec.remove_node(site, "n08")
    folder = sec.SiteFolder(site)
    assert folder.acl.read_text() == sec.acl_text("parking_lot", monitor=True, revoked=["n08"],
                                                  results_identity=False)
    assert aggregator_main(["secure", "upgrade", "--dir", str(site)]) == 0
    printed = capsys.readouterr().out
    assert "added aggregator-results" in printed and "kill -HUP" in printed
    assert sec.credentials(site, "aggregator-results").password not in printed
    assert folder.acl.read_text() == sec.acl_text("parking_lot", monitor=True, revoked=["n08"])
    assert "aggregator-results" in sec.read_password_file(folder.passwd)
    assert stat.S_IMODE(folder.client_key("aggregator-results").stat().st_mode) == 0o600
    config = load_config(config_path)
    assert config.mqtt.username == "aggregator" and config.results_mqtt.username == "aggregator-results"
    # Once current, upgrade changes nothing.
    before = sec.read_password_file(folder.passwd)
    assert sec.upgrade_site(site).passwords == {}
    assert sec.read_password_file(folder.passwd) == before
    assert aggregator_main(["secure", "upgrade", "--dir", str(site)]) == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.mosquitto
def test_an_upgraded_folder_lets_the_results_identity_publish(site, broker, sessions):
    _as_before_the_results_identity(site)
    broker.reload()
    old = sessions(settings(site, broker, "aggregator"))  # the older aggregator publishes as 'aggregator'
    # Accepted (0x10: nobody subscribed) once the reload is done.
    assert wait_for(lambda: not old.publish(f"{BASE}/aggregator/results", b"before").is_failure), "ACL not reloaded"
    sec.upgrade_site(site)
    broker.reload()
    assert wait_for(lambda: old.publish(f"{BASE}/aggregator/x", b"?").value == NOT_AUTHORIZED), "ACL not reloaded"
    results = sessions(settings(site, broker, "aggregator-results"))
    assert results.accepted
    assert not results.publish(f"{BASE}/aggregator/results", b"after").is_failure


@pytest.mark.mosquitto
def test_rotate_password_takes_effect_on_sighup(site, plain_broker, sessions):
    folder = sec.SiteFolder(site)
    before = sec.read_password_file(folder.passwd)
    old = plain(site, plain_broker, "n03")
    connected = sessions(old)
    assert connected.accepted
    done = sec.rotate_password(site, "n03")
    after = sec.read_password_file(folder.passwd)
    assert {u: h for u, h in after.items() if u != "n03"} == {u: h for u, h in before.items() if u != "n03"}
    assert sec.credentials(site, "n03").password == done.passwords["n03"] != old.password
    plain_broker.reload()
    new = plain(site, plain_broker, "n03")
    assert wait_for(lambda: tls_outcome(new, 2.0) == "accepted", 5.0), "new password not accepted after SIGHUP"
    assert tls_outcome(old) == "refused"
    assert wait_for(lambda: connected.disconnects > 0), "the session of the old password was not dropped"


@pytest.mark.mosquitto
def test_rotate_password_leaves_no_group_readable_secret(site, plain_broker):
    """Issue 19: a password file (or credential) someone made 0640 stayed 0640 after a rotation.
    Secrets come out 0600 whatever the old mode, owner kept, and the broker still reads them."""
    folder = sec.SiteFolder(site)
    folder.passwd.chmod(0o640)
    folder.password_file("n03").chmod(0o644)
    sec.rotate_password(site, "n03")
    assert stat.S_IMODE(folder.passwd.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.password_file("n03").stat().st_mode) == 0o600
    assert not [p for p in folder.passwd.parent.iterdir() if p.name.startswith(".")], "temporary file left"
    plain_broker.reload()
    assert wait_for(lambda: tls_outcome(plain(site, plain_broker, "n03"), 2.0) == "accepted", 5.0)


def test_secrets_get_their_mode_before_their_content(site, monkeypatch):
    """An atomic rewrite of a secret: the temporary file is 0600 when its content is fsync'ed and
    when it replaces the old file (0664 here), never wider in between."""
    import os

    modes: list[tuple[str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            assert info.st_size > 0
            modes.append(("fsync", stat.S_IMODE(info.st_mode)))
        return real_fsync(fd)

    def replace(src, dst):
        modes.append(("replace", stat.S_IMODE(os.stat(src).st_mode)))
        return real_replace(src, dst)

    folder = sec.SiteFolder(site)
    folder.passwd.chmod(0o664)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    sec.rotate_password(site, "n05")
    assert modes == [("fsync", 0o600), ("replace", 0o600)] * 2, modes


@pytest.mark.mosquitto
def test_add_node_then_remove_node(site, broker, sessions, tmp_path):
    agg = aggregator_listening(site, broker, sessions)
    sec.add_node(site, "n09")
    broker.reload()
    device = tmp_path / "n09-device"  # what the node keeps after its files leave the security folder
    device.mkdir()
    folder = sec.SiteFolder(site)
    for path in (folder.client_cert("n09"), folder.client_key("n09")):
        shutil.copy(path, device)
    new = settings(site, broker, "n09", tls_cert=str(device / "n09.crt"), tls_key=str(device / "n09.key"))
    assert wait_for(lambda: tls_outcome(new, 2.0) == "accepted", 5.0), "added node refused after SIGHUP"
    node = sessions(new)
    assert node.publish(f"{BASE}/n09/data/geophone", b"hello").value == 0
    assert wait_for(lambda: agg.received(f"{BASE}/n09/data/geophone") == [b"hello"])
    assert node.publish(f"{BASE}/n01/data/geophone", b"spoof").value == NOT_AUTHORIZED

    done = sec.remove_node(site, "n09")
    assert done.notes == ()
    assert "n09" not in sec.read_password_file(folder.passwd)
    assert not folder.client_key("n09").exists() and not folder.password_file("n09").exists()
    broker.reload()
    # The connection still open may do nothing. Polled on a topic nobody reads, until the reload is
    # done: a probe with n09's certificate before that would take its client id over (and cut it off).
    assert wait_for(lambda: node.publish(f"{BASE}/n09/probe", b"?") == NOT_AUTHORIZED), "ACL not reloaded"
    # The CRL refuses the certificate in the handshake.
    assert tls_outcome(new, 2.0) in ("closed", "tls-error"), "removed node got in"
    assert node.publish(f"{BASE}/n09/data/geophone", b"after removal").value == NOT_AUTHORIZED
    assert node.publish(f"{BASE}/n09/state", b"after removal").value == NOT_AUTHORIZED
    assert agg.received(f"{BASE}/n09/data/geophone") == [b"hello"] and agg.received(f"{BASE}/n09/state") == []

    # The id can come back with a new certificate; the old one stays revoked.
    again = sec.add_node(site, "n09")
    assert again.notes and "restart" in again.notes[0]
    broker.restart()  # as the note says: closes the old certificate's connection
    renewed = settings(site, broker, "n09")
    assert wait_for(lambda: tls_outcome(renewed, 2.0) == "accepted", 5.0), "re-added node refused"
    assert tls_outcome(new) in ("closed", "tls-error")
    assert not sessions(renewed).publish(f"{BASE}/n09/state", b"back").is_failure  # 0x10: nobody listens now


def test_remove_node_in_a_folder_from_before_revocation(site):
    """An older folder: no crl.pem, and a mosquitto.conf without the CRL. remove-node creates the CRL
    with the node's serial and says what the config lacks."""
    from cryptography import x509

    folder = sec.SiteFolder(site)
    serial = x509.load_pem_x509_certificate(folder.client_cert("n02").read_bytes()).serial_number
    folder.crl.unlink()
    lines = folder.conf.read_text().splitlines()
    folder.conf.write_text("\n".join(line for line in lines if not line.startswith(("crlfile", "use_"))) + "\n")
    done = sec.remove_node(site, "n02")
    assert len(done.notes) == 1 and "use_identity_as_username true" in done.notes[0]
    assert [entry.serial_number for entry in x509.load_pem_x509_crl(folder.crl.read_bytes())] == [serial]
    assert "user n02\ntopic deny #" in folder.acl.read_text()


def test_remove_node_needs_the_certificate_it_revokes(site):
    folder = sec.SiteFolder(site)
    folder.client_cert("n04").unlink()
    with pytest.raises(AggregatorError, match=r"cannot revoke 'n04'.*put the node's copy"):
        sec.remove_node(site, "n04")
    assert "n04" in sec.read_password_file(folder.passwd)  # nothing changed


@pytest.mark.mosquitto
def test_node_publisher_birth_reaches_the_aggregator_over_tls(site, broker, sessions, parking_lot):
    from node_firmware_sim.mqtt_publisher import NodePublisher
    from spar_wire.lifecycle import parse_birth

    agg = aggregator_listening(site, broker, sessions)
    with NodePublisher(parking_lot, "n06", settings(site, broker, "n06")) as node:
        assert node.connected
        assert wait_for(lambda: agg.received(f"{BASE}/n06/birth"))
    birth = parse_birth(agg.received(f"{BASE}/n06/birth")[0])
    assert birth.node == "n06" and birth.position == (26.0, 30.0)
    assert wait_for(lambda: b"offline" in b"".join(agg.received(f"{BASE}/n06/state")))


# --------------------------------------------------------------------------- CLI
def test_cli_help_lists_the_secure_actions(capsys):
    with pytest.raises(SystemExit) as exit_info:
        aggregator_main(["secure", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(action in out for action in ("init", "add-node", "rotate-password", "remove-node", "upgrade"))


def test_cli_remove_node_prints_what_the_config_lacks(site, capsys):
    folder = sec.SiteFolder(site)
    lines = folder.conf.read_text().splitlines()
    folder.conf.write_text("\n".join(line for line in lines if not line.startswith(("crlfile", "use_"))) + "\n")
    assert aggregator_main(["secure", "remove-node", "--dir", str(site), "n02"]) == 0
    out = capsys.readouterr().out
    assert "node n02 removed" in out and "note: " in out and "use_identity_as_username true" in out


def test_cli_init_keeps_passwords_off_the_terminal_and_refuses_bad_input(tmp_path, capsys):
    out_dir = tmp_path / "secure"
    assert aggregator_main(["secure", "init", "--site", str(SITE_TOML), "--out", str(out_dir),
                            "--hostname", "edge-box.local", "--hostname", "10.0.0.5"]) == 0
    printed = capsys.readouterr().out
    assert "site parking_lot: 10 users" in printed
    assert sec.credentials(out_dir, "n01").password not in printed
    assert aggregator_main(["secure", "init", "--site", str(SITE_TOML), "--out", str(out_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert aggregator_main(["secure", "add-node", "--dir", str(out_dir), "bad id"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spar-aggregator secure: error:") and "bad id" in err
    assert aggregator_main(["secure", "add-node", "--dir", str(out_dir), "n09", "--show-password"]) == 0
    assert f"password n09: {sec.credentials(out_dir, 'n09').password}" in capsys.readouterr().out


def test_a_secured_site_runs_end_to_end_with_per_node_credentials(site, broker, parking_lot, tmp_path, sessions):
    """spar-node run --credentials-dir: each node connects as itself; the aggregator (its config naming
    only the folder) stores complete windows and publishes them to a monitor; a node using another's
    identity is refused and counted as failed, not acknowledged.

    Found after use_username_as_clientid: the aggregator's subscriber and results publisher shared the
    identity "aggregator", so each connection closed the other, for ever ("Client aggregator already
    connected, closing old connection"). The publisher has its own identity now."""
    from edge_runtime.config import load_config
    from edge_runtime.result_store import ResultStore
    from edge_runtime.service import Aggregator
    from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field
    from node_firmware_sim.link_model import LinkConfig, Outage

    model = tmp_path / "model"
    from benchmarks.tiny_onnx_model import build_tiny_model

    build_tiny_model(parking_lot, model)
    config_path = tmp_path / "aggregator.toml"
    config_path.write_text(f'[aggregator]\nsite = "{SITE_TOML}"\nmodel = "{model / "manifest.json"}"\n'
                           f'database = "{tmp_path / "r.sqlite3"}"\nmetrics_port = 0\n'
                           f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\ncredentials_dir = "{site}"\n')
    config = load_config(config_path)
    assert config.mqtt.username == "aggregator" and config.mqtt.tls_cert.endswith("aggregator.crt")
    assert config.results_mqtt.username == "aggregator-results"
    assert config.results_mqtt.tls_cert.endswith("aggregator-results.crt")
    plain = MqttSettings(host=broker.host, port=broker.port)
    monitor = sessions(settings(site, broker, "monitor"))
    monitor.subscribe(f"{BASE}/aggregator/results")
    with Aggregator(config) as aggregator:
        summary = run_field(FieldConfig(layout=parking_lot, source=SourceSpec("sine", 1), duration_s=4.0,
                                        mqtt=plain, credentials_dir=str(site)))
        assert wait_for(lambda: aggregator.worker.snapshot_counts().get("results", 0) == 2, 15)
        assert wait_for(lambda: len(monitor.received(f"{BASE}/aggregator/results")) == 2)
        # A new subscriber gets the retained health: the publisher's session is up, not flapping.
        late = sessions(settings(site, broker, "monitor"))
        late.subscribe(f"{BASE}/aggregator/state")
        assert wait_for(lambda: late.received(f"{BASE}/aggregator/state"))
        assert json.loads(late.received(f"{BASE}/aggregator/state")[-1])["state"] == "online"
        # n02 signs in with n01's identity: the ACL refuses what it publishes under n02.
        impostor = FieldConfig(layout=parking_lot, source=SourceSpec("sine", 1), duration_s=2.0, node_ids=("n02",),
                               mqtt=settings(site, broker, "n01"), link=LinkConfig(outages=(Outage("n01", 0, 1),)))
        refused = run_field(impostor).nodes["n02"]
    total = summary.total()
    assert total.acked == total.published == 32 and total.publish_failed == 0
    stored = ResultStore(tmp_path / "r.sqlite3", readonly=True).query(newest_first=False)
    assert [r["complete"] for r in stored] == [True, True]
    assert refused.published == 2 and refused.acked == 0 and refused.publish_failed == 2
    published = [json.loads(payload) for payload in monitor.received(f"{BASE}/aggregator/results")]
    assert sorted(r["window_start_ns"] for r in published) == [r["window_start_ns"] for r in stored]
    log = "".join(path.read_text() for path in broker.workdir.glob("*.log"))
    # (The impostor above takes n01's session over; the aggregator's two sessions never do.)
    kicked = [line for line in log.splitlines()
              if re.search(r"Client aggregator(-results)? already connected, closing old connection", line)]
    assert kicked == [], kicked
    assert "as aggregator-results" in log  # connection_messages: this is the log of this broker
