"""``spar-trial``: simulated field trials (``run``) and their reports (``report``)."""

from __future__ import annotations

import argparse
import datetime
import signal
import sys
from pathlib import Path
from typing import Any

from node_firmware_sim.cli import DEFAULT_SITES, REPO_CONFIGS
from node_firmware_sim.errors import NodeError
from node_firmware_sim.placement_events import load_events
from node_firmware_sim.scenarios import SCENARIOS, parse_scenario_params
from spar_wire.errors import WireError
from trials.errors import TrialError
from trials.report_files import write_report
from trials.trial import BUSY_LOT_MODEL, REPO, SHIPPED_MODELS, TrialConfig, load_layout

# The shipped parking-lot model was trained on windows with at most one vehicle and 10 % empty
# episodes (scripts/make_models.sh); a trial of that model defaults to the same traffic.
SHIPPED_MODEL_PARAMS = {"max_vehicles": 1, "empty_fraction": 0.1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spar-trial", description="Simulated field trials: a broker, the aggregator and every node of a site "
        "through a lossy link, with a report of traffic, loss, completeness, latency and task metric.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    rp = sub.add_parser("report", help="(re)build the report of a trial folder",
                        description="Read a trial folder (also an interrupted one) and write report.md, "
                        "report.json, trial.png and site_map.png into it.")
    rp.add_argument("folder", type=Path, help="trial folder written by `spar-trial run`")
    rp.set_defaults(func=_cmd_report)
    cp = sub.add_parser("compare", help="score a trial with placement events against a control trial",
                        description="Score the windows before and after each placement event in the trial with "
                        "events and in a control trial run with the same seed, site, model and link but no events "
                        "(the same vehicles), so the effect of a join or a move is paired window by window. Prints "
                        "the table and writes it to EVENTS/compare.md.")
    cp.add_argument("events", type=Path, help="trial folder of a run with --events")
    cp.add_argument("control", type=Path, help="trial folder of the same run without --events")
    cp.set_defaults(func=_cmd_compare)
    args = parser.parse_args(argv)
    # SIGTERM (systemd, `kill`, a CI timeout) ends a run like Ctrl-C: brokers stopped, partial
    # results written, instead of dying with child processes left behind.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except (TrialError, WireError, NodeError) as exc:
        print(f"spar-trial {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a trial (a trial itself ends cleanly and reports)
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="run one trial and write its report",
        description="Start a broker (a private Mosquitto on a free loopback port; the embedded amqtt broker when "
        "Mosquitto is missing; or --broker HOST:PORT), the aggregator with the model, and every node of the site "
        "publishing through the link model, for --duration seconds of trial time. Then write report.md, "
        "report.json, trial.png and site_map.png beside the raw logs and the aggregator's SQLite in --out. "
        "Seeded: the same arguments give the same signals and link decisions. Ctrl-C stops early and still "
        "writes the report of what ran.")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="parking_lot",
                   help="physics scenario (default: %(default)s)")
    p.add_argument("--site", type=Path, default=None, help="site layout TOML (default: the scenario's own)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="scenario parameter, repeatable (default for the shipped parking-lot model: "
                   + " ".join(f"{k}={v}" for k, v in SHIPPED_MODEL_PARAMS.items()) + ", its training traffic)")
    p.add_argument("--model", type=Path, default=None,
                   help="manifest.json of the model to run (default: the scenario's shipped model, "
                   + ", ".join(f"{p.relative_to(REPO)} for {s}" for s, p in SHIPPED_MODELS.items())
                   + f", and {BUSY_LOT_MODEL.relative_to(REPO)} for parking_lot with --param max_vehicles=2 or "
                   "more; required for other scenarios)")
    p.add_argument("--link", type=Path, default=None,
                   help="link config TOML, e.g. configs/links/lossy.toml (default: a perfect link)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of trial time (default: %(default)s)")
    p.add_argument("--codec", default="webp:85",
                   help="raw32 | raw | png | jpeg:Q | webp:Q | webp:lossless (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenario and the link (default: %(default)s)")
    p.add_argument("--speed", type=float, default=1.0,
                   help="compress the timeline by this factor (windows, link delays, outages and the aggregator's "
                   "deadline alike); latency is then in compressed wall time (default: %(default)s, real time)")
    p.add_argument("--broker", default="auto",
                   help="auto | mosquitto | amqtt | HOST:PORT of a running broker (default: %(default)s)")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default=None,
                   help="MQTT version for --broker HOST:PORT (default: 5)")
    p.add_argument("--backend", default="auto", help="auto | onnxruntime | tensorrt (default: %(default)s)")
    p.add_argument("--deadline-fraction", type=float, default=0.5,
                   help="the aggregator closes a window this x window length after its first message "
                   "(default: %(default)s)")
    p.add_argument("--no-early-close", dest="early_close", action="store_false",
                   help="close windows only when complete or at the deadline (default: also as soon as every "
                   "missing message is overdue by its learned arrival lag)")
    p.add_argument("--events", type=Path, default=None, metavar="FILE",
                   help="TOML of placement events: [[events]] tables with at_s, kind (join | move), node, "
                   "position and optional description; e.g. configs/trials/join_and_move.toml")
    p.add_argument("--recordings", type=Path, default=None, metavar="FILE",
                   help="replay field recordings instead of simulating: a TOML of [[recordings]] (node, modality, "
                   "path to a WAV or miniSEED file; see docs/commands/spar-node.md). The site and default model "
                   "are the --scenario's (earthquakes: ridgecrest_like and the shipped seismic model); the trial ends "
                   "with the shortest recording; no ground truth, so the report lists the model's outputs")
    p.add_argument("--clock-offset-std-ms", type=float, default=0.0,
                   help="node clock offsets ~ N(0, this) in ms, seeded per node (default: 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="trial folder (default: results/trials/<scenario>-<date>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace a trial already in --out")
    p.add_argument("--view", choices=("auto", "live", "lines", "none"), default="auto",
                   help="live: a rich live panel; lines: a status line every 5 s; auto: live on a terminal, "
                   "lines otherwise (default: %(default)s)")
    p.set_defaults(func=_cmd_run)


def trial_config(args: argparse.Namespace) -> TrialConfig:
    """The TrialConfig the `run` arguments describe (defaults filled in as the help says)."""
    site = args.site or REPO_CONFIGS / "sites" / DEFAULT_SITES[args.scenario]
    if args.model is None and args.scenario not in SHIPPED_MODELS:
        raise TrialError(f"--model is required for scenario {args.scenario}: models are shipped for "
                         f"{', '.join(SHIPPED_MODELS)} only")
    params = parse_scenario_params(args.param)
    model = args.model or default_model(args.scenario, params)
    if not args.param and args.scenario == "parking_lot" and args.model is None:
        params = dict(SHIPPED_MODEL_PARAMS)
    events = load_events(args.events) if args.events else ()
    out = args.out or Path("results") / "trials" / (
        f"{args.scenario}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    return TrialConfig(out=out, site=site, scenario=args.scenario, scenario_params=params, model=model,
                       link=args.link, duration_s=args.duration, codec=args.codec, seed=args.seed, speed=args.speed,
                       broker=args.broker, protocol=args.protocol, backend=args.backend,
                       deadline_fraction=args.deadline_fraction, early_close=args.early_close,
                       clock_offset_std_ms=args.clock_offset_std_ms,
                       overwrite=args.overwrite, events=events, recordings=args.recordings)


def default_model(scenario: str, params: dict[str, Any]) -> Path:
    """The shipped model for a trial of ``scenario`` with ``params``: a busy parking lot gets the
    multi-vehicle detector, every other scenario with a model its own."""
    if scenario == "parking_lot" and int(params.get("max_vehicles", 1)) > 1:
        return BUSY_LOT_MODEL
    return SHIPPED_MODELS[scenario]


def _cmd_run(args: argparse.Namespace) -> int:
    from trials.live_view import LiveView
    from trials.report import analyze_trial
    from trials.trial import TrialMonitor, run_trial

    config = trial_config(args)
    from rich.console import Console

    console = Console(stderr=True, force_terminal={"live": True, "lines": False}.get(args.view))
    monitor = TrialMonitor(load_layout(config.site), config)
    source = f"replay of {config.recordings.name}" if config.recordings else config.scenario
    title = (f"spar-edge trial · {source} · {Path(config.model).parent.name} · "
             f"{config.link.name if config.link else 'perfect link'} · {config.codec}"
             + ("" if config.speed == 1 else f" · {config.speed:g}x"))
    console.print(f"trial folder: {config.out}", highlight=False)
    if args.view == "none":
        outcome = run_trial(config, monitor, progress=lambda text: console.print(text, highlight=False))
    else:
        with LiveView(monitor, title, console=console):
            outcome = run_trial(config, monitor, progress=lambda text: console.print(text, highlight=False))
    report = analyze_trial(outcome.folder)
    paths = write_report(report)
    print(report.summary_line())
    print(f"report: {paths[0]}  (plots: {', '.join(str(p) for p in paths[2:])})")
    return 130 if outcome.interrupted else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from trials.report import analyze_trial

    report = analyze_trial(args.folder)
    paths = write_report(report)
    print(report.summary_line())
    print(f"report: {paths[0]}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from trials.control import compare_with_control

    text = "\n".join(compare_with_control(args.events, args.control))
    (args.events / "compare.md").write_text(text)
    print(text)
    print(f"written: {args.events / 'compare.md'}")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
