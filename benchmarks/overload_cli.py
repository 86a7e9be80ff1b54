"""``spar-bench overload``: the command line of the overload benchmark (``overload_bench``).

The benchmark module is its own unit; this module only turns flags into a call of its public run
function and writes the report, so the two can change apart. The benchmark loads when the command
runs, not for ``--help``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.cli_support import progress
from benchmarks.errors import BenchError


def register(subparsers: Any) -> None:
    """Add ``spar-bench overload`` to ``subparsers`` (``parser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "overload", help="the aggregator at 10x its nominal load and after it: bounded queue, drops, recovery",
        description="Nominal load, then FACTOR x nominal, then nominal again, back to back, from a publisher "
        "process playing every node of a synthetic site through a private Mosquitto to the real aggregator. "
        "Reports per phase the served windows and their latency, the windows dropped (oldest first) and "
        "counted, the queue's peak depth, memory and the recovery time. Writes overload.md/.json; exit code 1 "
        "when a check fails.")
    p.add_argument("--nodes", type=int, default=64, help="nodes of the synthetic site (default: %(default)s)")
    p.add_argument("--nominal-rate", type=float, default=None,
                   help="nominal windows/s (default: one per window length)")
    p.add_argument("--factor", type=float, default=10.0, help="overload factor (default: %(default)s)")
    p.add_argument("--phases", default="10,10,20",
                   help="seconds of nominal, overload and recovery (default: %(default)s)")
    p.add_argument("--model", choices=("student", "tiny"), default="student",
                   help="random-weight student architecture or the tiny test model (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where overload.md/.json go")
    p.add_argument("--workdir", type=Path, default=Path("benchmarks/.work/overload"),
                   help="model cache, site, broker files (default: %(default)s)")
    p.set_defaults(func=_cmd_overload)


def _cmd_overload(args: argparse.Namespace) -> int:
    from benchmarks.overload_bench import OverloadConfig, run_overload

    try:
        phases = tuple(float(x) for x in args.phases.split(","))
    except ValueError:
        raise BenchError(f"--phases must be three numbers of seconds, got {args.phases!r}") from None
    config = OverloadConfig(nodes=args.nodes, nominal_rate=args.nominal_rate, factor=args.factor,
                            phase_s=phases, model=args.model)
    report = run_overload(config, args.workdir, progress=progress)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overload.md").write_text(report.to_markdown())
    (args.out / "overload.json").write_text(report.to_json())
    print(report.to_markdown())
    return 0 if all(report.checks.values()) else 1
