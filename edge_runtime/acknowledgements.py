"""When the aggregator acknowledges a message to the broker: the product's promise, in one place.

paho's automatic PUBACK is off (``MqttIngest``). A QoS 1 message is acknowledged only once nothing is
lost if the process dies right after: until then the broker keeps it in our persistent session and
redelivers it to the next process. Every decision to acknowledge, or to leave a message with the
broker, is made here:

====================================================  =============================================
the message                                           acknowledged
====================================================  =============================================
held by a window whose result is committed to SQLite  after the commit (``window_stored``); also when
                                                      an earlier run had stored that window already
a late copy of a message of a closed window whose     with that window, after its commit (the copy
result is not committed yet                           joined the window's receipts)
held by no window: lifecycle, rejected, ignored, late at once, once handled (``message_handled``)
for a window already acknowledged
shed before decoding (the ingest queue overflowed)    at once (``message_shed``)
held by a window the window queue shed (overload)     at once (``window_shed``): redelivering it
                                                      would only bring the overload back
held by a window whose inference failed, or whose     when given up (``window_failed``): a
result can never be stored                            redelivery would fail the same way
held by a window unstored at shutdown (the store      never (``window_unstored``): the broker hands
kept failing)                                         it to the next process
held by a window still open at shutdown               never: nothing reports it (``stop(flush_open=
                                                      True)`` closes and stores it instead)
====================================================  =============================================

A closed window gives up its receipts once (``ReceiptHolder.take_receipts``, serialised with
assembly), so a message is never acknowledged twice, and a copy the broker redelivers while the
window waits for its commit joins it instead of being acknowledged before the window is on disk.
The broker session skips receipts of an earlier connection (``MqttIngest.ack``).

No method raises: they run in paho's thread (shedding), the ingest thread and the inference thread,
and a failed acknowledgement leaves the message with the broker, which redelivers it (counted and
logged here).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence

from edge_runtime.pipeline_protocols import BrokerAcks, ReceiptHolder
from edge_runtime.receipts import Receipt
from edge_runtime.window_assembler import AssembledWindow

log = logging.getLogger(__name__)


class Acknowledgements:
    """Owns the acknowledgement of every message the aggregator takes (see the module doc).

    Implements ``pipeline_protocols.WindowAcks`` for the inference worker. ``counts`` (by decision)
    counts receipts: ``acked.<decision>`` sent to the broker session, ``kept.window_unstored`` left
    with the broker, ``failed`` whose acknowledgement raised.
    """

    def __init__(self, broker: BrokerAcks, holder: ReceiptHolder):
        self.broker = broker
        self.holder = holder
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()  # guards counts only

    # ------------------------------------------------------------------ single messages
    def message_handled(self, receipt: Receipt | None, *, held: bool) -> None:
        """A message was processed; ``held``: an open or unstored window now holds its receipt (that
        window acknowledges it), else it is acknowledged now."""
        if receipt is not None and not held:
            self._ack("message_handled", [receipt])

    def message_shed(self, receipt: Receipt | None) -> None:
        """The overload policy dropped a message before decoding (counted by the processor)."""
        if receipt is not None:
            self._ack("message_shed", [receipt])

    # ------------------------------------------------------------------ closed windows
    def window_stored(self, window: AssembledWindow) -> None:
        """The window's result is committed: acknowledge every message it holds, late copies included.
        Call only after the commit returned."""
        self._ack("window_stored", self._take(window))

    def window_shed(self, window: AssembledWindow) -> None:
        """The window queue dropped the window on purpose (overload, counted by the service)."""
        self._ack("window_shed", self._take(window))

    def window_failed(self, window: AssembledWindow) -> None:
        """Inference failed, or its result can never be stored: acknowledge, as redelivery cannot help."""
        self._ack("window_failed", self._take(window))

    def window_unstored(self, window: AssembledWindow) -> None:
        """Shutdown with its result unstored: take its receipts and acknowledge none, so the broker
        hands its messages to the next process."""
        kept = self._take(window)
        if kept:
            self._count("kept.window_unstored", len(kept))

    def snapshot_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    # ------------------------------------------------------------------ internals
    def _take(self, window: AssembledWindow) -> list[Receipt]:
        try:
            return self.holder.take_receipts(window)
        except Exception:  # noqa: BLE001 - never raise into a pipeline thread; the broker keeps them
            log.exception("taking the receipts of window %s failed", window.window_index)
            self._count("failed")
            return []

    def _ack(self, decision: str, receipts: Sequence[Receipt]) -> None:
        if not receipts:
            return
        try:
            self.broker.ack(receipts)
        except Exception:  # noqa: BLE001 - the messages stay with the broker, which redelivers them
            log.exception("acknowledging %d message(s) (%s) failed", len(receipts), decision)
            self._count("failed", len(receipts))
            return
        self._count(f"acked.{decision}", len(receipts))

    def _count(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self.counts[key] += amount


class NoAcknowledgements:
    """``WindowAcks`` that acknowledges nothing: for a worker without a broker (tests, benches)."""

    def window_stored(self, window: AssembledWindow) -> None:
        pass

    def window_failed(self, window: AssembledWindow) -> None:
        pass

    def window_unstored(self, window: AssembledWindow) -> None:
        pass
