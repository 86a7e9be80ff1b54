"""What one ``spar-bench fuzz`` run found: per-class tallies, the pass/fail checks, and the report
files (fuzz.json, fuzz.md).

The checks live on :class:`FuzzReport` so a report read back from JSON and a live run judge alike;
see :meth:`FuzzReport.problems` for the bar a run must clear.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from benchmarks.fuzz_classes import ACCEPTED_CLASSES, BASE_EPOCH_NS, EXPECTED, SHED, is_rejection

RSS_BOUND_MIB = 50.0  # growth after warm-up that counts as a problem


@dataclass
class ClassTally:
    """What happened to one class's messages."""

    sent: int = 0
    client_refused: int = 0  # paho would not send the topic
    broker_refused: int = 0  # Mosquitto dropped the connection or answered a failure code
    acked: int = 0  # PUBACK received
    no_subscribers: int = 0  # acknowledged, delivered to nobody (topic outside the aggregator's filters)
    delivered: int = 0  # acknowledged with Success: the aggregator got it
    matched: int = 0  # accepted by the broker, topic matching the aggregator's filters (must equal delivered)
    outcomes: Counter[str] = field(default_factory=Counter)  # aggregator counter deltas
    variants: Counter[str] = field(default_factory=Counter)

    @property
    def counted(self) -> int:
        """Messages the aggregator counted for this class, whatever the outcome."""
        return sum(self.outcomes.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k not in ("outcomes", "variants")},
                "counted": self.counted, "outcomes": dict(sorted(self.outcomes.items())),
                "variants": dict(sorted(self.variants.items()))}


@dataclass
class FuzzReport:
    """One fuzz run: per-class tallies, totals, memory, process health."""

    seed: int
    messages: int  # planned
    machine: str
    classes: dict[str, ClassTally]
    duration_s: float = 0.0  # first publish -> last block counted
    rss_idle_mib: float | None = None  # after start-up, before any message
    rss_start_mib: float | None = None  # after the warm-up round (every class once)
    rss_peak_mib: float | None = None
    rss_end_mib: float | None = None
    rss_samples: list[tuple[int, float]] = field(default_factory=list)  # (messages sent, MiB)
    crashes: int = 0  # the aggregator exited before SIGTERM
    exit_code: int | None = None  # after SIGTERM; None = had to be killed
    log_problems: list[str] = field(default_factory=list)  # ERROR lines, and what each traceback raised
    reproducers: list[dict[str, Any]] = field(default_factory=list)  # see triage()
    overcounted: int = 0  # counted beyond what was delivered (a message counted twice)
    publisher_disconnects: int = 0  # the main session lost: would resend, so counts become unreliable
    baseline: dict[str, int] = field(default_factory=dict)  # counters before the first fuzz message
    final_counts: dict[str, int] = field(default_factory=dict)  # the aggregator's own, printed at exit
    aborted: str = ""  # why the run stopped early, if it did
    epoch_ns: int = BASE_EPOCH_NS  # the generator's first window start (triage regenerates from it)
    # One per valid block: block index, messages sent before it, its window start, whether a result
    # for that window was stored (filled from the database after shutdown).
    valid_windows: list[dict[str, Any]] = field(default_factory=list)
    first_hostile_block: int | None = None
    results_stored: int = 0  # rows in the aggregator's result database after shutdown
    results_non_finite: int = 0  # of those, with NaN or +-inf anywhere in the payload
    results_unmatched: int = 0  # of those, for a window no valid block sent
    results_error: str = ""  # why the database could not be read

    # ---------------------------------------------------------------- totals
    def total(self, name: str) -> int:
        """A ClassTally field summed over the classes."""
        return sum(getattr(t, name) for t in self.classes.values())

    @property
    def counted(self) -> int:
        """Messages the aggregator counted, all classes."""
        return sum(t.counted for t in self.classes.values())

    @property
    def unaccounted(self) -> int:
        """Delivered but not counted (negative: counted more than delivered)."""
        return self.total("delivered") - self.counted

    @property
    def by_reason(self) -> Counter[str]:
        """Counted messages by outcome, all classes."""
        out: Counter[str] = Counter()
        for tally in self.classes.values():
            out.update(tally.outcomes)
        return out

    @property
    def exit_counted(self) -> int | None:
        """Messages the aggregator's exit line counted beyond the baseline (None: no exit line)."""
        if not self.final_counts:
            return None
        return sum(self.final_counts.values()) - sum(self.baseline.values())

    @property
    def rss_growth_mib(self) -> float | None:
        """VmRSS at the end minus after warm-up; None if either is missing."""
        if self.rss_start_mib is None or self.rss_end_mib is None:
            return None
        return self.rss_end_mib - self.rss_start_mib

    @property
    def messages_per_s(self) -> float:
        """Messages sent per second of fuzzing, waits for the aggregator to count them included."""
        return self.total("sent") / self.duration_s if self.duration_s > 0 else 0.0

    def hostile_accepted(self) -> dict[str, int]:
        """Hostile messages the aggregator accepted, per class (should be none; classes of valid
        messages, ACCEPTED_CLASSES, are not counted)."""
        out = {c: sum(n for o, n in t.outcomes.items() if not is_rejection(o))
               for c, t in self.classes.items() if c not in ACCEPTED_CLASSES}
        return {c: n for c, n in out.items() if n}

    @property
    def valid_during_fuzz(self) -> list[dict[str, Any]]:
        """Valid windows sent after the first hostile block."""
        first = self.first_hostile_block
        return [] if first is None else [w for w in self.valid_windows if w["block"] > first]

    @property
    def valid_missing(self) -> list[dict[str, Any]]:
        """Valid windows sent during the fuzz with no stored result (should be none)."""
        return [w for w in self.valid_during_fuzz if not w["stored"]]

    def _missing_text(self) -> str:
        missing = self.valid_missing
        if not missing:
            return ""
        return (f"{len(missing)} of {len(self.valid_during_fuzz)} valid windows sent during the fuzz have no "
                f"stored result (first missing: block {missing[0]['block']}, after {missing[0]['sent_before']:,} "
                "messages)")

    def unexpected(self) -> dict[str, dict[str, int]]:
        """Outcomes outside each class's expected set (``shed``, the overload policy's, fits any class)."""
        out = {c: {o: n for o, n in t.outcomes.items() if o not in EXPECTED[c] and o != SHED}
               for c, t in self.classes.items()}
        return {c: o for c, o in out.items() if o}

    def problems(self, rss_bound_mib: float = RSS_BOUND_MIB) -> list[str]:
        """Every way this run failed the issue's bar; empty when it passed."""
        checks = [
            (bool(self.aborted), f"run aborted: {self.aborted}"),
            (self.crashes > 0, f"the aggregator crashed ({self.crashes})"),
            (self.exit_code != 0, f"exit code after SIGTERM: {self.exit_code}"),
            (self.unaccounted != 0, f"{self.unaccounted} delivered message(s) not counted"),
            (self.overcounted != 0, f"{self.overcounted} message(s) counted beyond delivery"),
            (self.exit_counted != self.total("delivered"),
             f"the aggregator's exit line counts {self.exit_counted}, {self.total('delivered')} were delivered"),
            (self.by_reason.get("rejected.internal_error", 0) > 0,
             f"{self.by_reason.get('rejected.internal_error', 0)} internal_error(s)"),
            (bool(self.log_problems), f"{len(self.log_problems)} error/traceback log line(s)"),
            (bool(self.hostile_accepted()), f"hostile messages accepted: {self.hostile_accepted()}"),
            (self.total("matched") != self.total("delivered"),
             f"the broker delivered {self.total('delivered')}, the aggregator's filters match {self.total('matched')}"),
            (self.publisher_disconnects > 0, f"publisher lost its session {self.publisher_disconnects} time(s)"),
            (self.rss_growth_mib is None or self.rss_growth_mib > rss_bound_mib,
             f"RSS growth {_mib(self.rss_growth_mib)} MiB (bound {rss_bound_mib:g})"),
            (bool(self.results_error), f"result database not readable: {self.results_error}"),
            (bool(self.valid_missing), self._missing_text()),
            (self.results_non_finite > 0, f"{self.results_non_finite} stored result(s) hold NaN or infinity"),
        ]
        return [text for failed, text in checks if failed]

    # ---------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (fuzz.json)."""
        return {
            "seed": self.seed, "messages": self.messages, "machine": self.machine,
            "totals": {name: self.total(name) for name in ("sent", "client_refused", "broker_refused", "acked",
                                                             "no_subscribers", "delivered", "matched")}
            | {"counted": self.counted, "unaccounted": self.unaccounted, "overcounted": self.overcounted},
            "by_reason": dict(sorted(self.by_reason.items())),
            "classes": {c: t.to_dict() for c, t in self.classes.items()},
            "duration_s": round(self.duration_s, 2), "messages_per_s": round(self.messages_per_s, 1),
            "rss_mib": {"idle": self.rss_idle_mib, "start": self.rss_start_mib, "peak": self.rss_peak_mib,
                        "end": self.rss_end_mib, "growth": self.rss_growth_mib},
            "rss_samples": self.rss_samples, "crashes": self.crashes, "exit_code": self.exit_code,
            "log_problems": self.log_problems, "reproducers": self.reproducers,
            "publisher_disconnects": self.publisher_disconnects,
            "baseline": self.baseline, "final_counts": self.final_counts, "exit_counted": self.exit_counted,
            "hostile_accepted": self.hostile_accepted(),
            "unexpected": self.unexpected(), "aborted": self.aborted, "problems": self.problems(),
            "epoch_ns": self.epoch_ns, "valid_windows": self.valid_windows,
            "first_hostile_block": self.first_hostile_block,
            "results": {"stored": self.results_stored, "non_finite": self.results_non_finite,
                        "unmatched": self.results_unmatched, "error": self.results_error,
                        "valid_during_fuzz": len(self.valid_during_fuzz),
                        "valid_during_fuzz_stored": len(self.valid_during_fuzz) - len(self.valid_missing)},
        }

    def to_json(self) -> str:
        """fuzz.json."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_markdown(self) -> str:
        """fuzz.md: verdict, totals, one row per class, counts by outcome, reproducers."""
        problems = self.problems()
        lines = [
            "# Hostile-input fuzzing of the aggregator (`spar-bench fuzz`)", "",
            f"{self.machine} · seed {self.seed} · {self.total('sent'):,} messages sent · "
            f"aggregator `spar-aggregator run` (subprocess, shipped parking-lot model) · private Mosquitto",
            "", f"**{'PASS' if not problems else 'FAIL'}**" + ("" if not problems else ": " + "; ".join(problems)),
            "", *self._summary_table(), "", *self._class_table(), "", *self._reason_table(), "",
            *self._problem_lines(),
            "Delivered: PUBACK *Success* (the aggregator is the only subscriber); *no subscribers*: the topic is "
            "outside its filters. Client-refused: paho will not send the topic; broker-refused: Mosquitto drops the "
            "connection (control characters, noncharacters, over its message_size_limit). Outcomes are the "
            "aggregator's own counters (/metrics), attributed to a class by sending one class per block and "
            "waiting until every delivered message of the block is counted.",
        ]
        return "\n".join(lines) + "\n"

    def _summary_table(self) -> list[str]:
        t = self.total
        rss = " / ".join(_mib(v) for v in (self.rss_idle_mib, self.rss_start_mib, self.rss_peak_mib, self.rss_end_mib))
        rows = [("sent", f"{t('sent'):,}"), ("refused by the client (paho)", f"{t('client_refused'):,}"),
                ("refused by the broker", f"{t('broker_refused'):,}"), ("acknowledged (PUBACK)", f"{t('acked'):,}"),
                ("no matching subscribers", f"{t('no_subscribers'):,}"),
                ("delivered to the aggregator", f"{t('delivered'):,}"),
                ("of those, topics matching its filters (check)", f"{t('matched'):,}"),
                ("counted by the aggregator", f"{self.counted:,}"),
                ("unaccounted (delivered - counted)", f"{self.unaccounted:,}"),
                ("counted beyond delivery", f"{self.overcounted:,}"),
                ("counted, by the aggregator's exit line", f"{self.exit_counted}"), ("crashes", str(self.crashes)),
                ("internal errors", str(self.by_reason.get("rejected.internal_error", 0))),
                ("error / traceback log lines", str(len(self.log_problems))),
                ("exit code after SIGTERM", str(self.exit_code)),
                ("RSS idle / after warm-up / peak / end (MiB)", rss),
                ("RSS growth after warm-up (MiB)", _mib(self.rss_growth_mib)),
                ("valid windows sent during the fuzz / with a stored result",
                 f"{len(self.valid_during_fuzz)} / {len(self.valid_during_fuzz) - len(self.valid_missing)}"),
                ("stored results / with NaN or inf / for no valid window",
                 f"{self.results_stored} / {self.results_non_finite} / {self.results_unmatched}"),
                ("duration (s)", f"{self.duration_s:.1f}"), ("messages/s", f"{self.messages_per_s:,.0f}")]
        return ["| | |", "|---|---:|", *[f"| {k} | {v} |" for k, v in rows]]

    def _class_table(self) -> list[str]:
        lines = ["| class | sent | client-refused | broker-refused | no subscribers | delivered | counted | "
                 "outcomes |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, t in self.classes.items():
            outcomes = ", ".join(f"{o} {n:,}" for o, n in t.outcomes.most_common())
            lines.append(f"| {name} | {t.sent:,} | {t.client_refused:,} | {t.broker_refused:,} | {t.no_subscribers:,} "
                         f"| {t.delivered:,} | {t.counted:,} | {outcomes} |")
        return lines

    def _problem_lines(self) -> list[str]:
        lines = []
        if self.reproducers:
            lines += ["Reproducers (the same message replayed through the wire parsers in-process):", "",
                      "| class | variant | problem | topic | bytes | file |", "|---|---|---|---|---:|---|"]
            lines += [f"| {r['class']} | {r['variant']} | {r['problem']} | `{r['topic'][:80]}` | "
                      f"{r['payload_bytes']:,} | {r['file']} |" for r in self.reproducers]
            lines.append("")
        if self.log_problems:
            lines += ["Aggregator log (errors, and what each traceback raised; first 10):", "", "```",
                      *self.log_problems[:10], "```", ""]
        return lines

    def _reason_table(self) -> list[str]:
        lines = ["| outcome (aggregator counter) | messages |", "|---|---:|"]
        return lines + [f"| {o} | {n:,} |" for o, n in sorted(self.by_reason.items())]


def _mib(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.1f}"
