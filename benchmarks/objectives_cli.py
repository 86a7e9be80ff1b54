"""``spar-bench objectives``: one subcommand over three benchmarks, picked by ``--dataset``.

``parking`` runs ``objectives`` (SPAR vs MAE vs supervised and the ablations), ``har``/``csi`` run
``objectives_har_csi`` and ``quakes``/``parking_lot_multi`` run ``objectives_tasks``. The flags are
shared, so the parser lives here, above all three, and each handler imports only the benchmark
it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.cli_support import given, progress, write_report
from benchmarks.errors import BenchError


def register(subparsers: Any) -> None:
    """Add ``spar-bench objectives`` to ``subparsers`` (``parser.add_subparsers()``)."""
    ob = subparsers.add_parser(
        "objectives", help="SPAR vs MAE vs supervised, and SPAR's ablations (paper Tables 1, 8)",
        description="Generate a simulated parking-lot dataset, pretrain SPAR, MAE and the ablations, "
        "fine-tune classification and localization heads on the frozen encoders at label ratios "
        "1.0 and 0.2 (supervised: from scratch), and write a markdown table, JSON and a PNG plot. "
        "About 40 min on 2 idle CPU cores with the defaults; finished jobs are remembered in the "
        "work directory, so an interrupted run resumes.")
    ob.add_argument("--dataset", choices=["parking", "har", "csi", "quakes", "parking_lot_multi"], default="parking",
                    help="parking (default): SPAR vs MAE vs supervised and the ablations on the parking lot; har: "
                    "every objective (supervised, mae, spar, robusthar, aemp) on body-worn IMUs, accuracy/F1 with "
                    "0/5/10/15 %% of the streams missing; csi: the same on indoor Wi-Fi CSI, localization median "
                    "and 90th-percentile error; quakes: SPAR, the MAEs, supervised and physics floors (STA/LTA picks + "
                    "travel-time grid search, first-arrival station) locating earthquakes on the ridgecrest-like "
                    "network, hypocentre/epicentral/depth errors in km; parking_lot_multi: the same methods "
                    "detecting up to 3 vehicles at once, mAP@4/6/8/10 m against kNN and energy-peak floors "
                    "(both: smoke 1600 windows, 10 epochs, 3 seeds)")
    ob.add_argument("--budget", choices=["smoke", "standard", "full"], default="smoke",
                    help="budget preset (train/budgets.py). parking: smoke (default) 1600 windows, 10 pretraining "
                    "epochs, 3 seeds, about an hour without ablations; standard 4000 windows, 30 epochs (hours); full "
                    "20000 windows, 100 epochs (a GPU). har/csi: smoke 800 windows, 6 epochs, 1 seed; standard and "
                    "full 3000 windows, 30 epochs, 3 seeds. The flags below change single settings")
    ob.add_argument("--windows", type=int, help="generated windows")
    ob.add_argument("--pretrain-epochs", type=int, help="pretraining epochs")
    ob.add_argument("--head-steps", type=int, help="frozen-encoder head steps")
    ob.add_argument("--supervised-steps", type=int, help="from-scratch steps")
    ob.add_argument("--seeds", type=int, help="number of seeds")
    ob.add_argument("--detector", choices=["anchors", "detr"],
                    help="parking_lot_multi: anchors (default: one DETR query per node, detections as offsets from "
                    "the nodes) or detr (the paper's head: 8 learnt queries)")
    ob.add_argument("--ablations", help="comma-separated ablations, 'none' to skip (default: the six of Table 8)")
    ob.add_argument("--workdir", type=Path, default=Path("benchmarks/.work/objectives"),
                    help="dataset, checkpoints and finished-job ledger (default: %(default)s)")
    ob.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                    help="where objectives.md/.json/.png go (default: %(default)s)")
    ob.set_defaults(func=_cmd_objectives)


def _cmd_objectives(args: argparse.Namespace) -> int:
    if args.detector and args.dataset != "parking_lot_multi":
        raise BenchError("--detector belongs to --dataset parking_lot_multi")
    if args.dataset in ("quakes", "parking_lot_multi"):
        return _cmd_task_objectives(args)
    if args.dataset != "parking":
        return _cmd_dataset_objectives(args)

    from benchmarks.objectives import ObjectivesConfig, check_config, run_objectives

    changes = given(workdir=args.workdir, windows=args.windows, pretrain_epochs=args.pretrain_epochs,
                    head_steps=args.head_steps, supervised_steps=args.supervised_steps,
                    seeds=tuple(range(args.seeds)) if args.seeds else None,
                    ablations=() if args.ablations == "none" else
                    tuple(a.strip() for a in args.ablations.split(",")) if args.ablations else None)
    cfg = ObjectivesConfig.for_budget(args.budget, **changes)
    check_config(cfg)
    print(f"spar-bench objectives: {cfg.budget()}", file=sys.stderr)
    report = run_objectives(cfg, progress=progress)
    write_report(report, args.out, "objectives", json_text=json.dumps(
        {"machine": report.machine, "budget": cfg.budget(), "results": report.results}, indent=2) + "\n")
    return 0


def _write_objectives(report: Any, budget: str, stem: Path) -> int:
    """STEM.md, STEM.json and STEM.png of a dataset objectives report; the table on stdout."""
    write_report(report, stem.parent, stem.name, json_text=json.dumps(
        {"machine": report.machine, "budget": budget, "rows": report.table(), "results": report.results},
        indent=2) + "\n")
    return 0


def _cmd_task_objectives(args: argparse.Namespace) -> int:
    from benchmarks.objectives_tasks import TaskObjectivesConfig, check_config, run_task_objectives

    if args.ablations:
        raise BenchError("--ablations belong to --dataset parking")
    changes = given(workdir=args.workdir, windows=args.windows, pretrain_epochs=args.pretrain_epochs,
                    head_steps=args.head_steps, supervised_steps=args.supervised_steps,
                    seeds=tuple(range(args.seeds)) if args.seeds else None, detector=args.detector)
    cfg = TaskObjectivesConfig.for_budget(args.budget, dataset=args.dataset, **changes)
    check_config(cfg)
    print(f"spar-bench objectives --dataset {cfg.dataset}: {cfg.budget()}", file=sys.stderr)
    report = run_task_objectives(cfg, progress=progress)
    return _write_objectives(report, cfg.budget(), args.out / f"objectives-{cfg.dataset}")


def _cmd_dataset_objectives(args: argparse.Namespace) -> int:
    from benchmarks.objectives_har_csi import DatasetObjectivesConfig, check_config, run_dataset_objectives

    if args.ablations or args.supervised_steps:
        raise BenchError("--ablations and --supervised-steps belong to --dataset parking")
    changes = given(workdir=args.workdir, windows=args.windows, pretrain_epochs=args.pretrain_epochs,
                    head_steps=args.head_steps, seeds=tuple(range(args.seeds)) if args.seeds else None)
    changes["dataset"] = args.dataset
    cfg = DatasetObjectivesConfig.full(**changes) if args.budget != "smoke" else DatasetObjectivesConfig(**changes)
    check_config(cfg)
    print(f"spar-bench objectives --dataset {cfg.dataset}: {cfg.budget()}", file=sys.stderr)
    report = run_dataset_objectives(cfg, progress=progress)
    return _write_objectives(report, cfg.budget(), args.out / f"objectives-{cfg.dataset}")
