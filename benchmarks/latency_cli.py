"""``spar-bench latency``: the command line of the end-to-end latency sweep (``latency_bench``).

The benchmark module is its own unit; this module only turns flags into a call of its public run
function and writes the report, so the two can change apart.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.cli_support import progress
from benchmarks.errors import BenchError
from benchmarks.latency_bench import DEFAULT_NODES, DEFAULT_RATES, DEFAULT_SITE, MODEL_KINDS

T = TypeVar("T")


def register(subparsers: Any) -> None:
    """Add ``spar-bench latency`` to ``subparsers`` (``parser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "latency", help="end-to-end latency vs node count and window rate, up to saturation",
        description="For each node count, run the aggregator (random-weight student model) fed by "
        "simulated nodes through a loopback Mosquitto at rising window rates until it saturates; "
        "report p50/p99 end-to-end latency, where the time goes, and what saturates first. Writes "
        "latency.md, latency.json and latency.png. About 3 minutes with the defaults.")
    p.add_argument("--nodes", default=",".join(map(str, DEFAULT_NODES)),
                   help="comma-separated node counts (default: %(default)s)")
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in DEFAULT_RATES),
                   help="comma-separated offered windows/s, swept upwards (default: %(default)s)")
    p.add_argument("--windows-per-step", type=int, default=40, help="most windows per step (default: %(default)s)")
    p.add_argument("--max-seconds-per-step", type=float, default=4.0,
                   help="a step sends about this many seconds of windows (default: %(default)s)")
    p.add_argument("--budget", type=float, default=240.0, help="time budget in seconds (default: %(default)s)")
    p.add_argument("--site", type=Path, default=DEFAULT_SITE, help="base site layout (default: %(default)s)")
    p.add_argument("--codec", default="png", help="codec of the token messages (default: %(default)s)")
    p.add_argument("--backend", default="auto", help="auto | onnxruntime | tensorrt (default: auto)")
    p.add_argument("--model", default="student", choices=MODEL_KINDS,
                   help="student: random weights, shipped student architecture; tiny: the test model")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="where latency.md/.json/.png go (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=Path("benchmarks/.work/latency"),
                   help="cached model, sites, databases (default: %(default)s)")
    p.set_defaults(func=_cmd_latency)


def _cmd_latency(args: argparse.Namespace) -> int:
    from benchmarks.latency_bench import run_latency_benchmark, summary_line

    report = run_latency_benchmark(
        _parse_list(args.nodes, int, "--nodes"), _parse_list(args.rates, float, "--rates"),
        windows_per_step=args.windows_per_step, max_seconds_per_step=args.max_seconds_per_step,
        budget_s=args.budget, workdir=args.workdir, base_site=args.site, backend=args.backend, codec=args.codec,
        model=args.model, progress=progress)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency.md").write_text(report.to_markdown())
    (args.out / "latency.json").write_text(report.to_json())
    report.plot(args.out / "latency.png")
    print(report.to_markdown())
    print(summary_line(report))
    print(f"report: {args.out / 'latency.md'}, plot: {args.out / 'latency.png'}")
    return 0


def _parse_list(text: str, kind: Callable[[str], T], flag: str) -> list[T]:
    """Comma-separated numbers of a flag; BenchError naming the flag when one is not a number."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise BenchError(f"{flag}: give at least one value")
    return values
