"""Pick and start a private MQTT broker: Mosquitto when installed, else the embedded amqtt broker.

Mosquitto is preferred: it speaks MQTT 5 (the aggregator's default), persists sessions across
restarts and is what runs in the field. The amqtt fallback lets the demo run on a machine where
Mosquitto cannot be installed; clients must then use ``broker.protocol`` ("3.1.1").
"""

from __future__ import annotations

from pathlib import Path

from testbed.embedded_broker import INSTALL_HINT as AMQTT_HINT
from testbed.embedded_broker import EmbeddedBroker, amqtt_available
from testbed.errors import TestbedError
from testbed.local_broker import LocalBroker, find_mosquitto

BROKER_KINDS = ("auto", "mosquitto", "amqtt")
MOSQUITTO_HINT = ("install it with `sudo apt-get install mosquitto` (or `brew install mosquitto`, "
                  "or point SPAR_MOSQUITTO at a binary)")


def start_broker(kind: str = "auto", workdir: str | Path | None = None) -> LocalBroker | EmbeddedBroker:
    """Start a broker on a free loopback port and return it running (close it, or use ``with``).

    ``kind``: "mosquitto" requires Mosquitto, "amqtt" forces the embedded broker, "auto" takes
    Mosquitto when :func:`find_mosquitto` finds it, else amqtt. TestbedError says what to install.
    """
    if kind not in BROKER_KINDS:
        raise TestbedError(f"unknown broker kind {kind!r}: choose one of {', '.join(BROKER_KINDS)}")
    if kind == "auto":
        if find_mosquitto() is not None:
            kind = "mosquitto"
        elif amqtt_available():
            kind = "amqtt"
        else:
            raise TestbedError("no MQTT broker available: either install Mosquitto "
                             f"({MOSQUITTO_HINT}) or the embedded amqtt broker ({AMQTT_HINT})")
    if kind == "mosquitto" and find_mosquitto() is None:
        raise TestbedError(f"mosquitto not found: {MOSQUITTO_HINT}; or use the embedded broker "
                         f"(kind 'amqtt', {AMQTT_HINT})")
    if kind == "amqtt" and not amqtt_available():
        raise TestbedError(f"amqtt not found: {AMQTT_HINT}")
    broker = LocalBroker(workdir=workdir) if kind == "mosquitto" else EmbeddedBroker(workdir=workdir)
    try:
        return broker.start()
    except BaseException:
        broker.close()  # removes the temporary directory it made
        raise
