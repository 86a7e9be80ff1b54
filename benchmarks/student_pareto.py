"""Student shapes for ``spar-bench quant --pareto``: size vs task metric vs latency, one table.

Each candidate is a distilled student checkpoint (``spar-export distill --dim/--modality-depth/
--token-merge ...``). It is exported the way the shipped model is (``export_onnx``, default
attention) and quantized the way it is (``quantize_static_int8``, MinMax on the same calibration
windows), and its FP32 and INT8 rows are timed interleaved with every other row of the quant
benchmark, so the speed-ups against the teacher come from one run on one machine.

The physical floor: ``gemm_rate`` times one ONNX Runtime MatMul of the model's own shape (tokens x
width x 4 width, the MLP's first layer, on the same thread count) and reports GFLOP/s; a model's
FLOPs divided by that rate is the least time its arithmetic can take here. A target below it is out
of reach on this CPU whatever the graph looks like; a row far above it is bound by something else
(kernel launches, small heads, memory traffic), which fewer tokens or fewer ops can still remove.

    entries, candidates = pareto_entries(["runs/s1", "runs/s2"], windows, calib_idx, tmp, threads=1)
    report = run_quant_benchmark(base_entries + entries, windows, val_idx)
    report.pareto = candidates; report.gemm_gflops = gemm_rate(threads=1)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from benchmarks.errors import BenchError
from benchmarks.quant_rows import BenchEntry, EntryResult, TimedRows, count_params
from export.parity import PRIMARY_METRICS, onnx_runner
from testbed.metric_loss import relative_loss

if TYPE_CHECKING:
    from train.data import WindowSet


@dataclass
class StudentShape:
    """One distilled student of the Pareto table and what identifies its rows."""

    name: str  # the checkpoint folder's name
    checkpoint: str
    shape: str  # "d 64, heads 4, depth 2+1, mlp 2, merge 4"
    params: int
    flops: int  # batch 1, 8 nodes (export.distill.model_size)

    @property
    def fp32_label(self) -> str:
        return f"ORT FP32 {self.name}"

    @property
    def int8_label(self) -> str:
        return f"ORT INT8 {self.name}"


class ParetoRows(TimedRows, Protocol):
    """What the "Student shapes" section reads of a quant run beyond its rows."""

    pareto: list[StudentShape]  # the students compared
    gemm_gflops: float  # measured float32 MatMul rate; 0: no floor paragraph
    teacher_flops: int


def describe_shape(cfg) -> str:
    """The size settings of an encoder config, in one short line."""
    return (f"d {cfg.dim}, heads {cfg.heads}, depth {cfg.modality_depth}+{cfg.joint_depth}, "
            f"mlp {cfg.mlp_ratio:g}, merge {getattr(cfg, 'token_merge', 1)}")


def pareto_entries(checkpoints: Sequence[str | Path], windows: WindowSet, calib_indices, workdir: str | Path, *,
                   threads: int = 1) -> tuple[list[BenchEntry], list[StudentShape]]:
    """FP32 and INT8 rows of every distilled student in ``checkpoints`` (exported and quantized as the
    shipped model is)."""
    from export.distill import load_student, model_size
    from export.errors import ExportError
    from export.onnx_export import export_onnx
    from export.quant_int8 import quantize_static_int8

    workdir = Path(workdir)
    entries: list[BenchEntry] = []
    shapes: list[StudentShape] = []
    names = [Path(p).name if Path(p).is_dir() else Path(p).parent.name for p in checkpoints]
    if len(set(names)) != len(names):
        raise BenchError(f"--pareto: give students in folders with distinct names, got {', '.join(names)}")
    for name, path in zip(names, checkpoints, strict=True):
        try:
            model, _ = load_student(path)
            fp32 = export_onnx(model, workdir / f"pareto.{name}.onnx")
            int8 = quantize_static_int8(fp32, workdir / f"pareto.{name}.int8.onnx", windows, calib_indices)
        except ExportError as exc:
            raise BenchError(f"--pareto {path}: {exc}") from None
        shape = StudentShape(name, str(path), describe_shape(model.encoder.cfg), count_params(model),
                             model_size(model)["flops"])
        shapes.append(shape)
        for label, file in ((shape.fp32_label, fp32), (shape.int8_label, int8)):
            entries.append(BenchEntry(label, onnx_runner(file, threads, model.output_names), shape.params,
                                      file.stat().st_size, model))
    return entries, shapes


def gemm_rate(tokens: int = 96, width: int = 64, threads: int = 1, repeats: int = 200) -> float:
    """GFLOP/s of one float32 MatMul [tokens, width] x [width, 4 width] in ONNX Runtime (median of
    ``repeats``): the arithmetic rate a transformer layer of this size can reach on this CPU."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((width, 4 * width)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, 4 * width])],
                              initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((tokens, width)).astype(np.float32)
    for _ in range(10):
        session.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return 2 * tokens * width * 4 * width / float(np.median(times)) / 1e9


def _primary_keys(metrics: dict[str, float]) -> list[tuple[str, bool]]:
    """("task/metric", higher_is_better) of every task's primary metric present in ``metrics``."""
    keys = []
    for task, (metric, higher) in PRIMARY_METRICS.items():
        if f"{task}/{metric}" in metrics:
            keys.append((f"{task}/{metric}", higher))
    return keys


def frontier(points: dict[str, tuple[float, list[float]]]) -> set[str]:
    """Names not dominated: ``points`` name -> (latency, [metric values, each oriented so that higher
    is better]). Dominated = another is no slower and no worse on any metric, and better on one."""
    out = set()
    for name, (latency, metrics) in points.items():
        dominated = False
        for other, (o_latency, o_metrics) in points.items():
            if other == name:
                continue
            no_worse = o_latency <= latency and all(o >= m for o, m in zip(o_metrics, metrics, strict=True))
            better = o_latency < latency or any(o > m for o, m in zip(o_metrics, metrics, strict=True))
            if no_worse and better:
                dominated = True
                break
        if not dominated:
            out.add(name)
    return out


def pareto_markdown(report: ParetoRows, teacher_label: str) -> list[str]:
    """The "Student shapes" section: one row per student (and the shipped one), speed-ups against the
    FP32 teacher in ONNX Runtime, each task's primary metric against the teacher's, the frontier."""
    labels = {e.label: e for e in report.entries}
    teacher = labels[teacher_label]
    keys = _primary_keys(teacher.metrics)
    b_small, b_big = report.batches[0], report.batches[-1]
    rows = [(s.name, s.shape, s.params, s.flops, labels[s.fp32_label], labels[s.int8_label]) for s in report.pareto]
    points = {name: (int8.p(b_small, 50), [int8.metrics[k] if higher else -int8.metrics[k] for k, higher in keys])
              for name, _, _, _, _, int8 in rows}
    best = frontier(points)
    lines = ["## Student shapes: size vs metric vs latency (issue 20)", "",
             f"Distilled students (`spar-export distill`), each exported and quantized as the shipped model is "
             f"(static Q/DQ, MinMax); rows above, timed interleaved with the rest. Speed-up = p50 of the ORT FP32 "
             f"teacher / p50 of the student's INT8 graph. Metric change relative to the FP32 teacher "
             f"(positive = worse). Frontier: no other student is faster at batch {b_small} and no worse on every "
             f"task.", ""]
    head = ["student", "shape", "params", "MFLOPs", f"FP32 b{b_small} ms", f"INT8 b{b_small} ms",
            f"INT8 b{b_big} ms", f"INT8 vs teacher b{b_small}", f"INT8 vs teacher b{b_big}",
            f"INT8 vs FP32 b{b_small}"]
    head += [f"{k} (change)" for k, _ in keys] + ["frontier"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, shape, params, flops, fp32, int8 in rows:
        cells = [name, shape, f"{params:,}", f"{flops / 1e6:.1f}", f"{fp32.p(b_small, 50):.2f}",
                 f"{int8.p(b_small, 50):.2f}", f"{int8.p(b_big, 50):.2f}",
                 f"{teacher.p(b_small, 50) / int8.p(b_small, 50):.2f}x",
                 f"{teacher.p(b_big, 50) / int8.p(b_big, 50):.2f}x",
                 f"{fp32.p(b_small, 50) / int8.p(b_small, 50):.2f}x"]
        for key, higher in keys:
            t, s = teacher.metrics[key], int8.metrics.get(key, float("nan"))
            worse = relative_loss(s, t, higher)
            cells.append(f"{s:.4g} ({100 * worse:+.1f} %)")
        cells.append("yes" if name in best else "")
        lines.append("| " + " | ".join(cells) + " |")
    if report.gemm_gflops:
        lines += ["", *floor_lines(report, teacher, rows)]
    return lines


def floor_lines(report: ParetoRows, teacher: EntryResult, rows: list[tuple]) -> list[str]:
    """The physical-floor paragraph: FLOPs / measured GEMM rate against each measured latency."""
    rate = report.gemm_gflops
    b = report.batches[0]
    teacher_flops = report.teacher_flops
    lines = [f"**Physical floor.** One float32 MatMul of the students' own shape runs at {rate:.1f} GFLOP/s on "
             f"{report.threads} thread(s) here (`gemm_rate`). FLOPs / that rate = the least time the arithmetic "
             f"can take; achieved = FLOPs / measured FP32 p50 at batch {b}.", "",
             "| model | MFLOPs | arithmetic floor ms | FP32 p50 ms | achieved GFLOP/s |", "|---|---|---|---|---|"]
    if teacher_flops:
        lines.append(f"| teacher | {teacher_flops / 1e6:.1f} | {teacher_flops / rate / 1e6:.2f} | "
                     f"{teacher.p(b, 50):.2f} | {teacher_flops / teacher.p(b, 50) / 1e6:.1f} |")
    for name, _, _, flops, fp32, _ in rows:
        lines.append(f"| {name} | {flops / 1e6:.1f} | {flops / rate / 1e6:.2f} | {fp32.p(b, 50):.2f} | "
                     f"{flops / fp32.p(b, 50) / 1e6:.1f} |")
    return lines
