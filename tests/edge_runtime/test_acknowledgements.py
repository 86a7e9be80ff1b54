"""When messages are acknowledged to the broker (edge_runtime.acknowledgements): the ordering rule
"a window's messages are acknowledged only after its result is committed", late copies, windows
given up and windows left with the broker. Real assembler, processor, worker and SQLite store; the
broker session is a recorder."""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from edge_runtime import inference_worker
from edge_runtime.acknowledgements import Acknowledgements
from edge_runtime.bounded_queue import BoundedQueue
from edge_runtime.inference_worker import InferenceWorker
from edge_runtime.ingest import MessageProcessor
from edge_runtime.node_registry import NodeRegistry
from edge_runtime.receipts import Receipt
from edge_runtime.result_store import ResultStore
from edge_runtime.window_assembler import WindowAssembler
from spar_wire.model_manifest import ModalityRequirement, ModelManifest, TensorSpec

W_NS = 2 * 10**9


class Broker:
    """A ``BrokerAcks`` that records what it acknowledged, and calls ``check`` before each ack."""

    def __init__(self, check=lambda receipts: None):
        self.acked: list[Receipt] = []
        self.check = check

    def ack(self, receipts):
        self.check(list(receipts))
        self.acked.extend(receipts)


@pytest.fixture
def pipeline(parking_lot):
    mods = {name: ModalityRequirement(spec.features.hash, spec.features.n_tokens, spec.features.token_dim)
            for name, spec in parking_lot.modalities.items()}
    manifest = ModelManifest(name="t", version="1", task="classification", artifact_file="m.onnx",
                             artifact_format="onnx", precision="fp32", sha256="0" * 64, position_dim=2,
                             node_range=(1, 64), modalities=mods, inputs=(),
                             outputs=(TensorSpec("logits", "float32", ("batch", 5), "class_logits"),))
    registry = NodeRegistry(parking_lot, manifest)
    features = {m: s.features for m, s in parking_lot.modalities.items()}
    assembler = WindowAssembler(features, 2.0, deadline_s=1.0, max_open=3)
    processor = MessageProcessor(parking_lot.site_id, registry, assembler, features, lambda window: None)
    return SimpleNamespace(layout=parking_lot, registry=registry, assembler=assembler, processor=processor)


def feed(p, window, *, connection=1, first_mid=1, now=5.0):
    """Every message of ``window`` with a receipt each; the windows that closed."""
    closed, mid = [], first_mid
    for node in p.layout.node_ids:
        for modality in p.layout.node(node).modalities:
            cfg = p.layout.modalities[modality].features
            tokens = np.full((cfg.n_tokens, cfg.token_dim), 1.0, np.float32)
            added = p.assembler.add(node, modality, window * W_NS, tokens, p.registry.snapshot(), now,
                                    receipt=Receipt(connection, mid))
            assert added.held
            closed += added.closed
            mid += 1
    return closed, [Receipt(connection, m) for m in range(first_mid, mid)]


def late_copy(p, window, receipt):
    """A redelivered copy of the first message of ``window``: (held, receipt)."""
    node = p.layout.node_ids[0]
    modality = p.layout.node(node).modalities[0]
    cfg = p.layout.modalities[modality].features
    added = p.assembler.add(node, modality, window * W_NS, np.zeros((cfg.n_tokens, cfg.token_dim), np.float32),
                            p.registry.snapshot(), 6.0, receipt=receipt)
    assert added.closed == []
    return added.held


def test_a_window_is_acknowledged_after_it_is_stored_with_the_late_copies_that_joined_it(pipeline):
    broker = Broker()
    acks = Acknowledgements(broker, pipeline.processor)
    (window,), receipts = feed(pipeline, 10)
    assert window.complete and broker.acked == []  # closing a window acknowledges nothing
    copy = Receipt(2, 900)  # the broker redelivered one of its messages after a reconnect
    held = late_copy(pipeline, 10, copy)
    acks.message_handled(copy, held=held)
    assert held and broker.acked == []  # joined the unstored window: not acknowledged on its own
    acks.window_stored(window)
    assert broker.acked == receipts + [copy]
    acks.window_stored(window)
    acks.window_failed(window)
    assert broker.acked == receipts + [copy]  # receipts are taken once: never acknowledged twice
    later = Receipt(2, 901)  # a copy after the window was stored: nothing holds it, acknowledged at once
    held = late_copy(pipeline, 10, later)
    acks.message_handled(later, held=held)
    assert not held and broker.acked == receipts + [copy, later]
    assert acks.snapshot_counts() == {"acked.window_stored": len(receipts) + 1, "acked.message_handled": 1}


def test_windows_given_up_are_acknowledged_and_unstored_ones_stay_with_the_broker(pipeline):
    broker = Broker()
    acks = Acknowledgements(broker, pipeline.processor)
    (failed,), failed_receipts = feed(pipeline, 10, first_mid=1)
    (shed,), shed_receipts = feed(pipeline, 11, first_mid=100)
    (unstored,), unstored_receipts = feed(pipeline, 12, first_mid=200)
    acks.window_unstored(unstored)  # shutdown with the store failing: left for the next process
    assert broker.acked == []
    acks.window_failed(failed)  # inference failed / invalid result: redelivery cannot help
    acks.window_shed(shed)  # overload policy
    assert broker.acked == failed_receipts + shed_receipts
    acks.message_shed(Receipt(1, 500))
    acks.message_shed(None)  # QoS 0: nothing to acknowledge
    acks.message_handled(None, held=False)
    assert broker.acked == failed_receipts + shed_receipts + [Receipt(1, 500)]
    acks.window_stored(unstored)  # its receipts were given up to the broker already
    assert Receipt(1, 200) not in broker.acked
    assert acks.snapshot_counts() == {"kept.window_unstored": len(unstored_receipts),
                                      "acked.window_failed": len(failed_receipts),
                                      "acked.window_shed": len(shed_receipts), "acked.message_shed": 1}


def test_a_failing_acknowledgement_never_raises_into_the_pipeline(pipeline):
    def refuse(receipts):
        raise RuntimeError("socket gone")

    acks = Acknowledgements(Broker(check=refuse), pipeline.processor)
    (window,), receipts = feed(pipeline, 10)
    acks.window_stored(window)
    acks.message_handled(Receipt(1, 77), held=False)
    assert acks.snapshot_counts() == {"failed": len(receipts) + 1}


class Backend:
    name = "fake"

    def run(self, inputs):
        return {"logits": np.zeros((len(inputs["positions"]), 5), np.float32)}


def test_the_worker_acknowledges_a_window_only_once_its_result_is_committed(pipeline, tmp_path, monkeypatch,
                                                                            fail_writes):
    """The ordering rule end to end: the store fails for a while (nothing acknowledged), then commits;
    at every acknowledgement another connection to the database already sees the window's row."""
    monkeypatch.setattr(inference_worker, "RETRY_FIRST_S", 0.02)
    database = tmp_path / "r.sqlite3"
    store = ResultStore(database)
    heal = fail_writes(database)
    seen_at_ack = []

    def committed(receipts):
        with ResultStore(database, readonly=True) as reader:
            seen_at_ack.append(sorted(r["window_index"] for r in reader.query()))

    broker = Broker(check=committed)
    acks = Acknowledgements(broker, pipeline.processor)
    (first,), first_receipts = feed(pipeline, 10, first_mid=1)
    (second,), second_receipts = feed(pipeline, 11, first_mid=100)
    manifest = SimpleNamespace(name="m", version="1", task="t", outputs=(), class_names=())
    worker = InferenceWorker(Backend(), manifest, pipeline.layout.site_id, BoundedQueue(4, lambda item: None),
                             store, lambda result: None, max_batch=4, window_ns=W_NS, acks=acks)
    done = threading.Thread(target=worker.process, args=([first, second],))
    done.start()
    deadline = time.monotonic() + 5
    while worker.snapshot_counts().get("store_failures", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    copy = Receipt(2, 900)  # redelivered while the batch waits for the disk: joins its window
    assert late_copy(pipeline, 10, copy)
    assert broker.acked == [] and store.count() == 0  # failing store: nothing acknowledged
    heal()
    done.join(10)
    assert not done.is_alive()
    assert broker.acked == first_receipts + [copy] + second_receipts
    assert seen_at_ack == [[10, 11], [10, 11]]  # each window's ack came after the batch's commit
