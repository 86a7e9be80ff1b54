"""What ``spar-bench latency`` measures: one row per (node count, rate) step and one sweep per node count.

Plain data, shared by the code that measures a step (``latency_step``), judges it
(``latency_classify``), runs the sweep (``latency_bench``) and renders the report
(``latency_report``), so none of those needs another's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepResult:
    """One (N, rate) step. Latencies in ms are medians over the step's results unless named p50/p99."""

    nodes: int
    offered_rate: float  # windows/s scheduled
    windows: int  # windows published
    messages: int  # token messages published and acknowledged by the broker
    generator_rate: float  # windows/s the publisher actually started (same fit)
    achieved_rate: float  # results/s (inverse slope of result times against rank)
    results: int
    partial: int  # results of incomplete windows (a node's message missed the window)
    dropped: int  # windows shed by the full window queue or failed in the backend
    lost: int  # published windows with neither a result nor a drop
    p50_ms: float  # end to end: every node completed the window -> result ready
    p99_ms: float
    growth_ms: float  # median e2e of the step's last third minus its first third
    publish_lag_ms: float  # publisher start of the window - schedule
    transport_ms: float  # publisher start -> first message processed by the aggregator
    assembly_ms: float  # first message -> window closed
    queue_ms: float  # closed -> inference started
    inference_ms: float  # backend call (shared by a batch)
    delivery_ms: float  # result ready -> received by a subscriber
    mean_batch: float
    inference_busy: float  # share of the step's span the backend was running
    offered_messages_per_s: float
    accepted_messages_per_s: float  # by the aggregator, over the step's span
    ingest_lag_messages: int  # published but not yet processed when the publisher finished
    late_messages: int  # arrived after their window had closed (dropped by the assembler)
    aggregator_cpu: float  # cores: the aggregator process's CPU seconds per second of the step's wall time
    ingest_thread_cpu: float | None  # cores: the MQTT thread that decodes and assembles
    inference_thread_cpu: float | None  # cores: the inference worker thread (ORT's own pool excluded)
    span_s: float  # first scheduled window -> last result ready
    e2e_ms: list[float] = field(default_factory=list)  # per result, in window order
    head_stage_ms: dict[str, float] = field(default_factory=dict)  # stage_ms over the step's first third
    tail_stage_ms: dict[str, float] = field(default_factory=dict)  # ... and over its last third
    saturated: bool = False
    reasons: list[str] = field(default_factory=list)
    bottleneck: str | None = None
    evidence: str = ""

    @property
    def stage_ms(self) -> dict[str, float]:
        """Median ms per bottleneck candidate: load generator, ingest (transport + assembly), inference."""
        return {"load generator": self.publish_lag_ms, "ingest": self.transport_ms + self.assembly_ms,
                "inference": self.queue_ms + self.inference_ms}


@dataclass
class NodeSweep:
    """All steps of one site size and where it saturated."""

    nodes: int
    messages_per_window: int
    bare_ms: float  # backend alone, batch 1, ms per window
    bare_batch_ms: float  # backend alone, per window at the aggregator's max batch
    max_batch: int
    steps: list[StepResult] = field(default_factory=list)
    note: str = ""  # why the sweep stopped early, if it did

    @property
    def saturated_step(self) -> StepResult | None:
        return next((s for s in self.steps if s.saturated), None)

    @property
    def sustained_rate(self) -> float | None:
        """The highest offered rate before the first saturated step."""
        ok = [s.offered_rate for s in self.steps if not s.saturated]
        limit = self.saturated_step
        if limit is not None:
            ok = [r for r in ok if r < limit.offered_rate]
        return max(ok) if ok else None

    def verdict(self) -> str:
        """One sentence: where this N saturates and why, from the measurements."""
        step = self.saturated_step
        if not self.steps:
            return f"not measured ({self.note or 'no steps'})"
        if step is None:
            top = max(s.offered_rate for s in self.steps)
            return f"not saturated up to {top:g} windows/s" + (f" ({self.note})" if self.note else "")
        return (f"saturates at {step.offered_rate:g} windows/s ({', '.join(step.reasons)}); "
                f"bottleneck {step.bottleneck}: {step.evidence}")

