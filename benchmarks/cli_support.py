"""What the subcommands of ``spar-bench`` share: the default site, progress lines on stderr, writing
a report's markdown/JSON/plot trio, and the flags and trial settings of the live series
(``bandwidth`` and ``lossy`` run one field trial per codec or link condition).

Each subcommand registers itself beside its benchmark (``register(subparsers)``); this module sits
below all of them, so none needs to import another's command line or ``benchmarks.cli``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.errors import BenchError

if TYPE_CHECKING:
    from trials.trial import TrialConfig

# Relative, as the help texts show it: the commands run from the repository root.
DEFAULT_SITE = Path("configs/sites/parking_lot.toml")


def progress(text: str) -> None:
    """A progress line on stderr, so stdout carries only the report."""
    print(f"... {text}", file=sys.stderr, flush=True)


def write_report(report: Any, out: Path, name: str, json_text: str | None = None) -> None:
    """``out/NAME.md``, ``.json`` and ``.png`` of a report with ``to_markdown``, ``plot`` and (unless
    ``json_text`` is given) ``to_json``; the table and where it went on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(report.to_markdown())
    (out / f"{name}.json").write_text(report.to_json() if json_text is None else json_text)
    report.plot(out / f"{name}.png")
    print(report.to_markdown())
    print(f"report: {out / f'{name}.md'}, plot: {out / f'{name}.png'}")


def given(**settings: Any) -> dict[str, Any]:
    """The settings whose flag was given (not None): the changes to a config's defaults."""
    return {name: value for name, value in settings.items() if value is not None}


def add_series_args(p: argparse.ArgumentParser, name: str, *, speed: float, codec: str | None) -> None:
    """The flags every live series takes: trial length, timeline, seed, model, broker, folders."""
    p.add_argument("--windows", type=int, default=160, help="windows per trial (default: %(default)s)")
    p.add_argument("--speed", type=float, default=speed,
                   help="timeline compression of each trial (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenario and links (default: %(default)s)")
    if codec is not None:
        p.add_argument("--codec", default=codec, help="codec of every trial (default: %(default)s, the nodes' default; "
                       "spar-bench bandwidth shows its metric within 0.3 %% of float32)")
    p.add_argument("--model", type=Path, default=None, help="manifest.json (default: the shipped parking-lot model)")
    p.add_argument("--broker", default="auto", help="auto | mosquitto | amqtt (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=Path(f"benchmarks/.work/{name}"),
                   help="one trial folder per entry; a finished trial with the same settings is reused "
                   "(default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="run every trial again instead of reusing finished ones")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help=f"where {name}.md/.json/.png go (default: %(default)s)")


def series_base(args: argparse.Namespace, **changes: Any) -> TrialConfig:
    """The trial settings every entry of a series shares, from the flags of ``add_series_args``:
    ``--windows`` windows of the trial site, the shipped model's scenario unless ``--model`` is given."""
    from spar_wire.site_layout import load_site_layout
    from trials.cli import SHIPPED_MODEL_PARAMS
    from trials.trial import DEFAULT_MODEL, DEFAULT_SITE, TrialConfig

    if args.windows < 8:
        raise BenchError("--windows must be >= 8")
    window_s = load_site_layout(DEFAULT_SITE).window_s()
    return TrialConfig(out=args.workdir, model=args.model or DEFAULT_MODEL,
                       scenario_params={} if args.model else dict(SHIPPED_MODEL_PARAMS),
                       duration_s=args.windows * window_s, seed=args.seed, speed=args.speed, broker=args.broker,
                       **changes)
