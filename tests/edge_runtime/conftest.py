"""Fixtures of the aggregator tests: the tiny untrained parking-lot model, a disk that fails, and a
secured site with its Mosquitto (the site security tests, helpers in site_security_helpers.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_runtime.site_security import BrokerOptions, init_site
from spar_wire.mqtt_settings import MqttSettings
from testbed.local_broker import LocalBroker, find_mosquitto
from testbed.tiny_onnx_model import build_tiny_model
from tests.edge_runtime.site_security_helpers import SITE_TOML, TLS_OPTIONS, Session


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, parking_lot) -> Path:
    """Folder of the tiny ONNX model for the parking lot (``manifest.json``); read-only."""
    out = tmp_path_factory.mktemp("model")
    build_tiny_model(parking_lot, out)
    return out


@pytest.fixture
def fail_writes() -> Callable[[Path], Callable[[], None]]:
    """``fail_writes(database)`` makes every INSERT into a real result store fail, as a full or failing
    disk does (a trigger that aborts), until the function it returns is called."""
    def fail(database: Path) -> Callable[[], None]:
        conn = sqlite3.connect(database)
        conn.execute("CREATE TRIGGER fail BEFORE INSERT ON results BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
        conn.commit()

        def heal() -> None:
            conn.execute("DROP TRIGGER fail")
            conn.commit()
            conn.close()
        return heal
    return fail


# --------------------------------------------------------------------------- a secured site and its broker
@pytest.fixture
def site(tmp_path) -> Path:
    """A freshly provisioned security folder for parking_lot (with the monitor user)."""
    return init_site(SITE_TOML, tmp_path / "secure", BrokerOptions(monitor=True)).folder.root


@pytest.fixture
def broker(site, tmp_path) -> LocalBroker:
    """Mosquitto running the generated mosquitto.conf, its listener moved to a free loopback port."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` or `sudo apt-get install mosquitto`")
    with LocalBroker(workdir=tmp_path / "broker", config_file=site / "mosquitto.conf") as running:
        yield running


@pytest.fixture
def plain_broker(site, tmp_path) -> LocalBroker:
    """Mosquitto with the generated config, its listener without TLS: where passwords are checked (an
    operator's loopback listener for local tools). Same password file, ACL and reload behaviour."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` or `sudo apt-get install mosquitto`")
    lines = (site / "mosquitto.conf").read_text().splitlines()
    text = "\n".join(line for line in lines if line.split()[:1] not in [[o] for o in TLS_OPTIONS]) + "\n"
    with LocalBroker(workdir=tmp_path / "plain-broker", config_text=text) as running:
        yield running


@pytest.fixture
def sessions():
    opened: list[Session] = []

    def open_session(mqtt: MqttSettings, **kwargs) -> Session:
        opened.append(Session(mqtt, **kwargs))
        return opened[-1]

    yield open_session
    for session in opened:
        session.close()
