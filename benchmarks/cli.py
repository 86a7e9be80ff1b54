"""``spar-bench``: benchmarks, field trials and the walking-skeleton demo.

A dispatcher only. Every subcommand's parser and handler live beside its benchmark, in a
``register(subparsers)`` function that adds the subcommand with ``set_defaults(func=handler)``:
in the benchmark module itself, or in ``<name>_cli.py`` where one command spans several modules
(``objectives``, ``quant``) or the benchmark is its own unit (``runtime``, ``latency``,
``overload``, ``fuzz``). ``COMMANDS`` lists them in the order ``--help`` shows them; what they
share (default site, progress lines, report files) is in ``cli_support``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import Any

from benchmarks import (
    bandwidth_bench,
    codec_report,
    fault_trial,
    fuzz_cli,
    latency_cli,
    lossy_bench,
    model_check,
    objectives_cli,
    overload_cli,
    placement_bench,
    quant_cli,
    runtime_cli,
    skeleton,
)
from benchmarks.errors import BenchError
from node_firmware_sim.errors import NodeError
from spar_wire.errors import WireError
from testbed.errors import TestbedError
from train.errors import TrainError
from trials.errors import TrialError

# (subcommand, its register function): the one table of spar-bench's subcommands.
COMMANDS: tuple[tuple[str, Callable[[Any], None]], ...] = (
    ("skeleton", skeleton.register),
    ("codecs", codec_report.register),
    ("runtime", runtime_cli.register),
    ("objectives", objectives_cli.register),
    ("model", model_check.register),
    ("placement", placement_bench.register),
    ("quant", quant_cli.register),
    ("bandwidth", bandwidth_bench.register),
    ("lossy", lossy_bench.register),
    ("latency", latency_cli.register),
    ("faults", fault_trial.register),
    ("overload", overload_cli.register),
    ("fuzz", fuzz_cli.register),
)
# What a run may fail with that is the user's to fix (bad flags, files, settings): a message and
# exit code 2, no traceback.
EXPECTED_ERRORS = (WireError, BenchError, TrialError, TestbedError, TrainError, NodeError)


def build_parser() -> argparse.ArgumentParser:
    """``spar-bench`` with every subcommand of ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="spar-bench", description="spar-edge benchmarks, trials and demos.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, register in COMMANDS:
        register(sub)
        if name not in sub.choices:  # a register function that adds another name would hide a command
            raise RuntimeError(f"{register.__module__}.register did not add the subcommand {name!r}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (systemd, `kill`, a CI timeout) ends a run like Ctrl-C: brokers stopped, partial
    # results written, instead of dying with child processes left behind.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except EXPECTED_ERRORS as exc:
        print(f"spar-bench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
