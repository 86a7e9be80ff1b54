"""The aggregator under fuzz: starting it, and reading its counters, memory and log.

The run treats the aggregator as a black box (a ``spar-aggregator run`` subprocess): everything it
learns comes from what any operator could read, the /metrics text, /proc and the log file.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from testbed.aggregator_process import AggregatorProcess

_METRIC_LINE = re.compile(r'^(spar_messages_total|spar_messages_rejected_total)\{(?:outcome|reason)="([^"]*)"\} (\S+)$')


def parse_counts(text: str) -> Counter[str]:
    """The aggregator's message counters from /metrics text, keyed like its own Counter."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if match:
            family, label, value = match.groups()
            key = f"rejected.{label}" if family == "spar_messages_rejected_total" else label
            counts[key] += int(float(value))
    return counts


def rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` (VmRSS) in MiB; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def start_aggregator(workdir: Path, site: Path, model: Path, broker_port: int) -> AggregatorProcess:
    """The aggregator under test, as a child process with its own config, log and (fresh) database."""
    for old in ("results.sqlite3", "results.sqlite3-wal", "results.sqlite3-shm"):  # a previous run's
        (workdir / old).unlink(missing_ok=True)
    config = workdir / "aggregator.toml"
    config.write_text(
        f'[aggregator]\nsite = "{site.resolve()}"\nmodel = "{model.resolve()}"\n'
        f'database = "{(workdir / "results.sqlite3").resolve()}"\nmetrics_port = 0\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\n')
    (workdir / "aggregator.log").unlink(missing_ok=True)
    aggregator = AggregatorProcess(config, workdir / "aggregator.log")
    aggregator.start()
    return aggregator


def aggregator_counts(aggregator: AggregatorProcess) -> Counter[str] | None:
    """Message counters from its /metrics; None if the endpoint does not answer."""
    text = aggregator.metrics_text()
    return None if text is None else parse_counts(text)


def log_problems(text: str, limit: int = 50) -> list[str]:
    """ERROR/CRITICAL lines, ``internal_error`` mentions, and the exception line closing each traceback."""
    out: list[str] = []
    in_traceback = False
    for line in text.splitlines():
        if line.startswith("Traceback"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            in_traceback = False
            out.append(f"raised: {line}")
        elif " ERROR " in line or " CRITICAL " in line or "internal_error" in line:
            out.append(line)
    return [line[:300] for line in out[:limit]]
