"""``spar-aggregator run`` whose result store holds every batch a while before committing it (fault trials only).

``spar-bench faults`` SIGKILLs the aggregator between a window's close and the commit of its result to
SQLite: the moment its messages are out of the assembler, not acknowledged, and not on disk. On the
real service that gap lasts milliseconds (inference plus the commit), too short to hit from outside
on purpose. This entry point runs the real service (the same command line, config file, broker
sessions, assembler, worker and SQLite store) with one difference: the result store waits
``--commit-delay`` seconds before each commit, and two gauges on the aggregator's own ``/metrics``
say what waits, so the trial can kill exactly then:

- ``spar_bench_commit_held_windows``: windows whose results wait for their commit (0 when none);
- ``spar_bench_commit_held_window_start_seconds``: the newest of them, its ``window_start_ns`` / 1e9.

With ``--hold-file PATH`` a commit also waits while that file exists (at most ``MAX_HOLD_S``): the
trial creates it, waits for the gauges to show a held window, SIGKILLs, and removes it. The kill then
lands in the gap by construction, not by winning a race against a timer on a busy machine.

Nothing in ``edge_runtime`` knows about this: the service takes its store from ``_open_store``, and
the subclass below wraps what that returns. Usage (what ``AggregatorProcess(entry=...)`` runs)::

    python -m testbed.held_commit_aggregator --commit-delay 0.5 [--hold-file F] run --config aggregator.toml
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from edge_runtime import cli as aggregator_cli
from edge_runtime import service
from edge_runtime.service import Aggregator

HELD_WINDOWS = "spar_bench_commit_held_windows"
HELD_START = "spar_bench_commit_held_window_start_seconds"
MAX_HOLD_S = 30.0  # a hold file left behind (a crashed trial) delays a commit by this much, no more
HOLD_POLL_S = 0.01


class HeldCommitStore:
    """A result store whose ``insert_new`` waits ``delay_s`` before committing; everything else is the
    wrapped store's. The gauges (once :meth:`expose` ran) name the windows waiting."""

    def __init__(self, store: Any, delay_s: float, hold_file: Path | None = None):
        self._store = store
        self.delay_s = delay_s
        self.hold_file = hold_file
        self._held: Any = None
        self._newest: Any = None

    def expose(self, registry: Any) -> None:
        """Add the two gauges (see the module doc) to the aggregator's metrics registry."""
        self._held = registry.gauge(HELD_WINDOWS, "Windows whose results wait before their commit (bench only)")
        self._newest = registry.gauge(HELD_START, "window_start_ns / 1e9 of the newest window waiting before "
                                      "its commit (bench only)")

    def insert_new(self, results: list[dict[str, Any]], *args: Any, **kwargs: Any) -> list[bool]:
        """The wrapped store's ``insert_new`` after ``delay_s``; the gauges say what waits meanwhile."""
        if self._held is not None and results:
            # The start first: a scrape that sees windows held must also see which.
            self._newest.set(max(int(r["window_start_ns"]) for r in results) / 1e9)
            self._held.set(len(results))
        try:
            time.sleep(self.delay_s)
            self._wait_while_held()
            return self._store.insert_new(results, *args, **kwargs)
        finally:
            if self._held is not None:
                self._held.set(0)  # committed (or failed and retried by the worker): nothing held now

    def _wait_while_held(self) -> None:
        """While the hold file exists (and at most ``MAX_HOLD_S``), the commit waits."""
        if self.hold_file is None:
            return
        deadline = time.monotonic() + MAX_HOLD_S
        while self.hold_file.exists() and time.monotonic() < deadline:
            time.sleep(HOLD_POLL_S)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class HeldCommitAggregator(Aggregator):
    """The aggregator service with its result store wrapped in a :class:`HeldCommitStore`."""

    commit_delay_s = 0.0  # set by main() before the command line builds one
    hold_file: Path | None = None

    def __init__(self, config: Any, **kwargs: Any):
        super().__init__(config, **kwargs)
        if isinstance(self.store, HeldCommitStore):  # not when a caller passed its own store
            self.store.expose(self.metrics.registry)

    def _open_store(self) -> Any:
        return HeldCommitStore(super()._open_store(), self.commit_delay_s, self.hold_file)


def main(argv: list[str] | None = None) -> int:
    """``--commit-delay SECONDS`` then any ``spar-aggregator`` command line."""
    parser = argparse.ArgumentParser(prog="python -m testbed.held_commit_aggregator",
                                     description="spar-aggregator with every result commit held back a while "
                                     "(fault trials); the rest of the command line is spar-aggregator's.")
    parser.add_argument("--commit-delay", type=float, required=True, help="seconds each commit waits")
    parser.add_argument("--hold-file", type=Path, default=None,
                        help=f"a commit also waits while this file exists (at most {MAX_HOLD_S:g} s)")
    args, rest = parser.parse_known_args(argv)
    if not (math.isfinite(args.commit_delay) and args.commit_delay >= 0):
        parser.error(f"--commit-delay must be a finite number of seconds >= 0, got {args.commit_delay}")
    HeldCommitAggregator.commit_delay_s = args.commit_delay
    HeldCommitAggregator.hold_file = args.hold_file
    # The command line looks the service class up in edge_runtime.service when it runs: replacing it
    # there keeps everything else (config, overrides, signals, the lines the trial waits for) the real
    # spar-aggregator's.
    service.Aggregator = HeldCommitAggregator  # type: ignore[misc]
    return aggregator_cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
