"""The aggregator service: wires ingest, assembly, inference, storage, publishing and metrics.

Two MQTT sessions: a persistent subscriber for the site's node traffic, and a publisher for results
and the retained health state (with an ``offline`` will), on a secure site each with its own identity
(``config.results_mqtt``). A token message is acknowledged to the broker only once the result of its
window is committed to SQLite (``acknowledgements`` owns that rule), so a crash at any point loses
nothing the broker acknowledged to a node: the next process gets it again, and the store keeps one
result per window.

The pipeline, one thread per stage (``pipeline_protocols`` types what each stage needs of the next)::

    paho thread -> [message queue] -> "ingest" thread: MessageProcessor -> WindowAssembler
        -> [window queue] -> "inference" thread: InferenceWorker -> Backend -> ResultSink (SQLite)
        -> Acknowledgements -> MqttIngest.ack (PUBACK); results published by the publisher session
    "deadlines" thread: closes windows at their deadline

Readers (metrics, /healthz, the dashboard) see it only through ``stats()``.

On stop (SIGTERM), the subscriber stops taking messages (what still arrives stays with the broker
for the next session); every message already taken is processed; every window closed by then is
stored, published and its messages acknowledged. Windows still open are left open: their messages
stay unacknowledged and come back to the next process with the rest of their window, so a restart
(an upgrade, a reboot) costs no result and makes no partial one. Only then does the subscriber
disconnect, ``offline`` is announced and the publisher disconnects. ``stop(flush_open=True)`` closes
the open windows with partial results instead, for a last stop.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from edge_runtime import service_health
from edge_runtime.acknowledgements import Acknowledgements
from edge_runtime.aggregator_stats import AggregatorStats, frozen_counts
from edge_runtime.bounded_queue import BoundedQueue
from edge_runtime.clock_guard import ClockGuard, ClockLimits
from edge_runtime.config import AggregatorConfig
from edge_runtime.dashboard import basic_auth, feed_for
from edge_runtime.errors import AggregatorError
from edge_runtime.inference_worker import InferenceWorker, result_payload
from edge_runtime.ingest import MessageProcessor, MqttIngest, RawMessage
from edge_runtime.node_registry import NodeRegistry
from edge_runtime.node_store import NodeStore
from edge_runtime.pipeline_protocols import Backend, ResultDatabase
from edge_runtime.service_metrics import ServiceMetrics
from edge_runtime.site_binding import check_site_binding
from edge_runtime.window_assembler import AssembledWindow, EarlyClose, WindowAssembler
from spar_wire.errors import WireError
from spar_wire.message import window_start_of
from spar_wire.model_manifest import ModelManifest, load_manifest
from spar_wire.mqtt_settings import RefusedPublishes, connect_async, make_client, publish_outcome
from spar_wire.placement_text import PlacementTextEncoder, default_cache_dir, text_model_id
from spar_wire.site_layout import SiteLayout, load_site_layout
from spar_wire.topics import aggregator_topic

if TYPE_CHECKING:
    from paho.mqtt.client import MQTTMessageInfo

log = logging.getLogger(__name__)
# The service's threads (their names show in logs and in /healthz's "thread_dead").
INGEST_THREAD, DEADLINE_THREAD, INFERENCE_THREAD = "ingest", "deadlines", "inference"


def check_compatibility(layout: SiteLayout, manifest: ModelManifest) -> None:
    """AggregatorError unless the model can read this site's windows."""
    problems = []
    for name, requirement in manifest.modalities.items():
        spec = layout.modalities.get(name)
        if spec is None:
            problems.append(f"the model needs modality {name!r}, the site has {sorted(layout.modalities)}")
        elif spec.features.hash != requirement.feature_hash:
            problems.append(f"{name}: site feature hash {spec.features.hash} != model's {requirement.feature_hash}")
    if layout.position_dim != manifest.position_dim:
        problems.append(f"site positions are {layout.position_dim}-D, the model takes {manifest.position_dim}-D")
    low, high = manifest.node_range
    if not low <= len(layout.nodes) <= high:
        problems.append(f"the site has {len(layout.nodes)} nodes, the model takes {low}..{high}")
    if problems:
        raise AggregatorError(f"model {manifest.source} does not fit site {layout.source}: " + "; ".join(problems))


def placement_text_encoder(layout: SiteLayout, manifest: ModelManifest) -> PlacementTextEncoder | None:
    """For a SPAR+LLM model: the description encoder, checked against the one the model was trained
    with and warmed up on the layout's descriptions (a joining node's description embeds on arrival,
    once). None for models that take node_index."""
    if not manifest.needs_text:
        return None
    if manifest.text_model != text_model_id():
        raise AggregatorError(f"model {manifest.source} was trained with description embeddings from "
                              f"{manifest.text_model}, this machine has {text_model_id()}; install that "
                              "version of wordllama")
    encoder = PlacementTextEncoder(default_cache_dir())
    try:
        encoder.warm()
        encoder.embed([node.description for node in layout.nodes])
    except WireError as exc:
        raise AggregatorError(str(exc)) from None
    return encoder


class Aggregator:
    def __init__(self, config: AggregatorConfig, *, backend: Backend | None = None,
                 store: ResultDatabase | None = None):
        self.config = config
        self.started_ns = time.time_ns()
        try:
            self.layout = load_site_layout(config.site)
            self.manifest = load_manifest(config.model)
        except WireError as exc:
            raise AggregatorError(str(exc)) from None
        check_compatibility(self.layout, self.manifest)
        self.site_binding = check_site_binding(self.layout, self.manifest, strict=config.strict_layout)
        self.site = self.layout.site_id
        try:
            window_s = self.layout.window_s(self.manifest.modalities)
        except WireError as exc:
            raise AggregatorError(f"the model's modalities: {exc}") from None
        features = {m: self.layout.modalities[m].features for m in self.manifest.modalities}
        self.metrics = ServiceMetrics()
        # Joined and moved nodes come back from the database before the first message: the backlog
        # after a restart arrives before the retained births (see edge_runtime/node_store.py).
        self.registry = NodeRegistry(self.layout, self.manifest, store=NodeStore(config.database),
                                     max_node_distance_m=config.max_node_distance_m)
        self.window_ns = int(round(window_s * 1e9))
        self.backend = backend if backend is not None else self._load_backend()
        self.store = store if store is not None else self._open_store()
        # The grid phase of an earlier run: a window keeps its identity (grid start) across restarts,
        # which is how a window assembled again from redelivered messages is recognised as stored.
        self.assembler = WindowAssembler(features, window_s, deadline_s=config.deadline_fraction * window_s,
                                         max_open=config.max_open_windows,
                                         node_text=placement_text_encoder(self.layout, self.manifest),
                                         phase_ns=self.store.grid_phase(self.site, self.window_ns),
                                         early=EarlyClose(config.early_close_quantile, config.early_close_margin_s)
                                         if config.early_close else None)
        self._backlog_ns = int(round((config.backlog_after_s + window_s) * 1e9))
        # Backlog windows are never shed (their messages are what the broker kept while we were away);
        # the broker's in-flight limit bounds how many can be held, hence the hard limit.
        self.window_queue = BoundedQueue(config.queue_size, self._drop_window, weight=lambda w: w.message_count,
                                         max_weight=config.max_held_messages, keep=self._keep_window,
                                         hard_limit=config.queue_size + config.broker_max_inflight)
        clock = ClockGuard(ClockLimits(max_ahead_s=config.max_clock_ahead_s, max_behind_s=config.max_clock_behind_s,
                                       max_skew_s=config.max_clock_skew_s))
        self.processor = MessageProcessor(self.site, self.registry, self.assembler, features,
                                          self.window_queue.put, warn=self.metrics.warn,
                                          clock=clock, quiet_s=config.stall_windows * window_s)
        # Its own identity where the config gives one (secure site: one connection per identity, so
        # sharing the subscriber's would make the two sessions close each other).
        self._results_mqtt = config.results_mqtt or config.mqtt
        self._publisher = make_client(self._results_mqtt, f"{self.site}.{config.client_id}-results",
                                      persistent=False,
                                      will=(aggregator_topic(self.site, "state"), self._health("offline")))
        self._publisher.on_connect = self._on_publisher_connect
        self._refused_results = RefusedPublishes()  # the ACL must let us write our own topics
        self._publisher.on_publish = self._refused_results
        self._refusals_logged = 0
        self._publisher_ready = threading.Event()
        subscriber = make_client(config.mqtt, f"{self.site}.{config.client_id}", persistent=True)
        # paho's thread only queues what arrives; the "ingest" thread decodes. When decoding falls
        # behind, the oldest messages are shed here (counted, acknowledged) instead of waiting at the
        # broker, where nothing bounds their latency but its queue limit.
        # Only live token messages are shed. Births and states keep their place in the line (a lost
        # birth would leave a moved node's old position in use). So does backlog, a window that ended
        # more than backlog_after_s ago by the node's clock: after a restart the broker hands over
        # what it kept while we were away, as fast as its in-flight limit allows; shedding it would
        # lose the very messages persistence kept, and the in-flight limit already bounds it.
        self.message_queue = BoundedQueue(config.ingest_queue_size, self._drop_message, keep=self._keep_message,
                                          hard_limit=config.ingest_queue_size + config.broker_max_inflight)
        # A store with results of this site means we ran before: the broker should still hold our session.
        self.ingest = MqttIngest(subscriber, self.site, self._receive,
                                 expect_session=self.store.count(self.site) > 0, on_link=self._link_changed)
        # The one owner of "when is a message acknowledged" (the broker's PUBACKs go through ingest).
        self.acks = Acknowledgements(self.ingest, self.processor)
        self.worker = InferenceWorker(self.backend, self.manifest, self.site, self.window_queue, self.store,
                                      self._publish_result, max_batch=config.max_batch,
                                      max_batch_nodes=config.max_batch_nodes,
                                      window_ns=self.window_ns, observe=self.metrics.observe, acks=self.acks)
        self._pending_results: list[MQTTMessageInfo] = []  # result publishes the broker has not confirmed
        self._pending_lock = threading.Lock()
        self._flush_open = False
        self._stop_ingest_thread = threading.Event()  # finish the queued messages, then end
        self._stop_deadline_thread = threading.Event()  # end (closing the open windows if flushing)
        self._stop_inference_thread = threading.Event()  # finish the queued windows, then end
        self._threads: list[threading.Thread] = []
        self._thread_errors: dict[str, str] = {}  # thread name -> what killed it
        self._started_s: float | None = None  # monotonic, once start() returned
        self._stopping = False
        self.metrics.bind(self.stats)
        self.dashboard = feed_for(self) if config.dashboard and config.metrics_port is not None else None
        self._check_inflight_budget()

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 15.0) -> Aggregator:
        """Connect both sessions, start the threads and the metrics endpoint."""
        self.metrics.start_server(self.config.metrics_host, self.config.metrics_port,
                                  routes=self.dashboard.routes() if self.dashboard else None,
                                  route_auth=basic_auth(self.config.dashboard_password_file))
        self._threads = [threading.Thread(target=self._guarded, args=(name, target), name=name, daemon=True)
                         for name, target in ((INGEST_THREAD, self._ingest_loop),
                                              (DEADLINE_THREAD, self._deadline_loop),
                                              (INFERENCE_THREAD, self._inference_loop))]
        for thread in self._threads:
            thread.start()
        connect_async(self._publisher, self._results_mqtt, persistent=False)
        self._publisher.loop_start()
        connect_async(self.ingest.client, self.config.mqtt, persistent=True)
        self.ingest.client.loop_start()
        if not (self._publisher_ready.wait(timeout_s) and self.ingest.subscribed.wait(timeout_s)):
            self.stop()
            raise AggregatorError(f"could not connect to the broker at {self.config.mqtt.host}:"
                                  f"{self.config.mqtt.port} within {timeout_s:.0f} s")
        if self.ingest.refused_subscriptions:
            refused = "; ".join(self.ingest.refused_subscriptions)
            self.stop()
            raise AggregatorError(f"the broker refused the subscriptions {refused}: this aggregator would receive "
                                  f"nothing. Let user {self.config.mqtt.username or '(anonymous)'} read "
                                  f"spar/v1/{self.site}/+/... in the broker's ACL")
        self._started_s = time.monotonic()
        log.info("aggregator for site %s running model %s@%s on %s", self.site, self.manifest.name,
                 self.manifest.version, getattr(self.backend, "name", type(self.backend).__name__))
        return self

    def stop(self, timeout_s: float = 30.0, *, flush_open: bool = False) -> None:
        """Drain (see the module docstring). Safe to call twice.

        Windows still open are not closed early: their messages stay unacknowledged, and the broker
        hands them to the next session with the rest of their window, which then gives one complete
        result. ``flush_open=True`` closes them now with partial results instead: for a last stop
        (the end of a trial), as any of their messages that come later can no longer be stored.
        """
        self._flush_open = flush_open
        self._stopping = True
        self.ingest.pause()
        deadline = time.monotonic() + timeout_s
        # Each stage ends after the one that feeds it, so every message taken reaches its window.
        self._stop_ingest_thread.set()
        self._join(INGEST_THREAD, deadline)
        self._stop_deadline_thread.set()
        self._join(DEADLINE_THREAD, deadline)
        self._stop_inference_thread.set()
        self._join(INFERENCE_THREAD, deadline)
        # paho writes queued packets in order, so our acknowledgements leave before the DISCONNECT.
        self.ingest.client.disconnect()
        self.ingest.client.loop_stop()
        self._wait_for_result_publishes(deadline)
        if self._publisher_ready.is_set():
            info = self._publisher.publish(aggregator_topic(self.site, "state"), self._health("offline"),
                                           qos=1, retain=True)
            self._wait(info, deadline)
        self._publisher.disconnect()
        self._publisher.loop_stop()
        if self.dashboard is not None:
            self.dashboard.close()  # ends the browsers' event streams before the server goes
        self.metrics.stop_server()
        self.store.close()
        self.registry.close()
        close = getattr(self.backend, "close", None)  # a caller's stand-in backend may have none
        if close:
            close()

    def __enter__(self) -> Aggregator:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ------------------------------------------------------------------ threads
    def _guarded(self, name: str, target: Callable[[], None]) -> None:
        """Run a thread's loop; if it dies, say so in the log and in /healthz (the others go on)."""
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - recorded for /healthz, then the thread ends
            self._thread_errors[name] = repr(exc)[:500]
            log.critical("the %s thread died; the aggregator cannot work without it: %r", name, exc,
                         exc_info=True)

    def dead_threads(self) -> dict[str, str]:
        """Threads that ended while the service runs, name -> what killed it (for /healthz)."""
        if self._started_s is None or self._stopping:
            return {}
        return {t.name: self._thread_errors.get(t.name, "ended") for t in self._threads if not t.is_alive()}

    def _ingest_loop(self) -> None:
        """The ingest thread: decode and assemble queued messages until told to stop and none is left."""
        while True:
            raw = self.message_queue.get(timeout=0.05)
            if raw is not None:
                held = self.processor.handle(raw)  # never raises
                self.acks.message_handled(raw.receipt, held=held)  # never raises
            elif self._stop_ingest_thread.is_set():
                return

    def _deadline_loop(self) -> None:
        """The deadline thread: close windows at their deadline; once told to stop (the ingest thread has
        ended), close the rest if flushing, and end."""
        while not self._stop_deadline_thread.is_set():
            try:
                next_deadline = self.processor.next_deadline_s()
                wait = 0.05 if next_deadline is None else min(0.05, max(0.0, next_deadline - time.monotonic()))
                self._stop_deadline_thread.wait(wait)
                self.processor.tick(time.monotonic())
            except Exception:  # noqa: BLE001 - a dead deadline thread would hold every open window forever
                log.exception("closing windows at their deadline failed")
                time.sleep(0.05)
        if self._flush_open:
            self.processor.flush(time.monotonic())

    def _inference_loop(self) -> None:
        """The inference thread: until told to stop and no window is left (see ``InferenceWorker.run``)."""
        self.worker.run(self._stop_inference_thread)

    def _join(self, name: str, deadline: float) -> None:
        for thread in self._threads:
            if thread.name == name and thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    log.error("%s thread did not finish in time", name)

    # ------------------------------------------------------------------ broker link and overload policy
    def _link_changed(self, up: bool) -> None:
        """No early close across a broker outage (see window_assembler): one assignment, no lock."""
        if up:
            self.assembler.resume_early(time.monotonic())
        else:
            self.assembler.hold_early()

    def _keep_window(self, window: AssembledWindow) -> bool:
        """Not to be shed: a window that ended long ago by this box's clock (backlog)."""
        return window.window_start_ns < time.time_ns() - self._backlog_ns

    def _keep_message(self, raw: RawMessage) -> bool:
        """Not to be shed: lifecycle messages, and token messages of windows long over (backlog)."""
        if raw.topic.endswith(("/birth", "/state")):
            return True
        start_ns = window_start_of(raw.payload)
        return start_ns is not None and start_ns < raw.arrival_ns - self._backlog_ns

    def _drop_message(self, raw: RawMessage) -> None:
        # Shed before decoding, like a window shed before inference: counted and acknowledged.
        self.processor.shed(raw)
        self.metrics.dropped("message")
        self.acks.message_shed(raw.receipt)

    def _drop_window(self, window: AssembledWindow) -> None:
        # Overload policy drops the oldest window on purpose (counted); see acknowledgements.
        self.metrics.dropped("window")
        self.acks.window_shed(window)

    # ------------------------------------------------------------------ publishing
    def _receive(self, raw: RawMessage) -> None:
        """paho's thread: count the message for the dashboard's traffic view, then queue it."""
        if self.dashboard is not None:
            self.dashboard.message(raw.topic, len(raw.payload))
        self.message_queue.put(raw)

    def _publish_result(self, result: dict[str, Any]) -> None:
        if self.dashboard is not None:
            self.dashboard.result(result)
        info = self._publisher.publish(aggregator_topic(self.site, "results"), result_payload(result), qos=1)
        with self._pending_lock:
            self._pending_results = [p for p in self._pending_results if publish_outcome(p) == "pending"]
            self._pending_results.append(info)
        refused = self._refused_results.count
        if refused > self._refusals_logged:
            self._refusals_logged = refused
            user = self._results_mqtt.username or "(anonymous)"
            self.metrics.warn("results_refused", f"the broker refused {refused} result publish(es) so far: may "
                              f"user {user} write spar/v1/{self.site}/aggregator/#? (results are still stored)")

    def _wait_for_result_publishes(self, deadline: float) -> None:
        """Until the broker confirmed the results published (their PUBACKs to us), or ``deadline``."""
        with self._pending_lock:
            pending, self._pending_results = self._pending_results, []
        for info in pending:
            self._wait(info, deadline)

    @staticmethod
    def _wait(info: MQTTMessageInfo, deadline: float) -> None:
        try:
            info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
        except (RuntimeError, ValueError):  # not connected: paho keeps it queued; nothing to wait on
            pass

    def _on_publisher_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if reason_code.is_failure:
                log.error("broker refused the results session: %s", reason_code)
                return
            client.publish(aggregator_topic(self.site, "state"), self._health("online"), qos=1, retain=True)
            self._publisher_ready.set()
        except Exception:  # noqa: BLE001 - never raise in a paho callback
            log.exception("results on_connect failed")

    def _health(self, state: str) -> bytes:
        return json.dumps({"state": state, "site": self.site, "model": f"{self.manifest.name}@"
                           f"{self.manifest.version}", "pid": os.getpid(), "started_ns": self.started_ns,
                           "time_ns": time.time_ns()}).encode()

    def problems(self) -> dict[str, str]:
        """What is wrong now (see ``service_health``)."""
        return service_health.problems(self.stats())

    def stats(self) -> AggregatorStats:
        """A snapshot of every stage's counters and state (any thread): what metrics, /healthz and the
        dashboard read."""
        now_s, now_ns = time.monotonic(), time.time_ns()
        off, site_offset = self.processor.clock_report(now_s, now_ns)
        received_messages, received_bytes = self.processor.traffic()
        ingest, worker = self.ingest, self.worker
        nodes = self.registry.nodes()
        return AggregatorStats(
            site=self.site, model=f"{self.manifest.name}@{self.manifest.version}", taken_s=now_s,
            window_ns=self.window_ns, stall_windows=self.config.stall_windows,
            messages=frozen_counts(self.processor.snapshot_counts()),
            windows=frozen_counts(self.assembler.counts), inference=frozen_counts(worker.snapshot_counts()),
            registry=frozen_counts(self.registry.counts), acknowledgements=frozen_counts(self.acks.snapshot_counts()),
            broker_acks=frozen_counts(ingest.acks), received_messages=received_messages,
            received_bytes=received_bytes, sessions_lost=ingest.sessions_lost,
            connected=ingest.connected.is_set(), refused_subscriptions=tuple(ingest.refused_subscriptions),
            session_lost_s=ingest.session_lost_s, dead_threads=MappingProxyType(self.dead_threads()),
            storage_failing_since_s=worker.storage_failing_since, last_stored_s=worker.last_stored_s,
            last_accepted_s=self.processor.last_accepted_s, accepting_since_s=self.processor.accepting_since_s,
            clock_off_nodes=MappingProxyType({node: MappingProxyType(v) for node, v in off.items()}),
            site_clock_offset_s=site_offset, open_windows=self.assembler.open_windows,
            queued_windows=self.window_queue.qsize(), queued_window_messages=self.window_queue.weight(),
            queued_messages=self.message_queue.qsize(),
            nodes=MappingProxyType({n.id: bool(n.online) for n in nodes}),
            refused_nodes=MappingProxyType(dict(self.registry.refused())))

    # ------------------------------------------------------------------ construction helpers
    def _check_inflight_budget(self) -> None:
        """Warn when the aggregator may hold more unacknowledged messages than the broker allows it:
        the broker would then stop sending and queue the overload itself, unbounded in latency."""
        per_window = sum(len(set(node.modalities) & set(self.manifest.modalities)) for node in self.layout.nodes)
        # Queued windows, undecoded messages, and about three windows being assembled or inferred.
        held = self.config.max_held_messages + self.config.ingest_queue_size + 3 * per_window
        if held > self.config.broker_max_inflight:
            log.warning("this site may hold %d unacknowledged messages (max_held_messages %d + ingest_queue_size "
                        "%d + 3 windows of %d), more than broker_max_inflight %d: raise the broker's "
                        "max_inflight_messages (and broker_max_inflight) or lower the others", held,
                        self.config.max_held_messages, self.config.ingest_queue_size, per_window,
                        self.config.broker_max_inflight)

    def _load_backend(self) -> Backend:
        from edge_runtime.inference import BackendOptions, load_backend

        backend = load_backend(self.manifest, self.config.backend, device=self.config.device,
                               options=BackendOptions(flush_denormals=self.config.flush_denormals))
        backend.warmup(n_nodes=len(self.layout.nodes), batch=1)
        return backend

    def _open_store(self) -> ResultDatabase:
        from edge_runtime.result_store import ResultStore

        self.config.database.parent.mkdir(parents=True, exist_ok=True)
        return ResultStore(self.config.database, retention_rows=self.config.retention_rows,
                           retention_days=self.config.retention_days,
                           synchronous=self.config.synchronous)  # type: ignore[arg-type]

