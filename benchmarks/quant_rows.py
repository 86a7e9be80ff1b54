"""The rows of ``spar-bench quant``: what one timed entry is, what was measured on it, and what a
report section may read of the whole run.

``quant_bench`` times the rows and writes the report; ``int8_settings`` and ``student_pareto`` add
rows and a section each. All three build on this module and the sections read the report through
``TimedRows``, so ``quant_bench`` can call the sections without the sections importing it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from testbed.latency_stats import percentile

if TYPE_CHECKING:
    from export.deploy_model import DeployModel
    from export.parity import Runner


class BenchEntry(NamedTuple):
    """One thing to time: a runner (named numpy inputs -> outputs in ``model.output_names`` order)."""

    label: str
    runner: Runner
    params: int  # parameters of the model it runs
    file_bytes: int | None  # size of its artifact (None for torch eager)
    model: DeployModel | None  # output specs for the task metric (None: latency only)


@dataclass
class EntryResult:
    """The latencies and task metrics measured on one entry."""

    label: str
    params: int
    file_bytes: int | None
    latency_ms: dict[int, list[float]]  # batch size -> one latency per repeat
    metrics: dict[str, float] = field(default_factory=dict)  # "task/metric"

    def p(self, batch: int, q: float) -> float:
        """The ``q``-th percentile latency in ms at batch size ``batch``."""
        return percentile(self.latency_ms[batch], q)


class TimedRows(Protocol):
    """What a report section reads of a quant run: every row, its batch sizes and thread count."""

    entries: list[EntryResult]
    batches: tuple[int, ...]
    threads: int


def count_params(model: DeployModel) -> int:
    """Parameters of a deployable model (every tensor, trained or not)."""
    return sum(p.numel() for p in model.parameters())
