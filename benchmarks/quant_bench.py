"""Deployment benchmark: latency and task metric of teacher / student, torch eager / ONNX Runtime FP32 / INT8.

Every entry is measured in one process on one machine with the same thread count for torch and
ONNX Runtime: latency p50 / p99 per batch size at a fixed node count (inputs cut or padded from
real windows), and the task metric of the whole held-out set through ``export.parity.evaluate_runner``.
Entries are timed round-robin (each repeat runs every entry once), so a noisy neighbour slows
them all alike instead of whichever happened to run during the noise.

    entries = standard_entries(teacher, student, "student.onnx", "student.int8.onnx", threads=1, workdir=tmp)
    report = run_quant_benchmark(entries, windows, val_idx, threads=1)
    print(report.to_markdown()); report.plot(Path("quant.png"))

Attention options (issue 20): ``attention_entries`` exports the student with each way of writing
attention (``export.attention.ATTENTION_MODES``), quantizes each to INT8 the same way, and adds a
FP32 and an INT8 row per mode, timed interleaved with every other row; ``attention_parity`` measures
each graph against torch FP32 on the same windows; the report's "Attention options" table says which
op each graph holds, whether ONNX Runtime fuses the plain graph at load, what TensorRT parses, and
the speed-up of each fused mode over the plain graph.

The rows themselves (``BenchEntry``, ``EntryResult``) are defined in ``quant_rows``, below this module
and below the sections it calls (``int8_settings``, ``student_pareto``); the command line is
``quant_cli``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.errors import BenchError
from benchmarks.experiment_ledger import versions
from benchmarks.int8_settings import int8_settings_markdown
from benchmarks.quant_rows import BenchEntry, EntryResult, count_params
from benchmarks.student_pareto import StudentShape, pareto_markdown
from export.deploy_model import DeployModel
from export.parity import PRIMARY_METRICS, evaluate_runner, flatten_metrics, onnx_runner, torch_runner
from spar_wire.model_manifest import NODE_INDEX_INPUT, POSITIONS_INPUT
from testbed.machine import describe_machine
from testbed.metric_loss import relative_loss
from train.data import WindowSet

TEACHER_TORCH = "torch FP32 teacher"
STUDENT_TORCH = "torch FP32 student"
TEACHER_ORT = "ORT FP32 teacher"
STUDENT_ORT = "ORT FP32 student"
STUDENT_INT8 = "ORT INT8 student"
STUDENT_INT8_DYNAMIC = "ORT INT8 dynamic student"


def attention_label(precision: str, mode: str) -> str:
    """Row label of the student exported with attention ``mode`` (FP32 or INT8)."""
    return f"ORT {precision} student, {mode} attention"


# (name, slower entry, faster entry): speed-up = p50 latency of the first / p50 of the second.
STANDARD_RATIOS = (
    ("INT8 student vs FP32 teacher, both ORT", TEACHER_ORT, STUDENT_INT8),
    ("INT8 ORT vs torch eager FP32, student", STUDENT_TORCH, STUDENT_INT8),
    ("INT8 vs FP32, student, both ORT", STUDENT_ORT, STUDENT_INT8),
    ("FP32 student vs FP32 teacher, torch eager", TEACHER_TORCH, STUDENT_TORCH),
    ("INT8 dynamic vs FP32, student, both ORT", STUDENT_ORT, STUDENT_INT8_DYNAMIC),
)


@dataclass
class QuantBenchReport:
    """Every row's latencies and metrics and the comparisons asked for; ``to_markdown`` is quant.md."""

    entries: list[EntryResult]
    batches: tuple[int, ...]
    nodes: int
    threads: int
    repeats: int
    eval_windows: int
    metric_key: str | None
    machine: str
    ratios: dict[str, dict[int, float]] = field(default_factory=dict)  # name -> batch -> speed-up
    model: str = ""  # which model folder the ONNX entries come from (name, version, budget)
    attention: list[AttentionOption] = field(default_factory=list)  # the attention comparison, if run
    pareto: list[StudentShape] = field(default_factory=list)  # student shapes compared (--pareto)
    gemm_gflops: float = 0.0  # measured float32 MatMul rate (the physical floor of the pareto section)
    teacher_flops: int = 0
    int8_settings: bool = False  # the INT8 settings rows were measured (--int8-settings)

    def entry(self, label: str) -> EntryResult:
        for e in self.entries:
            if e.label == label:
                return e
        raise KeyError(label)

    def to_markdown(self) -> str:
        lines = ["# spar-bench quant: teacher / student, FP32 / INT8", "", f"machine: {self.machine}", "",
                 *([f"model: {self.model}", ""] if self.model else []),
                 f"{self.threads} thread(s) for torch and ONNX Runtime alike; {self.nodes} nodes per window; "
                 f"latency over {self.repeats} repeats per batch size (entries interleaved); task metric on "
                 f"{self.eval_windows} held-out real windows.", ""]
        head = ["entry", "params", "file MiB"]
        for b in self.batches:
            head += [f"b{b} p50 ms", f"b{b} p99 ms"]
        head += [f"windows/s (b{self.batches[-1]})", self.metric_key or "metric"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in self.entries:
            cells = [e.label, f"{e.params:,}", "–" if e.file_bytes is None else f"{e.file_bytes / 2 ** 20:.3f}"]
            for b in self.batches:
                cells += [f"{e.p(b, 50):.2f}", f"{e.p(b, 99):.2f}"]
            cells.append(f"{1e3 * self.batches[-1] / e.p(self.batches[-1], 50):,.0f}")
            cells.append(f"{e.metrics[self.metric_key]:.4g}" if self.metric_key in e.metrics else "–")
            lines.append("| " + " | ".join(cells) + " |")
        if self.ratios:
            lines += ["", "| speed-up (p50 latency ratio) | " + " | ".join(f"b{b}" for b in self.batches) + " |",
                      "|---|" + "---|" * len(self.batches)]
            for name, values in self.ratios.items():
                lines.append(f"| {name} | " + " | ".join(f"{values[b]:.2f}x" for b in self.batches) + " |")
        if self.attention:
            lines += ["", *attention_markdown(self)]
        if self.pareto:
            lines += ["", *pareto_markdown(self, TEACHER_ORT)]
        if self.int8_settings:
            lines += ["", *int8_settings_markdown(self, STUDENT_ORT)]
        lines += ["", *targets_markdown(self)]
        metric_names = sorted({k for e in self.entries for k in e.metrics})
        if metric_names:
            lines += ["", "| entry | " + " | ".join(metric_names) + " |", "|---|" + "---|" * len(metric_names)]
            for e in self.entries:
                lines.append(f"| {e.label} | " + " | ".join(
                    f"{e.metrics[k]:.4g}" if k in e.metrics else "–" for k in metric_names) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """One panel per batch size: p50 latency bar per entry (whisker to p99), metric written on top."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        fig, axes = plt.subplots(1, len(self.batches), figsize=(4.5 * len(self.batches), 4.2), squeeze=False)
        x = np.arange(len(self.entries))
        for ax, b in zip(axes[0], self.batches, strict=True):
            p50 = [e.p(b, 50) for e in self.entries]
            p99 = [e.p(b, 99) for e in self.entries]
            ax.bar(x, p50, color=[f"C{i}" for i in range(len(self.entries))],
                   yerr=[np.zeros(len(x)), np.subtract(p99, p50)], capsize=3)
            for i, e in enumerate(self.entries):
                if self.metric_key in e.metrics:
                    ax.annotate(f"{e.metrics[self.metric_key]:.3g}", (i, p99[i]), ha="center", va="bottom",
                                fontsize=8, xytext=(0, 2), textcoords="offset points")
            ax.set_xticks(x, [e.label for e in self.entries], rotation=30, ha="right", fontsize=8)
            ax.set_ylabel("latency ms (p50, whisker p99)")
            ax.set_title(f"batch {b}, {self.nodes} nodes, {self.threads} thread(s)")
        if self.metric_key:
            fig.suptitle(f"numbers on bars: {self.metric_key}", fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


# --------------------------------------------------------------------------- targets
SPEED_TARGETS = (  # (what, slower row, target speed-up)
    ("vs FP32 teacher, both ORT", TEACHER_ORT, 3.0),
    ("vs torch eager FP32, same student", STUDENT_TORCH, 2.0),
    ("vs FP32, same student, both ORT (INT8 pays)", STUDENT_ORT, 1.0),
)
METRIC_TOLERANCE = 0.01  # relative to the FP32 teacher, each task's primary metric


def targets_markdown(report: QuantBenchReport) -> list[str]:
    """Issue 20's targets, met or not, from this run's rows: the speed-ups of each INT8 student graph
    (static, the TensorRT format; dynamic, what the CPU configs run) and each task's primary metric
    within 1 % of the FP32 teacher's."""
    labels = {e.label: e for e in report.entries}
    int8 = [label for label in (STUDENT_INT8, STUDENT_INT8_DYNAMIC) if label in labels]
    if not int8:
        return []
    lines = ["## Targets (issue 20)", "", "| INT8 student | target | " + " | ".join(f"b{b}" for b in report.batches)
             + " | met |", "|---|---|" + "---|" * len(report.batches) + "---|"]
    for label in int8:
        for what, slow, target in SPEED_TARGETS:
            if slow not in labels:
                continue
            ratios = [labels[slow].p(b, 50) / labels[label].p(b, 50) for b in report.batches]
            met = all(r > target if target == 1.0 else r >= target for r in ratios)
            lines.append(f"| {label} | {what} {'>' if target == 1.0 else '>='} {target:g}x | "
                         + " | ".join(f"{r:.2f}x" for r in ratios) + f" | {'yes' if met else '**no**'} |")
    teacher = labels.get(TEACHER_TORCH) or labels.get(TEACHER_ORT)
    if teacher is not None:
        lines += ["", "| INT8 student | metric | teacher | student | change | within 1 % |",
                  "|---|---|---|---|---|---|"]
        for label in int8:
            for task, (metric, higher) in PRIMARY_METRICS.items():
                key = f"{task}/{metric}"
                if key not in teacher.metrics or key not in labels[label].metrics:
                    continue
                t, v = teacher.metrics[key], labels[label].metrics[key]
                worse = relative_loss(v, t, higher)
                lines.append(f"| {label} | {key} | {t:.4g} | {v:.4g} | {100 * worse:+.1f} % worse | "
                             f"{'yes' if worse <= METRIC_TOLERANCE else '**no**'} |")
    return lines


# --------------------------------------------------------------------------- inputs
def bench_inputs(windows: WindowSet, indices: Sequence[int] | np.ndarray, batch: int, nodes: int,
                 names: Sequence[str], max_nodes: int | None = None) -> dict[str, np.ndarray]:
    """``batch`` real windows (cycling through ``indices``) with exactly ``nodes`` nodes: the first
    ``nodes`` of each window, or all of them padded with absent nodes (zero tokens, present False,
    positions repeated from the real nodes, node_index continuing modulo ``max_nodes``)."""
    from export.parity import window_inputs

    idx = np.resize(np.asarray(indices, np.int64), batch)
    real = window_inputs(windows, idx, names)
    have = windows.n_nodes
    out = {}
    for name, value in real.items():
        if nodes <= have:
            out[name] = np.ascontiguousarray(value[:, :nodes])
            continue
        extra = nodes - have
        if name == POSITIONS_INPUT:
            pad = np.resize(value.transpose(1, 0, 2), (extra, *value.shape[:1], value.shape[2])).transpose(1, 0, 2)
        elif name == NODE_INDEX_INPUT:
            pad = np.tile(np.arange(have, nodes) % (max_nodes or nodes), (batch, 1))
        else:
            pad = np.zeros((batch, extra, *value.shape[2:]), value.dtype)
        out[name] = np.ascontiguousarray(np.concatenate([value, pad.astype(value.dtype)], axis=1))
    return out


# --------------------------------------------------------------------------- the benchmark
def run_quant_benchmark(entries: Sequence[BenchEntry | tuple], windows: WindowSet, eval_indices, *, nodes: int = 8,
                        batches: tuple[int, ...] = (1, 8), repeats: int = 100, warmup: int = 5,
                        threads: int = 1, metric_key: str | None = None, eval_batch_size: int = 32,
                        ratios=STANDARD_RATIOS) -> QuantBenchReport:
    """Time every entry (interleaved) at each batch size and score it on ``eval_indices``.

    torch runs with ``threads`` intra-op threads for the duration; ONNX Runtime runners must have
    been made with the same count (``onnx_runner(path, threads)``), which is checked.
    ``metric_key`` ("task/metric") defaults to the primary metric of the first task.
    """
    import torch

    entries = [BenchEntry(*e) for e in entries]
    if not entries:
        raise BenchError("no entries to benchmark")
    if len({e.label for e in entries}) != len(entries):
        raise BenchError("entry labels must be unique")
    if repeats < 1 or nodes < 1 or not batches or min(batches) < 1:
        raise BenchError(f"need repeats >= 1, nodes >= 1 and batch sizes >= 1; got {repeats}, {nodes}, {batches}")
    for e in entries:
        session = getattr(e.runner, "session", None)
        if session is not None:
            got = session.get_session_options().intra_op_num_threads
            if got != threads:
                raise BenchError(f"{e.label}: ONNX Runtime has {got or 'default'} intra-op threads, torch gets "
                                 f"{threads}; make the runner with onnx_runner(path, threads={threads})")
    models = [e.model for e in entries if e.model is not None]
    if not models:
        raise BenchError("at least one entry needs a model (input names, output specs)")
    names = list(dict.fromkeys(n for m in models for n in m.input_names))
    max_nodes = min(m.encoder.cfg.max_nodes for m in models)
    eval_idx = np.asarray(eval_indices, np.int64).reshape(-1)
    if eval_idx.size == 0:
        raise BenchError("no evaluation windows")

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = [EntryResult(e.label, e.params, e.file_bytes, {b: [] for b in batches}) for e in entries]
        for b in batches:
            inputs = bench_inputs(windows, eval_idx, b, nodes, names, max_nodes)
            for _ in range(warmup):
                for e in entries:
                    e.runner(inputs)
            for _ in range(repeats):
                for e, result in zip(entries, results, strict=True):
                    start = time.perf_counter()
                    e.runner(inputs)
                    result.latency_ms[b].append(1e3 * (time.perf_counter() - start))
        for e, result in zip(entries, results, strict=True):
            if e.model is not None:
                result.metrics = flatten_metrics(evaluate_runner(e.model, e.runner, windows, eval_idx,
                                                                 eval_batch_size))
    finally:
        torch.set_num_threads(before)

    if metric_key is None:
        task = next(iter(models[0].heads))
        metric_key = f"{task}/{PRIMARY_METRICS[task][0]}"
    labels = {r.label: r for r in results}
    speedups = {name: {b: labels[slow].p(b, 50) / labels[fast].p(b, 50) for b in batches}
                for name, slow, fast in ratios if slow in labels and fast in labels}
    return QuantBenchReport(results, tuple(batches), nodes, threads, repeats, int(eval_idx.size), metric_key,
                            describe_machine(versions("torch", "onnxruntime")), speedups)


def standard_entries(teacher: DeployModel, student: DeployModel, student_fp32: str | Path, student_int8: str | Path,
                     *, threads: int = 1, teacher_fp32: str | Path | None = None,
                     student_int8_dynamic: str | Path | None = None,
                     workdir: str | Path | None = None) -> list[BenchEntry]:
    """The entries of the deployment comparison: torch FP32 teacher and student, ORT FP32 teacher
    and student, ORT INT8 student (and ORT INT8 dynamic student when given). Without
    ``teacher_fp32`` the teacher is exported to ``workdir/teacher.onnx`` (the INT8-student-vs-teacher
    ratio compares both in ONNX Runtime)."""
    from export.onnx_export import export_onnx

    if teacher_fp32 is None:
        if workdir is None:
            raise BenchError("give teacher_fp32 or a workdir to export the teacher into")
        teacher_fp32 = export_onnx(teacher, Path(workdir) / "teacher.onnx")
    paths = {"teacher": Path(teacher_fp32), "student": Path(student_fp32), "int8": Path(student_int8)}
    for what, path in paths.items():
        if not path.is_file():
            raise BenchError(f"{what} ONNX file {path} does not exist")
    t_params, s_params = count_params(teacher), count_params(student)
    entries = [
        BenchEntry(TEACHER_TORCH, torch_runner(teacher), t_params, None, teacher),
        BenchEntry(STUDENT_TORCH, torch_runner(student), s_params, None, student),
        BenchEntry(TEACHER_ORT, onnx_runner(paths["teacher"], threads, teacher.output_names), t_params,
                   paths["teacher"].stat().st_size, teacher),
        BenchEntry(STUDENT_ORT, onnx_runner(paths["student"], threads, student.output_names), s_params,
                   paths["student"].stat().st_size, student),
        BenchEntry(STUDENT_INT8, onnx_runner(paths["int8"], threads, student.output_names), s_params,
                   paths["int8"].stat().st_size, student),
    ]
    if student_int8_dynamic is not None:
        path = Path(student_int8_dynamic)
        entries.append(BenchEntry(STUDENT_INT8_DYNAMIC, onnx_runner(path, threads, student.output_names), s_params,
                                  path.stat().st_size, student))
    return entries


# --------------------------------------------------------------------------- attention options
@dataclass
class AttentionOption:
    """One way of writing attention into the student's graph, and what was measured on it."""

    mode: str
    fused_nodes: int = 0  # fused attention ops in the exported graph
    fused_at_load: int = 0  # fused attention ops in the graph ONNX Runtime runs (ORT_ENABLE_ALL)
    tensorrt: str = ""  # which TensorRT 10 parses it
    fp32_error: float = float("nan")  # max |torch FP32 - ORT| over every output, parity windows
    int8_error: float = float("nan")
    int8_quantized: int = 0  # MatMul/Gemm quantized in the INT8 graph
    parity_windows: int = 0
    error: str = ""  # why the mode has no rows (export or quantization failed)


def attention_entries(student: DeployModel, windows: WindowSet, calib_indices, workdir: str | Path, *,
                      threads: int = 1, modes: Sequence[str] | None = None,
                      ) -> tuple[list[BenchEntry], list[AttentionOption]]:
    """FP32 and INT8 rows of ``student`` exported with each attention ``mode`` (default: all).

    Each graph is exported by ``export.onnx_export.export_onnx`` (which checks it against torch and,
    for a fused mode, that the fused op is there) and quantized by ``quantize_static_int8`` with the
    same settings (MinMax on ``calib_indices``), so the rows differ only in how attention is written.
    A mode that cannot be exported here (e.g. ``ort-fusion`` without onnxscript) gets no rows and its
    reason in the option's ``error``."""
    from export.attention import ATTENTION_MODES, fused_attention_nodes, ort_fused_at_load, tensorrt_parses
    from export.errors import ExportError
    from export.onnx_export import export_onnx
    from export.quant_graph import summarize_graph
    from export.quant_int8 import quantize_static_int8

    workdir = Path(workdir)
    params = count_params(student)
    entries: list[BenchEntry] = []
    options: list[AttentionOption] = []
    for mode in modes or ATTENTION_MODES:
        option = AttentionOption(mode)
        options.append(option)
        try:
            option.tensorrt = tensorrt_parses(mode)
            fp32 = export_onnx(student, workdir / f"student.{mode}.onnx", attention=mode)
            int8 = quantize_static_int8(fp32, workdir / f"student.{mode}.int8.onnx", windows, calib_indices)
        except ExportError as exc:
            option.error = str(exc)
            continue
        option.fused_nodes = fused_attention_nodes(fp32)
        option.fused_at_load = ort_fused_at_load(fp32)["fused"]
        option.int8_quantized = len(summarize_graph(int8).quantized)
        for precision, path in (("FP32", fp32), ("INT8", int8)):
            entries.append(BenchEntry(attention_label(precision, mode), onnx_runner(path, threads,
                                      student.output_names), params, path.stat().st_size, student))
    return entries, options


def attention_parity(student: DeployModel, entries: Sequence[BenchEntry], options: Sequence[AttentionOption],
                     windows: WindowSet, indices, batch_size: int = 32) -> None:
    """Fill each option's FP32 / INT8 max abs error against torch FP32 on windows ``indices``."""
    from export.parity import collect_outputs

    idx = np.asarray(indices, np.int64).reshape(-1)
    reference = collect_outputs(student, torch_runner(student), windows, idx, batch_size)
    by_label = {e.label: e for e in entries}
    for option in options:
        for precision in ("FP32", "INT8"):
            entry = by_label.get(attention_label(precision, option.mode))
            if entry is None:
                continue
            got = collect_outputs(student, entry.runner, windows, idx, batch_size)
            error = max(float(np.abs(np.asarray(got[n], np.float64) - reference[n]).max()) for n in reference)
            setattr(option, "fp32_error" if precision == "FP32" else "int8_error", error)
        option.parity_windows = int(idx.size)


def attention_ratios(options: Sequence[AttentionOption]) -> tuple[tuple[str, str, str], ...]:
    """(name, plain row, fused row) speed-ups of every fused mode over the plain graph, FP32 and INT8."""
    fused = [o.mode for o in options if o.mode != "plain" and not o.error]
    return tuple((f"{mode} vs plain attention, {precision} student, ORT", attention_label(precision, "plain"),
                  attention_label(precision, mode)) for precision in ("FP32", "INT8") for mode in fused)


def attention_markdown(report: QuantBenchReport) -> list[str]:
    """The "Attention options" section of the report."""
    from export.attention import DEFAULT_ATTENTION

    labels = {e.label: e for e in report.entries}
    lines = ["## Attention options (issue 20)", "",
             f"The student exported with each way of writing attention (`spar-export onnx --attention MODE`), each "
             f"quantized to INT8 the same way (static Q/DQ, MinMax); rows above, timed interleaved with the rest. "
             f"Parity: max |torch FP32 - ONNX Runtime| over every output on "
             f"{max((o.parity_windows for o in report.attention), default=0)} held-out windows. \"fused at load\": "
             f"fused attention ops in the graph ONNX Runtime actually runs (ORT_ENABLE_ALL, read from "
             f"`optimized_model_filepath`). Default export: `{DEFAULT_ATTENTION}`.", ""]
    head = ["attention", "fused ops in graph", "fused at load by ORT", "TensorRT 10 parses", "FP32 max abs err",
            "INT8 max abs err", "INT8 MatMuls quantized"]
    for precision in ("FP32", "INT8"):
        head += [f"{precision} b{b} vs plain" for b in report.batches]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for o in report.attention:
        if o.error:
            lines.append(f"| {o.mode} | not measured: {o.error[:160]} |" + " |" * (len(head) - 2))
            continue
        cells = [o.mode, str(o.fused_nodes), str(o.fused_at_load), o.tensorrt, f"{o.fp32_error:.2g}",
                 f"{o.int8_error:.2g}", str(o.int8_quantized)]
        for precision in ("FP32", "INT8"):
            plain = labels.get(attention_label(precision, "plain"))
            this = labels.get(attention_label(precision, o.mode))
            for b in report.batches:
                cells.append(f"{plain.p(b, 50) / this.p(b, 50):.2f}x" if plain and this else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
