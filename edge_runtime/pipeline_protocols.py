"""The aggregator pipeline's collaborators, as typed Protocols.

    MqttIngest (BrokerAcks) --> MessageProcessor (ReceiptHolder) --> [window queue] -->
        InferenceWorker --Backend--> results --ResultSink--> SQLite --WindowAcks--> Acknowledgements
            --BrokerAcks--> PUBACK

Each stage names what it needs of the next one here, not a concrete class: the service wires the real
ones (``edge_runtime.inference`` backends, ``result_store.ResultStore``, ``ingest.MqttIngest``,
``acknowledgements.Acknowledgements``), tests and benches pass their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from edge_runtime.receipts import Receipt
from edge_runtime.window_assembler import AssembledWindow


class Backend(Protocol):
    """A loaded model that runs batched placement tensors: ``edge_runtime.inference.InferenceBackend``
    (ONNX Runtime, TensorRT). Called from one thread (the inference worker's)."""

    name: str

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every manifest output by name for one batch (leading dim B)."""
        ...

    def warmup(self, n_nodes: int, batch: int = 1) -> float:
        """Run one dummy batch; the seconds it took."""
        ...

    def close(self) -> None:
        """Release the engine; safe to call twice."""
        ...


class ResultSink(Protocol):
    """Where the inference worker commits results (``result_store.ResultStore``)."""

    def validate(self, result: Mapping[str, Any]) -> None:
        """AggregatorError unless ``result`` can be stored (retrying could never store it)."""
        ...

    def insert_new(self, results: list[dict[str, Any]], same_window_ns: int = 0,
                   window_ns: int | None = None) -> list[bool]:
        """Commit the batch in one transaction; per result, True if its window was new. When this
        returns the rows are committed; AggregatorError when nothing was (the caller must not ack)."""
        ...


class ResultDatabase(ResultSink, Protocol):
    """What the service needs of its store besides the worker's ``ResultSink``."""

    def grid_phase(self, site: str, window_ns: int) -> int | None:
        """The site's window-grid phase of an earlier run, None before its first result."""
        ...

    def count(self, site: str | None = None) -> int:
        ...

    def close(self) -> None:
        ...


class BrokerAcks(Protocol):
    """The subscriber session (``ingest.MqttIngest``): sends the PUBACKs of these receipts, skipping
    those of an earlier connection. Any thread."""

    def ack(self, receipts: Sequence[Receipt]) -> None:
        ...


class ReceiptHolder(Protocol):
    """Who holds the receipts of closed windows until they are taken (``ingest.MessageProcessor``,
    around ``WindowAssembler``): ``take_receipts`` is serialised with assembly, so a late copy of a
    message either joins the window's receipts before they are taken or finds the window released."""

    def take_receipts(self, window: AssembledWindow) -> list[Receipt]:
        """The receipts ``window`` holds now, taken once (later calls get none)."""
        ...


class WindowAcks(Protocol):
    """What the inference worker reports about each window it took off the queue
    (``acknowledgements.Acknowledgements``); exactly one call per window, any of them twice is harmless."""

    def window_stored(self, window: AssembledWindow) -> None:
        """Its result is committed to SQLite (new, or stored before): its messages may be acknowledged."""
        ...

    def window_failed(self, window: AssembledWindow) -> None:
        """It can never be stored (inference failed, or its result is invalid): let it go."""
        ...

    def window_unstored(self, window: AssembledWindow) -> None:
        """Shutdown came while its result could not be stored: its messages stay with the broker."""
        ...
