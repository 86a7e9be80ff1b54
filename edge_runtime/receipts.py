"""What acknowledging one QoS 1 message to the broker takes.

Its own module, importing nothing of ours, because every stage of the pipeline carries receipts: the
subscriber makes them (``ingest``), windows hold them (``window_assembler``), and ``acknowledgements``
decides when they are sent back to the broker.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Receipt:
    """One QoS 1 message the broker waits for us to acknowledge (PUBACK).

    A receipt names the connection it arrived on: after a reconnect the broker redelivers with new
    packet ids, so a receipt of an earlier connection is never acknowledged (its ``mid`` could name
    another message on the new connection).
    """

    connection: int  # MqttIngest.connection when it arrived
    mid: int  # MQTT packet id on that connection
