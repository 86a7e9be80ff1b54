"""``spar-bench runtime``: the command line of the aggregator-throughput benchmark (``runtime_bench``).

The benchmark module is its own unit; this module only turns flags into a call of its public run
functions and writes the report, so the two can change apart. The benchmark loads when the command
runs, not for ``--help``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from benchmarks.cli_support import DEFAULT_SITE, progress
from benchmarks.errors import BenchError


def register(subparsers: Any) -> None:
    """Add ``spar-bench runtime`` to ``subparsers`` (``parser.add_subparsers()``)."""
    rt = subparsers.add_parser(
        "runtime", help="aggregator vs bare-model throughput, added latency, ingest capacity",
        description="Build a tiny ONNX model for the site, measure the bare backend's windows/s, "
        "then run the full aggregator fed by simulated nodes through a loopback Mosquitto: "
        "throughput, added latency p50/p99 (window complete -> result published), ingest "
        "messages/s and a per-step cost breakdown; then the result store's commit cost with "
        "SQLite synchronous=FULL (the default) against NORMAL, side by side on a real file. Writes a "
        "markdown report. About 1 min with the defaults; --store-only: seconds, no broker or model.")
    rt.add_argument("--site", type=Path, default=DEFAULT_SITE, help="site layout TOML (default: %(default)s)")
    rt.add_argument("--windows", type=int, default=300, help="windows to push through (default: %(default)s)")
    rt.add_argument("--codec", default="webp:85", help="codec of the token messages (default: %(default)s, what "
                    "`spar-node run` sends)")
    rt.add_argument("--spread-ms", type=float, default=30.0,
                    help="second latency phase: each message of a window leaves up to this much after the window's "
                    "tick (uniform), as the lossy link's jitter spreads a window's arrivals (default: %(default)s)")
    rt.add_argument("--backend", default="auto", help="auto | onnxruntime | tensorrt (default: auto)")
    rt.add_argument("--hidden", type=int, default=16, help="width of the tiny model (default: %(default)s)")
    rt.add_argument("--paced-rate", type=float, default=20.0,
                    help="windows/s for the latency phase, below saturation (default: %(default)s; a site of 8 "
                    "nodes with 2 s windows sends 0.5)")
    rt.add_argument("--out", type=Path, default=Path("benchmarks/results/runtime.md"),
                    help="markdown report (default: %(default)s)")
    rt.add_argument("--store-dir", type=Path, default=None,
                    help="folder on the disk the results would live on (e.g. the aggregator database's folder); "
                    "the store section's SQLite files go into a temporary folder inside it (default: next to --out)")
    rt.add_argument("--store-batches", type=int, default=1000,
                    help="timed commits per synchronous mode and batch size (1 and 8) in the store section; 0 "
                    "skips it (default: %(default)s)")
    rt.add_argument("--store-only", action="store_true",
                    help="measure only the store section (no broker, no model; e.g. on the edge box's SD card or "
                    "eMMC) and replace that section in --out, keeping the others, or write it alone")
    rt.set_defaults(func=_cmd_runtime)


def _cmd_runtime(args: argparse.Namespace) -> int:
    from benchmarks.runtime_store import run_store_benchmark, splice_store_section
    from edge_runtime.errors import AggregatorError

    if args.spread_ms < 0 or not math.isfinite(args.spread_ms):
        raise BenchError("--spread-ms must be a finite number >= 0")
    if args.windows < 10:
        raise BenchError("--windows must be >= 10")
    if args.store_batches < 0 or (args.store_only and args.store_batches < 1):
        raise BenchError("--store-batches must be >= 0 (>= 1 with --store-only)")
    store_dir = args.store_dir if args.store_dir is not None else args.out.parent

    if args.store_only:
        try:
            store = run_store_benchmark(args.site, store_dir, batches=args.store_batches, progress=progress)
        except AggregatorError as exc:
            raise BenchError(str(exc)) from None
        previous = args.out.read_text() if args.out.is_file() else ""
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(splice_store_section(previous, store.to_markdown()))
        print(store.to_markdown())
        print(f"report: {args.out}")
        return 0
    from benchmarks.runtime_bench import run_runtime_benchmark, summary_line

    try:
        report = run_runtime_benchmark(args.site, windows=args.windows, codec=args.codec, backend=args.backend,
                                       hidden=args.hidden, paced_rate=args.paced_rate, store_dir=store_dir,
                                       spread_ms=args.spread_ms,
                                       store_batches=args.store_batches, progress=progress)
    except AggregatorError as exc:
        raise BenchError(str(exc)) from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.to_markdown())
    print(report.to_markdown())
    print(summary_line(report))
    print(f"report: {args.out}")
    return 0
