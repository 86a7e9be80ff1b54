"""Site broker security operations (spar-aggregator secure) against a real Mosquitto: bad input, add and
remove a node, upgrade a folder from an older version, the CLI, and a secured site end to end.

Certificates and revocation: test_site_pki.py; passwords: test_site_passwords.py; what the ACL and
mosquitto.conf allow: test_site_broker_config.py. Their fixtures are in conftest.py.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
from pathlib import Path

import pytest

from edge_runtime.cli import main as aggregator_main
from edge_runtime.errors import AggregatorError
from edge_runtime.site_broker_config import acl_text
from edge_runtime.site_folder import SiteFolder
from edge_runtime.site_passwords import read_password_file, write_password_file
from edge_runtime.site_security import (
    BrokerOptions,
    add_node,
    credentials,
    init_site,
    remove_node,
    rotate_password,
    upgrade_site,
)
from spar_wire.mqtt_settings import MqttSettings
from tests.edge_runtime.site_security_helpers import (
    BASE,
    NOT_AUTHORIZED,
    SITE_TOML,
    aggregator_listening,
    settings,
    tls_outcome,
    wait_for,
)


def test_bad_input_is_an_aggregator_error(site, tmp_path):
    with pytest.raises(AggregatorError, match="already exists"):
        init_site(SITE_TOML, site)
    with pytest.raises(AggregatorError, match="must be 1-64 characters"):
        add_node(site, "n/1")
    for reserved in ("aggregator", "aggregator-results", "monitor"):
        with pytest.raises(AggregatorError, match="reserved"):
            add_node(site, reserved)
        with pytest.raises(AggregatorError, match="not a node"):
            remove_node(site, reserved)
    with pytest.raises(AggregatorError, match="already exists"):
        add_node(site, "n01")
    with pytest.raises(AggregatorError, match="unknown user 'n42'"):
        rotate_password(site, "n42")
    with pytest.raises(AggregatorError, match="unknown node 'n42'"):
        remove_node(site, "n42")
    with pytest.raises(AggregatorError, match="bad hostname"):
        init_site(SITE_TOML, tmp_path / "other", BrokerOptions(hostnames=("bad host",)))
    with pytest.raises(AggregatorError, match="no security.json"):
        add_node(tmp_path, "n09")


def _as_before_the_results_identity(site: Path) -> None:
    """Make ``site`` look like a folder written before aggregator-results existed."""
    folder = SiteFolder(site)
    for path in (folder.client_cert("aggregator-results"), folder.client_key("aggregator-results"),
                 folder.password_file("aggregator-results")):
        path.unlink()
    entries = read_password_file(folder.passwd)
    write_password_file(folder.passwd, {u: h for u, h in entries.items() if u != "aggregator-results"})
    manifest = json.loads(folder.manifest.read_text())
    del manifest["results_identity"]
    folder.manifest.write_text(json.dumps(manifest))
    folder.acl.write_text(acl_text("parking_lot", monitor=True, results_identity=False))


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
    remove_node(site, "n08")
    folder = SiteFolder(site)
    assert folder.acl.read_text() == acl_text("parking_lot", monitor=True, revoked=["n08"],
                                                  results_identity=False)
    assert aggregator_main(["secure", "upgrade", "--dir", str(site)]) == 0
    printed = capsys.readouterr().out
    assert "added aggregator-results" in printed and "kill -HUP" in printed
    assert credentials(site, "aggregator-results").password not in printed
    assert folder.acl.read_text() == acl_text("parking_lot", monitor=True, revoked=["n08"])
    assert "aggregator-results" in read_password_file(folder.passwd)
    assert stat.S_IMODE(folder.client_key("aggregator-results").stat().st_mode) == 0o600
    config = load_config(config_path)
    assert config.mqtt.username == "aggregator" and config.results_mqtt.username == "aggregator-results"
    # Once current, upgrade changes nothing.
    before = read_password_file(folder.passwd)
    assert upgrade_site(site).passwords == {}
    assert read_password_file(folder.passwd) == before
    assert aggregator_main(["secure", "upgrade", "--dir", str(site)]) == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.mosquitto
def test_an_upgraded_folder_lets_the_results_identity_publish(site, broker, sessions):
    _as_before_the_results_identity(site)
    broker.reload()
    old = sessions(settings(site, broker, "aggregator"))  # the older aggregator publishes as 'aggregator'
    # Accepted (0x10: nobody subscribed) once the reload is done.
    assert wait_for(lambda: not old.publish(f"{BASE}/aggregator/results", b"before").is_failure), "ACL not reloaded"
    upgrade_site(site)
    broker.reload()
    assert wait_for(lambda: old.publish(f"{BASE}/aggregator/x", b"?").value == NOT_AUTHORIZED), "ACL not reloaded"
    results = sessions(settings(site, broker, "aggregator-results"))
    assert results.accepted
    assert not results.publish(f"{BASE}/aggregator/results", b"after").is_failure


@pytest.mark.mosquitto
def test_add_node_then_remove_node(site, broker, sessions, tmp_path):
    agg = aggregator_listening(site, broker, sessions)
    add_node(site, "n09")
    broker.reload()
    device = tmp_path / "n09-device"  # what the node keeps after its files leave the security folder
    device.mkdir()
    folder = SiteFolder(site)
    for path in (folder.client_cert("n09"), folder.client_key("n09")):
        shutil.copy(path, device)
    new = settings(site, broker, "n09", tls_cert=str(device / "n09.crt"), tls_key=str(device / "n09.key"))
    assert wait_for(lambda: tls_outcome(new, 2.0) == "accepted", 5.0), "added node refused after SIGHUP"
    node = sessions(new)
    assert node.publish(f"{BASE}/n09/data/geophone", b"hello").value == 0
    assert wait_for(lambda: agg.received(f"{BASE}/n09/data/geophone") == [b"hello"])
    assert node.publish(f"{BASE}/n01/data/geophone", b"spoof").value == NOT_AUTHORIZED

    done = remove_node(site, "n09")
    assert done.notes == ()
    assert "n09" not in read_password_file(folder.passwd)
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
    again = add_node(site, "n09")
    assert again.notes and "restart" in again.notes[0]
    broker.restart()  # as the note says: closes the old certificate's connection
    renewed = settings(site, broker, "n09")
    assert wait_for(lambda: tls_outcome(renewed, 2.0) == "accepted", 5.0), "re-added node refused"
    assert tls_outcome(new) in ("closed", "tls-error")
    assert not sessions(renewed).publish(f"{BASE}/n09/state", b"back").is_failure  # 0x10: nobody listens now


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
    folder = SiteFolder(site)
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
    assert credentials(out_dir, "n01").password not in printed
    assert aggregator_main(["secure", "init", "--site", str(SITE_TOML), "--out", str(out_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert aggregator_main(["secure", "add-node", "--dir", str(out_dir), "bad id"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spar-aggregator secure: error:") and "bad id" in err
    assert aggregator_main(["secure", "add-node", "--dir", str(out_dir), "n09", "--show-password"]) == 0
    assert f"password n09: {credentials(out_dir, 'n09').password}" in capsys.readouterr().out


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
    from testbed.tiny_onnx_model import build_tiny_model

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
