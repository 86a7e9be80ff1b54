"""``spar-bench fuzz``: hostile input against a running aggregator (GitHub issue 9, part 3).

A seeded generator turns the site's valid traffic (births and token frames of its real nodes, made
by the node firmware) into hostile messages of named classes: truncated, bit-flipped, wrong CRC,
huge shape headers, decompression bombs, non-finite quantization, wrong feature hash, spoofed node
ids, unicode and malformed topics, random bytes, empty payloads, malformed birth/state JSON,
corrupt header fields and oversize payloads; and what a field site really sees (issue 19): window
starts far in the future or the past with a valid CRC (a node that booted without NTP or a GPS fix),
births with huge but finite positions or a position 50 km away, and a stream of births with
distinct 500-character descriptions. A small, known share of valid traffic ("valid") runs
alongside, so the run also shows the aggregator still accepting real nodes and producing results.

Valid traffic is stamped with this machine's clock (the window grid follows it, one window per valid
block at least), as real nodes stamp theirs: the aggregator refuses starts far from its own clock and
from the other nodes'. The wrong clocks come from a minority of the nodes (``clock_nodes``): a site
where most nodes disagree with one correct node is not "one node with a wrong clock".

The runner starts a private Mosquitto and the real aggregator as a subprocess (``spar-aggregator
run`` with the shipped parking-lot model), publishes everything at QoS 1 with a bounded number in
flight, and attributes outcomes to classes by sending in single-class blocks: after each block it
waits until the aggregator's /metrics has counted every message the broker delivered, so each
block's counter delta belongs to its class. Delivered means PUBACK "success"; Mosquitto answers
"no matching subscribers" for topics outside the aggregator's filters. Topics paho will not send
are counted as refused by the client; topics and sizes Mosquitto answers with a disconnect go
through a throwaway connection each and are counted as refused by the broker.

It checks: the aggregator never exits (zero crashes), logs no traceback and counts nothing as
``internal_error``; every delivered message is counted under exactly one outcome (unaccounted 0);
no hostile message is accepted (description churn excepted: those births are valid, the class is
about what accepting them costs); resident memory (VmRSS) after warm-up grows by a bounded amount;
SIGTERM ends the process with exit code 0; and valid traffic keeps producing results during the
fuzz: every valid window sent after the first hostile message has a stored result (read from the
aggregator's SQLite database after its shutdown), and no stored result holds NaN or infinity. The
valid window after a huge-position block sends its data before its births, so a poisoned position
that was accepted would reach a stored result.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.errors import BenchError
from benchmarks.fuzz_aggregator import aggregator_counts, log_problems, rss_mib, start_aggregator
from benchmarks.fuzz_classes import BROKER_MESSAGE_LIMIT, CLASSES, VALID, FuzzMessage
from benchmarks.fuzz_config import FuzzConfig
from benchmarks.fuzz_generator import FuzzGenerator
from benchmarks.fuzz_publisher import NO_SUBSCRIBERS, SUCCESS, FuzzPublisher, broker_refuses_topic, publish_once
from benchmarks.fuzz_report import ClassTally, FuzzReport
from benchmarks.fuzz_results import check_results
from benchmarks.fuzz_triage import triage
from spar_wire.errors import WireError
from spar_wire.site_layout import load_site_layout
from spar_wire.topics import site_filter
from testbed.aggregator_process import AggregatorProcess
from testbed.local_broker import BrokerSettings, LocalBroker
from testbed.machine import describe_machine

# What benchmarks.cli imports: the settings of a run (defined in fuzz_config, so the triage can read
# them without importing this module) and the run itself.
__all__ = ["FuzzConfig", "run_fuzz"]


class _Run:
    """State of one run: the broker, the aggregator, the publisher, the tallies."""

    def __init__(self, config: FuzzConfig, generator: FuzzGenerator, broker: LocalBroker,
                 aggregator: AggregatorProcess, publisher: FuzzPublisher, workdir: Path):
        self.config, self.generator, self.broker = config, generator, broker
        self.workdir = workdir
        self.aggregator, self.publisher = aggregator, publisher
        # The aggregator's subscriptions: what they match is what the broker must deliver.
        self.filters = [site_filter(generator.site, kind) for kind in ("birth", "state", "data")]
        self.report = FuzzReport(config.seed, config.messages, describe_machine(),
                                 {c: ClassTally() for c in CLASSES}, epoch_ns=generator.epoch_ns)
        self.baseline: Counter[str] = Counter()
        self.delivered_total = 0
        self.deadline = time.monotonic() + config.budget_s

    def send_block(self, messages: list[FuzzMessage], bar: Any) -> None:
        """Publish one block, then wait for every PUBACK (BenchError if they stop coming)."""
        before = self.publisher.snapshot()
        for message in messages:
            tally = self.report.classes[message.cls]
            tally.sent += 1
            tally.variants[message.variant] += 1
            self._send(message, tally)
            bar.update(1)
        if not self.publisher.wait_acked(self.config.drain_timeout_s):
            raise BenchError(f"PUBACKs stopped: {self.publisher.sent - self.publisher.acked} outstanding")
        codes = self.publisher.snapshot() - before
        tally = self.report.classes[messages[0].cls]
        self._add_codes(tally, codes)

    def _send(self, message: FuzzMessage, tally: ClassTally) -> None:
        too_big = len(message.payload) > BROKER_MESSAGE_LIMIT
        if not too_big and not broker_refuses_topic(message.topic):
            if self.publisher.publish(message.topic, message.payload, self.config.drain_timeout_s):
                tally.matched += self._matches(message.topic)
            else:
                tally.client_refused += 1
            return
        try:
            code = publish_once(self.broker.host, self.broker.port, message.topic, message.payload)
        except ValueError:
            tally.client_refused += 1
            return
        if code is None or code >= 0x80:
            tally.broker_refused += 1
        else:  # the prediction was wrong: the broker took it
            self._add_codes(tally, Counter({code: 1}))
            tally.matched += self._matches(message.topic)

    def _matches(self, topic: str) -> bool:
        from paho.mqtt.client import topic_matches_sub

        return any(topic_matches_sub(f, topic) for f in self.filters)

    def _add_codes(self, tally: ClassTally, codes: Counter[int]) -> None:
        tally.acked += sum(codes.values())
        tally.delivered += codes.get(SUCCESS, 0)
        tally.no_subscribers += codes.get(NO_SUBSCRIBERS, 0)
        tally.broker_refused += sum(n for code, n in codes.items() if code >= 0x80)
        self.delivered_total += codes.get(SUCCESS, 0)

    def drain(self) -> Counter[str]:
        """Wait until the aggregator has counted everything delivered so far; its counters then."""
        deadline = min(self.deadline, time.monotonic() + self.config.drain_timeout_s)
        counts: Counter[str] = Counter()
        while time.monotonic() < deadline:
            got = aggregator_counts(self.aggregator)
            if got is not None:
                counts = got
                if sum((counts - self.baseline).values()) >= self.delivered_total:
                    return counts
            if not self.aggregator.alive:
                break
            time.sleep(0.01)
        return counts

    def settle_baseline(self, timeout_s: float = 10.0) -> None:
        """Counters before any fuzz message (the aggregator's own retained state is one of them)."""
        deadline = time.monotonic() + timeout_s
        previous = None
        while time.monotonic() < deadline:
            counts = aggregator_counts(self.aggregator)
            if counts is not None and counts == previous:
                self.baseline = counts
                self.report.baseline = dict(counts)
                return
            previous = counts
            time.sleep(0.3)
        self.baseline = previous or Counter()
        self.report.baseline = dict(self.baseline)

    def check_block(self, index: int, cls: str, counts: Counter[str]) -> str:
        """Why the run cannot go on after this block ("" if it can)."""
        if not self.aggregator.alive:
            self.report.crashes += 1
            return f"the aggregator exited with {self.aggregator.proc.returncode} in block {index} ({cls})"
        if sum((counts - self.baseline).values()) < self.delivered_total:
            return f"block {index} ({cls}) not fully counted in {self.config.drain_timeout_s:.0f} s"
        return ""

    def sample_rss(self, sent: int) -> float | None:
        """VmRSS now, kept as a sample and in the peak."""
        value = rss_mib(self.aggregator.pid)
        if value is not None:
            self.report.rss_samples.append((sent, round(value, 2)))
            self.report.rss_peak_mib = max(value, self.report.rss_peak_mib or 0.0)
        return value


def run_fuzz(config: FuzzConfig, workdir: Path, progress: Callable[[str], None] = lambda text: None) -> FuzzReport:
    """Fuzz a fresh aggregator subprocess with ``config.messages`` messages; see the module docstring."""
    if config.messages < len(CLASSES) * 2:
        raise BenchError(f"--messages must be at least {len(CLASSES) * 2}")
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        layout = load_site_layout(config.site)
        layout.window_s()  # the site's one window length: a site without one fails here, not mid-setup
    except WireError as exc:
        raise BenchError(str(exc)) from None
    progress("building seed messages from the site's nodes")
    generator = FuzzGenerator(layout, config.seed, clock_ns=time.time_ns)
    settings = BrokerSettings(persistence=False, message_size_limit=BROKER_MESSAGE_LIMIT)
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(LocalBroker(settings, workdir=workdir / "broker"))
        progress(f"mosquitto on 127.0.0.1:{broker.port}; starting spar-aggregator")
        aggregator = start_aggregator(workdir, config.site, config.model, broker.port)
        stack.callback(aggregator.kill)
        publisher = FuzzPublisher(broker.host, broker.port, config.max_inflight).start()
        stack.callback(publisher.stop)
        run = _Run(config, generator, broker, aggregator, publisher, workdir)
        run.settle_baseline()
        run.report.rss_idle_mib = run.sample_rss(0)
        _fuzz(run, progress)
        _finish(run)
    return run.report


def _fuzz(run: _Run, progress: Callable[[str], None]) -> None:
    from tqdm import tqdm

    plan = run.generator.plan(run.config.messages, run.config.block_size)
    warmup_blocks = _warmup_length(plan)
    total = sum(n for _, n in plan)
    progress(f"{total:,} messages in {len(plan)} single-class blocks")
    previous = Counter(run.baseline)
    started = time.monotonic()
    with tqdm(total=total, unit="msg", desc="fuzz", disable=not run.config.progress, file=sys.stderr) as bar:
        for index, (cls, count) in enumerate(plan):
            if time.monotonic() > run.deadline:
                run.report.aborted = f"time budget of {run.config.budget_s:.0f} s spent after {index} blocks"
                break
            sent_before = run.report.total("sent")
            messages = run.generator.block(cls, count)
            if cls == VALID:
                run.report.valid_windows.append({"block": index, "sent_before": sent_before,
                                                 "window_start_ns": run.generator.valid_starts[-1], "stored": False})
            elif run.report.first_hostile_block is None:
                run.report.first_hostile_block = index
            try:
                run.send_block(messages, bar)
            except (BenchError, OSError) as exc:  # PUBACKs stopped, or the broker is gone
                run.report.aborted = f"block {index} ({cls}): {exc}"
                break
            counts = run.drain()
            run.report.classes[cls].outcomes.update(counts - previous)
            previous = counts
            run.sample_rss(run.report.total("sent"))
            if index + 1 == warmup_blocks:
                run.report.rss_start_mib = rss_mib(run.aggregator.pid)
            run.report.aborted = run.check_block(index, cls, counts)
            if run.report.aborted:
                break
    run.report.duration_s = time.monotonic() - started


def _warmup_length(plan: list[tuple[str, int]]) -> int:
    """Blocks until every class has been sent once: memory is measured from there on."""
    seen: set[str] = set()
    for index, (cls, _) in enumerate(plan):
        seen.add(cls)
        if seen == set(CLASSES):
            return index + 1
    return len(plan)


def _finish(run: _Run) -> None:
    """Final counters and memory, SIGTERM, exit code, log scan."""
    report = run.report
    report.rss_end_mib = rss_mib(run.aggregator.pid)
    final = aggregator_counts(run.aggregator)
    if final is not None:
        report.overcounted = max(0, sum((final - run.baseline).values()) - run.delivered_total)
    report.publisher_disconnects = run.publisher.disconnects
    run.publisher.stop()
    report.exit_code = run.aggregator.stop()
    report.final_counts = run.aggregator.final_counts()
    report.log_problems = log_problems(run.aggregator.log_text())
    check_results(report, run.workdir / "results.sqlite3", run.generator.window_ns)
    if report.by_reason.get("rejected.internal_error") or report.hostile_accepted():
        report.reproducers = triage(run.generator.layout, run.config, run.workdir / "reproducers",
                                    epoch_ns=report.epoch_ns)
