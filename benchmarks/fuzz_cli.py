"""``spar-bench fuzz``: the command line of the hostile-input fuzzer (``fuzz_bench``).

The benchmark module is its own unit; this module only turns flags into a call of its public run
function and writes the report, so the two can change apart. The fuzzer loads when the command
runs, not for ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmarks.cli_support import DEFAULT_SITE, progress
from benchmarks.errors import BenchError


def register(subparsers: Any) -> None:
    """Add ``spar-bench fuzz`` to ``subparsers`` (``parser.add_subparsers()``)."""
    fz = subparsers.add_parser(
        "fuzz", help="hostile-input fuzzing of a running aggregator (issue 9)",
        description="Start a private Mosquitto and the real aggregator (spar-aggregator run, shipped "
        "parking-lot model) as a subprocess; publish seeded hostile messages made from the site's "
        "valid traffic (truncated, bit flips, wrong CRC, huge shape headers, decompression bombs, "
        "NaN/overflowing scales, wrong feature hash, spoofed node ids, unicode and malformed topics, "
        "random bytes, empty payloads, malformed birth/state JSON, bad header fields, oversize; "
        "far-future and far-past window starts with a valid CRC, huge or far-away birth positions, "
        "description churn) plus 2 % valid traffic, one class per block at QoS 1. Checks: no crash, no "
        "internal_error or traceback, every delivered message counted under a reason, no hostile "
        "message accepted, every valid window sent during the fuzz stored, no NaN in results, "
        "resident memory growth after warm-up within --rss-bound, exit code 0 on SIGTERM. Writes "
        "fuzz.md and fuzz.json; exits 1 if a check failed. About 10 s per 10 000 messages on 2 cores.")
    fz.add_argument("--messages", type=int, default=10_000, help="messages to send (default: %(default)s)")
    fz.add_argument("--seed", type=int, default=0, help="generator seed (default: %(default)s)")
    fz.add_argument("--block-size", type=int, default=250,
                    help="messages per single-class block; outcomes are read between blocks (default: %(default)s)")
    fz.add_argument("--max-inflight", type=int, default=100,
                    help="QoS 1 messages awaiting PUBACK at most (default: %(default)s)")
    fz.add_argument("--budget", type=float, default=1800.0,
                    help="seconds of fuzzing at most; the run stops there and fails (default: %(default)s)")
    fz.add_argument("--rss-bound", type=float, default=50.0,
                    help="MiB of resident memory growth after warm-up that fails the run (default: %(default)s)")
    fz.add_argument("--site", type=Path, default=DEFAULT_SITE, help="site layout TOML (default: %(default)s)")
    fz.add_argument("--model", type=Path, default=Path("models/parking_lot/manifest.json"),
                    help="the aggregator's model manifest (default: %(default)s)")
    fz.add_argument("--out", type=Path, default=Path("benchmarks/results/fuzz"),
                    help="where fuzz.md and fuzz.json go (default: %(default)s)")
    fz.add_argument("--workdir", type=Path, default=Path("benchmarks/.work/fuzz"),
                    help="broker files, aggregator config, log and database (default: %(default)s)")
    fz.add_argument("--no-progress", action="store_true", help="no progress bar")
    fz.set_defaults(func=_cmd_fuzz)


def _cmd_fuzz(args: argparse.Namespace) -> int:
    from benchmarks.fuzz_bench import FuzzConfig, run_fuzz

    if args.block_size < 1 or args.max_inflight < 1 or args.budget <= 0:
        raise BenchError("--block-size, --max-inflight and --budget must be positive")
    config = FuzzConfig(messages=args.messages, seed=args.seed, site=args.site, model=args.model,
                        block_size=args.block_size, max_inflight=args.max_inflight, budget_s=args.budget,
                        progress=not args.no_progress)
    report = run_fuzz(config, args.workdir, progress=progress)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.md").write_text(report.to_markdown())
    (args.out / "fuzz.json").write_text(report.to_json())
    print(report.to_markdown())
    print(f"report: {args.out / 'fuzz.md'}; aggregator log: {args.workdir / 'aggregator.log'}")
    problems = report.problems(args.rss_bound)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0
