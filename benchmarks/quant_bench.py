"""Deployment benchmark: latency and task metric of teacher / student, torch eager / ONNX Runtime FP32 / INT8.

Every entry is measured in one process on one machine with the same thread count for torch and
ONNX Runtime: latency p50 / p99 per batch size at a fixed node count (inputs cut or padded from
real windows), and the task metric of the whole held-out set through ``export.parity.evaluate_runner``.
Entries are timed round-robin (each repeat runs every entry once), so a noisy neighbour slows
them all alike instead of whichever happened to run during the noise.

    entries = standard_entries(teacher, student, "student.onnx", "student.int8.onnx", threads=1, workdir=tmp)
    report = run_quant_benchmark(entries, windows, val_idx, threads=1)
    print(report.to_markdown()); report.plot(Path("quant.png"))
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from benchmarks.errors import BenchError
from benchmarks.machine import describe_machine
from export.deploy_model import DeployModel
from export.parity import PRIMARY_METRICS, Runner, evaluate_runner, flatten_metrics, onnx_runner, torch_runner
from spar_wire.model_manifest import NODE_INDEX_INPUT, POSITIONS_INPUT
from train.data import WindowSet

TEACHER_TORCH = "torch FP32 teacher"
STUDENT_TORCH = "torch FP32 student"
TEACHER_ORT = "ORT FP32 teacher"
STUDENT_ORT = "ORT FP32 student"
STUDENT_INT8 = "ORT INT8 student"
STUDENT_INT8_DYNAMIC = "ORT INT8 dynamic student"
# (name, slower entry, faster entry): speed-up = p50 latency of the first / p50 of the second.
STANDARD_RATIOS = (
    ("INT8 student vs FP32 teacher, both ORT", TEACHER_ORT, STUDENT_INT8),
    ("INT8 ORT vs torch eager FP32, student", STUDENT_TORCH, STUDENT_INT8),
    ("INT8 vs FP32, student, both ORT", STUDENT_ORT, STUDENT_INT8),
    ("FP32 student vs FP32 teacher, torch eager", TEACHER_TORCH, STUDENT_TORCH),
    ("INT8 dynamic vs FP32, student, both ORT", STUDENT_ORT, STUDENT_INT8_DYNAMIC),
)


class BenchEntry(NamedTuple):
    """One thing to time: a runner (named numpy inputs -> outputs in ``model.output_names`` order)."""

    label: str
    runner: Runner
    params: int  # parameters of the model it runs
    file_bytes: int | None  # size of its artifact (None for torch eager)
    model: DeployModel | None  # output specs for the task metric (None: latency only)


@dataclass
class EntryResult:
    label: str
    params: int
    file_bytes: int | None
    latency_ms: dict[int, list[float]]  # batch size -> one latency per repeat
    metrics: dict[str, float] = field(default_factory=dict)  # "task/metric"

    def p(self, batch: int, q: float) -> float:
        return float(np.percentile(self.latency_ms[batch], q))


@dataclass
class QuantBenchReport:
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
                            describe_machine(_versions()), speedups)


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def count_params(model: DeployModel) -> int:
    return sum(p.numel() for p in model.parameters())


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
