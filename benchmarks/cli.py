"""``spar-bench``: benchmarks, field trials and the walking-skeleton demo."""

from __future__ import annotations

import argparse
import math
import signal
import sys
from pathlib import Path
from typing import Any

from benchmarks.bandwidth_bench import DEFAULT_CODECS
from benchmarks.errors import BenchError
from node_firmware_sim.errors import NodeError
from spar_wire.codecs import CodecSpec
from spar_wire.errors import WireError
from spar_wire.site_layout import load_site_layout
from train.errors import TrainError

DEFAULT_SITE = Path("configs/sites/parking_lot.toml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spar-bench", description="spar-edge benchmarks, trials and demos.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sk = sub.add_parser("skeleton", help="walking skeleton: local Mosquitto + one sine node + "
                        "decoding aggregator stub",
                        description="Start a private Mosquitto on a free loopback port, one "
                        "simulated node publishing sine-wave tokens, and an aggregator stub that "
                        "decodes and prints what arrived; then compare sent and received counts.")
    sk.add_argument("--site", type=Path, default=DEFAULT_SITE, help="site layout TOML (default: %(default)s)")
    sk.add_argument("--node", default=None, help="node id (default: the site's first node)")
    sk.add_argument("--duration", type=float, default=10.0,
                    help="seconds of signal to publish, in real time (default: %(default)s)")
    sk.add_argument("--codec", default="webp:85", help="raw32 | raw | png | jpeg:Q | webp:Q | "
                    "webp:lossless (default: %(default)s)")
    sk.add_argument("--fast", action="store_true", help="publish as fast as possible instead of in real time")
    sk.set_defaults(func=_cmd_skeleton)

    cd = sub.add_parser("codecs", help="round-trip error and size of every codec on a sample window",
                        description="For each modality of a site, encode one sine window with every "
                        "codec and report bytes on the wire and the round-trip error in dB.")
    cd.add_argument("--site", type=Path, default=DEFAULT_SITE, help="site layout TOML (default: %(default)s)")
    cd.add_argument("--codecs", default="raw32,raw,png,webp:lossless,webp:95,webp:85,webp:75,webp:50,"
                    "jpeg:95,jpeg:85,jpeg:75,jpeg:50", help="comma-separated codec list")
    cd.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    cd.set_defaults(func=_cmd_codecs)

    rt = sub.add_parser("runtime", help="aggregator vs bare-model throughput, added latency, ingest capacity",
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

    ob = sub.add_parser("objectives", help="SPAR vs MAE vs supervised, and SPAR's ablations (paper Tables 1, 8)",
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

    mc = sub.add_parser("model", help="the shipped model against the floors on a recording it never trained on",
                        description="Run every artifact of a model folder (INT8 student, FP32 student, teacher/) in "
                        "ONNX Runtime on a test recording, beside the floors (softmax / kNN / energy centroid on band "
                        "energies, fitted on the model's training recording), with complete windows and with lost "
                        "messages, and check the shipped model's targets. Writes a markdown report and JSON.")
    mc.add_argument("--model", type=Path, default=Path("models/parking_lot"),
                    help="model folder (default: %(default)s)")
    mc.add_argument("--test", type=Path, default=Path("build/models-standard/test"),
                    help="test recording, never trained on (default: %(default)s, written by `make models "
                    "BUDGET=standard`)")
    mc.add_argument("--train", type=Path, default=Path("build/models-standard/data"),
                    help="the model's training recording, for the floors (default: %(default)s)")
    mc.add_argument("--loss", type=float, action="append", help="message loss rates (repeatable; default 0 and 0.2)")
    mc.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default: %(default)s)")
    mc.add_argument("--out", type=Path, default=Path("benchmarks/results/model.md"),
                    help="markdown report; JSON beside it (default: %(default)s)")
    mc.set_defaults(func=_cmd_model)

    pl = sub.add_parser("placement", help="frozen encoders on a sensor layout unseen in pretraining (paper Table 7)",
                        description="Generate two simulated lots with the same sensors in different places "
                        "(layout A: 8 perimeter nodes, layout B: 6 other places), pretrain SPAR, SPAR+LLM and MAE "
                        "on each, fine-tune localization heads on B with encoders pretrained on A (learnable slots: "
                        "nearest / mean / random; SPAR+LLM: from the nodes' descriptions), and compare with the "
                        "encoders pretrained on B and with layout A. Target: unseen error <= 1.2x. Writes "
                        "placement.md/.json/.png. About 40 min on 2 idle cores with the defaults; finished jobs "
                        "are remembered, so an interrupted run resumes.")
    pl.add_argument("--full", action="store_true", help="longer budget: 3000 windows per layout, 40 epochs, 3 seeds")
    pl.add_argument("--windows-a", type=int, help="layout A windows (default 1200; --full 3000)")
    pl.add_argument("--windows-b", type=int, help="layout B windows (default 1200; --full 3000)")
    pl.add_argument("--pretrain-epochs", type=int, help="default 10 (--full 40)")
    pl.add_argument("--head-steps", type=int, help="localization head steps (default 700; --full 1500)")
    pl.add_argument("--seeds", type=int, help="number of seeds (default 1; --full 3)")
    pl.add_argument("--methods", help="comma-separated subset of: " + "; ".join(
        ["spar (nearest slot)", "spar (mean vector)", "spar (random slot)", "spar+llm (text)", "mae"]))
    pl.add_argument("--workdir", type=Path, default=Path("benchmarks/.work/placement"),
                    help="datasets, checkpoints and finished-job ledger (default: %(default)s)")
    pl.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                    help="where placement.md/.json/.png go (default: %(default)s)")
    pl.set_defaults(func=_cmd_placement)

    qb = sub.add_parser("quant", help="teacher vs student, torch vs ONNX Runtime, FP32 vs INT8: latency and metric",
                        description="Torch eager FP32 teacher and student, ONNX Runtime FP32 teacher and student, "
                        "ONNX Runtime INT8 (static Q/DQ and dynamic) student: parameters, file size, latency "
                        "p50/p99 at batch 1 and 8 with 8 nodes (real windows), task metric on the validation "
                        "windows; all in one process with the same thread count. Defaults point at what "
                        "`make models` builds.")
    qb.add_argument("--teacher", action="append", help="fine-tuned teacher checkpoint(s) (default: the ones "
                    "`make models BUDGET=standard` chose, listed in build/models-standard/teacher.txt)")
    qb.add_argument("--student", default="build/models-standard/student",
                    help="distilled checkpoint (default: %(default)s)")
    qb.add_argument("--models", type=Path, default=Path("models/parking_lot"),
                    help="folder with model.onnx, model.int8.onnx (default: %(default)s)")
    qb.add_argument("--data", default="build/models-standard/data", help="dataset (default: %(default)s)")
    qb.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads (default: %(default)s)")
    qb.add_argument("--repeats", type=int, default=100, help="timed runs per entry and batch (default: %(default)s)")
    qb.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where quant.md/.png go")
    qb.add_argument("--attention", nargs="*", metavar="MODE", default=None,
                    help="attention options to compare (FP32 and INT8 rows of the student exported with each; "
                         "default: all of plain, mha, attention23, ort-fusion; none: skip the comparison)")
    qb.add_argument("--pareto", nargs="+", metavar="STUDENT", default=None,
                    help="distilled student checkpoints (folders) of other shapes: each exported and quantized as "
                         "the shipped model, timed with the rest; adds the size / metric / latency table and the "
                         "FLOPs-vs-GEMM-rate floor")
    qb.add_argument("--int8-settings", action="store_true",
                    help="also quantize the shipped student's FP32 graph with each INT8 setting (static/dynamic, "
                         "per-channel/per-tensor, s8/u8 activations, reduce-range) and time every one")
    qb.add_argument("--calibration-windows", type=int, default=128,
                    help="MinMax calibration windows of the attention rows' INT8 graphs (default: %(default)s)")
    qb.set_defaults(func=_cmd_quant)

    _add_field_benchmarks(sub)
    _add_fuzz(sub)
    args = parser.parse_args(argv)
    # SIGTERM (systemd, `kill`, a CI timeout) ends a run like Ctrl-C: brokers stopped, partial
    # results written, instead of dying with child processes left behind.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except (WireError, BenchError, TrainError, NodeError) as exc:
        print(f"spar-bench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _add_field_benchmarks(sub: Any) -> None:
    """bandwidth and lossy: series of live trials; latency: the aggregator under rising load."""
    bw = sub.add_parser("bandwidth", help="bytes on the wire vs task metric per codec (paper Table 5, live)",
                        description="One trial per codec through a private broker and the real aggregator running "
                        "the shipped model on a perfect link, same seed for all: bytes per window on the wire, "
                        "share of float32, task metric against the simulator's truth, and the knee (cheapest codec "
                        "within --tolerance of float32). Writes bandwidth.md/.json/.png. About 4 min with defaults.")
    bw.add_argument("--codecs", default=",".join(DEFAULT_CODECS),
                    help="comma-separated codecs, the first is the reference (default: %(default)s)")
    bw.add_argument("--tolerance", type=float, default=0.01,
                    help="relative metric loss the knee may have (default: %(default)s)")
    _add_series_args(bw, "bandwidth", speed=10.0, codec=None)
    bw.set_defaults(func=_cmd_bandwidth)

    lo = sub.add_parser("lossy", help="completeness and task metric under lossy links (paper Table 6, live)",
                        description="One trial per link condition (independent loss 0/5/10/20/40 %%, burst loss, "
                        "node outages, jitter beyond the deadline) through a private broker and the real "
                        "aggregator, same seed for all: injected vs observed loss, late messages, window "
                        "completeness and task metric; then early close vs deadline-only window closing in real time. "
                        "Writes lossy.md/.json/.png. About 10 min with defaults.")
    lo.add_argument("--timing-speed", type=float, default=4.0,
                    help="timeline compression of the outage and jitter conditions (default: %(default)s)")
    lo.add_argument("--close-duration", type=float, default=120.0,
                    help="seconds of each of the two real-time trials comparing early close with deadline-only "
                    "window closing on configs/links/lossy.toml; 0 skips them (default: %(default)s)")
    _add_series_args(lo, "lossy", speed=10.0, codec="webp:85")
    lo.set_defaults(func=_cmd_lossy)

    from benchmarks.fault_trial import add_faults_parser
    from benchmarks.latency_bench import add_latency_parser
    from benchmarks.overload_bench import add_overload_parser

    add_latency_parser(sub)
    add_faults_parser(sub)
    add_overload_parser(sub)


def _add_fuzz(sub: Any) -> None:
    fz = sub.add_parser("fuzz", help="hostile-input fuzzing of a running aggregator (issue 9)",
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
    report = run_fuzz(config, args.workdir, progress=lambda text: print(f"... {text}", file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.md").write_text(report.to_markdown())
    (args.out / "fuzz.json").write_text(report.to_json())
    print(report.to_markdown())
    print(f"report: {args.out / 'fuzz.md'}; aggregator log: {args.workdir / 'aggregator.log'}")
    problems = report.problems(args.rss_bound)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _add_series_args(p: argparse.ArgumentParser, name: str, *, speed: float, codec: str | None) -> None:
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


def _series_base(args: argparse.Namespace, **changes: Any) -> Any:
    from benchmarks.trial import DEFAULT_MODEL, DEFAULT_SITE, TrialConfig
    from benchmarks.trial_cli import SHIPPED_MODEL_PARAMS

    if args.windows < 8:
        raise BenchError("--windows must be >= 8")
    layout = load_site_layout(DEFAULT_SITE)
    window_s = max(spec.features.window_s for spec in layout.modalities.values())
    return TrialConfig(out=args.workdir, model=args.model or DEFAULT_MODEL,
                       scenario_params={} if args.model else dict(SHIPPED_MODEL_PARAMS),
                       duration_s=args.windows * window_s, seed=args.seed, speed=args.speed, broker=args.broker,
                       **changes)


def _write_report(report: Any, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(report.to_markdown())
    (out / f"{name}.json").write_text(report.to_json())
    report.plot(out / f"{name}.png")
    print(report.to_markdown())
    print(f"report: {out / f'{name}.md'}, plot: {out / f'{name}.png'}")


def _cmd_bandwidth(args: argparse.Namespace) -> int:
    from benchmarks.bandwidth_bench import run_bandwidth

    codecs = tuple(c.strip() for c in args.codecs.split(",") if c.strip())
    report = run_bandwidth(_series_base(args), codecs, tolerance=args.tolerance, reuse=not args.fresh,
                           progress=lambda text: print(f"... {text}", file=sys.stderr, flush=True))
    _write_report(report, args.out, "bandwidth")
    return 0


def _cmd_lossy(args: argparse.Namespace) -> int:
    from benchmarks.lossy_bench import run_lossy

    report = run_lossy(_series_base(args, codec=args.codec), timing_speed=args.timing_speed, reuse=not args.fresh,
                       close_duration_s=args.close_duration,
                       progress=lambda text: print(f"... {text}", file=sys.stderr, flush=True))
    _write_report(report, args.out, "lossy")
    return 0


def _cmd_skeleton(args: argparse.Namespace) -> int:
    from benchmarks.skeleton import run_skeleton  # paho is only needed here

    layout = load_site_layout(args.site)
    node_id = args.node or layout.node_ids[0]
    layout.node(node_id)
    longest = max(layout.modalities[m].features.window_s for m in layout.node(node_id).modalities)
    windows = max(1, int(args.duration // longest))
    print(f"walking skeleton: site {layout.site_id}, node {node_id}, {windows} window(s) of "
          f"{longest:g} s, codec {CodecSpec.parse(args.codec).label}")
    result = run_skeleton(layout, node_id, windows, CodecSpec.parse(args.codec),
                          realtime=not args.fast, print_fn=print)
    sent = sum(p.acknowledged for p in result.published)
    print(f"broker 127.0.0.1:{result.broker_port}: node published {len(result.published)} "
          f"messages ({sent} acknowledged, {sum(p.bytes for p in result.published)} bytes); "
          f"aggregator stub counted {result.counts} in {result.elapsed_s:.1f} s")
    if not result.all_delivered:
        print("error: sent and received messages differ", file=sys.stderr)
        return 1
    print("ok: every acknowledged message arrived and decoded")
    return 0


def _cmd_runtime(args: argparse.Namespace) -> int:
    from benchmarks.runtime_bench import run_runtime_benchmark, run_store_benchmark, splice_store_section, summary_line
    from edge_runtime.errors import AggregatorError

    if args.spread_ms < 0 or not math.isfinite(args.spread_ms):
        raise BenchError("--spread-ms must be a finite number >= 0")
    if args.windows < 10:
        raise BenchError("--windows must be >= 10")
    if args.store_batches < 0 or (args.store_only and args.store_batches < 1):
        raise BenchError("--store-batches must be >= 0 (>= 1 with --store-only)")
    store_dir = args.store_dir if args.store_dir is not None else args.out.parent

    def progress(text: str) -> None:
        print(f"... {text}", file=sys.stderr)

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


def _cmd_objectives(args: argparse.Namespace) -> int:
    import json

    if args.detector and args.dataset != "parking_lot_multi":
        raise BenchError("--detector belongs to --dataset parking_lot_multi")
    if args.dataset in ("quakes", "parking_lot_multi"):
        return _cmd_task_objectives(args)
    if args.dataset != "parking":
        return _cmd_dataset_objectives(args)

    from benchmarks.objectives import ObjectivesConfig, check_config, run_objectives

    changes = {name: value for name, value in (
        ("workdir", args.workdir), ("windows", args.windows), ("pretrain_epochs", args.pretrain_epochs),
        ("head_steps", args.head_steps), ("supervised_steps", args.supervised_steps),
        ("seeds", tuple(range(args.seeds)) if args.seeds else None),
        ("ablations", () if args.ablations == "none" else
         tuple(a.strip() for a in args.ablations.split(",")) if args.ablations else None)) if value is not None}
    cfg = ObjectivesConfig.for_budget(args.budget, **changes)
    check_config(cfg)
    print(f"spar-bench objectives: {cfg.budget()}", file=sys.stderr)
    report = run_objectives(cfg, progress=lambda text: print(f"... {text}", file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "objectives.md").write_text(report.to_markdown())
    (args.out / "objectives.json").write_text(json.dumps(
        {"machine": report.machine, "budget": cfg.budget(), "results": report.results}, indent=2) + "\n")
    report.plot(args.out / "objectives.png")
    print(report.to_markdown())
    print(f"report: {args.out / 'objectives.md'}, plot: {args.out / 'objectives.png'}")
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    import json

    from benchmarks.model_check import ModelCheckConfig, run_model_check

    for path in (args.test, args.train):
        if not (path / "dataset.json").exists():
            raise BenchError(f"{path} is not a dataset folder; `make models BUDGET=standard` writes both recordings, "
                             "or give --test/--train from `spar-node dataset`")
    rates = tuple(args.loss) if args.loss else (0.0, 0.2)
    if any(not 0 <= r < 1 for r in rates):
        raise BenchError("--loss rates must be in [0, 1)")
    cfg = ModelCheckConfig(model_dir=args.model, test_data=args.test, train_data=args.train, loss_rates=rates,
                           threads=args.threads)
    report = run_model_check(cfg, progress=lambda text: print(f"... {text}", file=sys.stderr, flush=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.to_markdown())
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": report.machine, "model": report.manifest.get("model"), "training": report.manifest.get("training"),
         "rows": {f"{r:g}": v for r, v in report.rows.items()},
         "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in report.targets]}, indent=2) + "\n")
    print(report.to_markdown())
    return 0


def _write_objectives(report, budget: str, stem: Path) -> int:
    """STEM.md, STEM.json and STEM.png of a dataset objectives report; the table on stdout."""
    import json

    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(report.to_markdown())
    stem.with_suffix(".json").write_text(json.dumps(
        {"machine": report.machine, "budget": budget, "rows": report.table(), "results": report.results},
        indent=2) + "\n")
    report.plot(stem.with_suffix(".png"))
    print(report.to_markdown())
    print(f"report: {stem.with_suffix('.md')}, plot: {stem.with_suffix('.png')}")
    return 0


def _cmd_task_objectives(args: argparse.Namespace) -> int:
    from benchmarks.objectives_tasks import TaskObjectivesConfig, check_config, run_task_objectives

    if args.ablations:
        raise BenchError("--ablations belong to --dataset parking")
    changes = {name: value for name, value in (
        ("workdir", args.workdir), ("windows", args.windows), ("pretrain_epochs", args.pretrain_epochs),
        ("head_steps", args.head_steps), ("supervised_steps", args.supervised_steps),
        ("seeds", tuple(range(args.seeds)) if args.seeds else None), ("detector", args.detector))
        if value is not None}
    cfg = TaskObjectivesConfig.for_budget(args.budget, dataset=args.dataset, **changes)
    check_config(cfg)
    print(f"spar-bench objectives --dataset {cfg.dataset}: {cfg.budget()}", file=sys.stderr)
    report = run_task_objectives(cfg, progress=lambda text: print(f"... {text}", file=sys.stderr, flush=True))
    return _write_objectives(report, cfg.budget(), args.out / f"objectives-{cfg.dataset}")


def _cmd_dataset_objectives(args: argparse.Namespace) -> int:
    from benchmarks.objectives_har_csi import DatasetObjectivesConfig, check_config, run_dataset_objectives

    if args.ablations or args.supervised_steps:
        raise BenchError("--ablations and --supervised-steps belong to --dataset parking")
    changes = {name: value for name, value in (
        ("workdir", args.workdir), ("windows", args.windows), ("pretrain_epochs", args.pretrain_epochs),
        ("head_steps", args.head_steps), ("seeds", tuple(range(args.seeds)) if args.seeds else None))
        if value is not None}
    changes["dataset"] = args.dataset
    cfg = DatasetObjectivesConfig.full(**changes) if args.budget != "smoke" else DatasetObjectivesConfig(**changes)
    check_config(cfg)
    print(f"spar-bench objectives --dataset {cfg.dataset}: {cfg.budget()}", file=sys.stderr)
    report = run_dataset_objectives(cfg, progress=lambda text: print(f"... {text}", file=sys.stderr, flush=True))
    return _write_objectives(report, cfg.budget(), args.out / f"objectives-{cfg.dataset}")


def _cmd_placement(args: argparse.Namespace) -> int:
    import json

    from benchmarks.placement_bench import PlacementConfig, check_config, run_placement

    changes = {name: value for name, value in (
        ("workdir", args.workdir), ("windows_a", args.windows_a), ("windows_b", args.windows_b),
        ("pretrain_epochs", args.pretrain_epochs), ("head_steps", args.head_steps),
        ("seeds", tuple(range(args.seeds)) if args.seeds else None),
        ("methods", tuple(m.strip() for m in args.methods.split(",")) if args.methods else None))
        if value is not None}
    cfg = PlacementConfig.full(**changes) if args.full else PlacementConfig(**changes)
    check_config(cfg)
    print(f"spar-bench placement: {cfg.budget()}", file=sys.stderr)
    report = run_placement(cfg, progress=lambda text: print(f"... {text}", file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "placement.md").write_text(report.to_markdown())
    (args.out / "placement.json").write_text(json.dumps(
        {"machine": report.machine, "budget": cfg.budget(), "rows": report.rows(), "results": report.results},
        indent=2) + "\n")
    report.plot(args.out / "placement.png")
    print(report.to_markdown())
    print(f"report: {args.out / 'placement.md'}, plot: {args.out / 'placement.png'}")
    return 0


def _chosen_teacher(listing: Path) -> list[str]:
    """The teacher checkpoints `make models` chose (one path per line of ``listing``)."""
    if not listing.exists():
        raise BenchError(f"{listing} does not exist: run `make models BUDGET=standard` first, or give --teacher")
    return [line.strip() for line in listing.read_text().splitlines() if line.strip()]


def _cmd_quant(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from benchmarks.int8_settings import int8_setting_entries
    from benchmarks.quant_bench import (
        STANDARD_RATIOS,
        attention_entries,
        attention_parity,
        attention_ratios,
        run_quant_benchmark,
        standard_entries,
    )
    from benchmarks.student_pareto import gemm_rate, pareto_entries
    from benchmarks.trial import model_label
    from export.distill import model_size
    from export.errors import ExportError
    from export.exporter import load_deployable
    from export.quantize import calibration_indices
    from train.data import load_windows, temporal_split

    teachers = args.teacher or _chosen_teacher(Path(args.student).parent / "teacher.txt")
    try:
        teacher, _ = load_deployable(teachers)
        student, _ = load_deployable([args.student])
    except ExportError as exc:
        raise BenchError(f"{exc} (run `make models` first, or give --teacher/--student)") from None
    torch.set_num_threads(args.threads)
    windows = load_windows(args.data, progress=False)
    train_idx, val_idx = temporal_split(len(windows), 0.25)
    dynamic = args.models / "model.int8.dynamic.onnx"
    with tempfile.TemporaryDirectory(prefix="spar-quant-") as work:
        entries = standard_entries(teacher, student, args.models / "model.onnx", args.models / "model.int8.onnx",
                                   threads=args.threads, workdir=work,
                                   student_int8_dynamic=dynamic if dynamic.exists() else None)
        options, ratios, shapes = [], STANDARD_RATIOS, []
        calib = calibration_indices(train_idx, args.calibration_windows)  # as `spar-export quantize` picks them
        if args.pareto:
            extra, shapes = pareto_entries(args.pareto, windows, calib, work, threads=args.threads)
            entries += extra
        if args.int8_settings:
            entries += int8_setting_entries(student, args.models / "model.onnx", windows, calib, work,
                                            threads=args.threads)
        if args.attention is None or args.attention:
            extra, options = attention_entries(student, windows, calib, work, threads=args.threads,
                                               modes=args.attention or None)
            entries += extra
            ratios = STANDARD_RATIOS + attention_ratios(options)
        report = run_quant_benchmark(entries, windows, val_idx, repeats=args.repeats, threads=args.threads,
                                     ratios=ratios)
        if options:
            attention_parity(student, entries, options, windows, val_idx[:256])
            report.attention = options
        if shapes:
            report.pareto, report.gemm_gflops = shapes, gemm_rate(threads=args.threads)
            report.teacher_flops = model_size(teacher)["flops"]
        report.int8_settings = args.int8_settings
    report.model = model_label(args.models / "manifest.json")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant.md").write_text(report.to_markdown())
    report.plot(args.out / "quant.png")
    print(report.to_markdown())
    print(f"report: {args.out / 'quant.md'}, plot: {args.out / 'quant.png'}")
    return 0


def _cmd_codecs(args: argparse.Namespace) -> int:
    from benchmarks.codec_report import codec_report, format_codec_report
    from benchmarks.machine import describe_machine

    layout = load_site_layout(args.site)
    specs = [CodecSpec.parse(text) for text in args.codecs.split(",") if text.strip()]
    text = format_codec_report(codec_report(layout, specs))
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Codec round trip on one sine window per modality (`spar-bench codecs`)\n\n"
                            f"{describe_machine()} · site {layout.site_id}\n\n```\n{text}\n```\n")
        print(f"report: {args.out}")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
