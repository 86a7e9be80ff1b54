"""Shared fixtures: a real Mosquitto on an ephemeral loopback port, site layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.local_broker import LocalBroker, find_mosquitto
from spar_wire.site_layout import SiteLayout, load_site_layout

REPO = Path(__file__).resolve().parents[1]
SITES = REPO / "configs" / "sites"


@pytest.fixture
def mosquitto(tmp_path) -> LocalBroker:
    """A private Mosquitto on 127.0.0.1:<free port>, stopped after the test."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or "
                    "`sudo apt-get install mosquitto`")
    broker = LocalBroker(workdir=tmp_path / "broker")
    with broker:
        yield broker


@pytest.fixture(scope="session")
def parking_lot() -> SiteLayout:
    return load_site_layout(SITES / "parking_lot.toml")
