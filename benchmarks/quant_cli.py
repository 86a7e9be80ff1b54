"""``spar-bench quant``: the deployment benchmark's command line.

One run gathers rows from three modules (``quant_bench``: the standard and attention rows;
``student_pareto``: other student shapes; ``int8_settings``: INT8 settings) and times them together,
so the command sits above all three. Its handler imports them only when it runs: they load torch
and the exporter, which ``spar-bench --help`` has no use for.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.errors import BenchError


def register(subparsers: Any) -> None:
    """Add ``spar-bench quant`` to ``subparsers`` (``parser.add_subparsers()``)."""
    qb = subparsers.add_parser(
        "quant", help="teacher vs student, torch vs ONNX Runtime, FP32 vs INT8: latency and metric",
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
    from export.distill import model_size
    from export.errors import ExportError
    from export.exporter import load_deployable
    from export.quant_calibration import calibration_indices
    from train.data import load_windows, temporal_split
    from trials.trial import model_label

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
