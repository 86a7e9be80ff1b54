"""Which fine-tuning makes the shipped teacher: frozen-encoder heads or full fine-tuning.

Each candidate is a set of fine-tuned checkpoints that share one encoder (one per task). They are
compared on their own validation metrics (``metrics.json`` beside each checkpoint, the temporal
split's held-out windows): per task the error that matters (classification: 1 - accuracy;
localization and hypocentres: MSE; detection: 1 - mean mAP), as a log-ratio to the best candidate
on that task, averaged over tasks. The lowest mean wins: a candidate twice as good on one task and
twice as bad on the other ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from export.errors import ExportError

ERROR_FLOOR = 1e-4  # 100 % accuracy must still give a finite ratio


@dataclass(frozen=True)
class Candidate:
    name: str
    checkpoints: tuple[Path, ...]
    metrics: dict[str, dict[str, float]]  # task -> validation metrics


def task_error(task: str, metrics: dict[str, float]) -> float:
    """The one number per task that the choice minimises."""
    if task == "classify":
        value = 1.0 - metrics["accuracy"]
    elif task in ("localize", "quake"):
        value = metrics["mse"]
    elif task == "detect":
        maps = [v for k, v in metrics.items() if k.startswith("mAP@")]
        value = 1.0 - sum(maps) / len(maps)
    else:
        raise ExportError(f"no selection metric for task {task!r}")
    if not math.isfinite(value):
        raise ExportError(f"task {task}: the validation metric is not finite ({metrics})")
    return max(value, ERROR_FLOOR)


def load_candidate(name: str, paths: list[str]) -> Candidate:
    """A candidate from its run directories (or checkpoint files); reads each one's task and metrics."""
    import torch

    metrics: dict[str, dict[str, float]] = {}
    resolved = []
    for raw in paths:
        path = Path(raw)
        ckpt_file = path / "checkpoint.pt" if path.is_dir() else path
        if not ckpt_file.exists():
            raise ExportError(f"candidate {name}: {ckpt_file} does not exist")
        ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=False)
        task = ckpt.get("extra", {}).get("task")
        if not task or "metrics" not in ckpt:
            raise ExportError(f"candidate {name}: {ckpt_file} is not a fine-tuned checkpoint with metrics")
        if task in metrics:
            raise ExportError(f"candidate {name}: two checkpoints for task {task}")
        metrics[task] = dict(ckpt["metrics"])
        resolved.append(path)
    return Candidate(name, tuple(resolved), metrics)


def choose(candidates: list[Candidate]) -> tuple[Candidate, dict[str, float]]:
    """The best candidate and every candidate's score (mean log-ratio to the best per task)."""
    if not candidates:
        raise ExportError("give at least one candidate")
    tasks = set(candidates[0].metrics)
    for c in candidates[1:]:
        if set(c.metrics) != tasks:
            raise ExportError(f"candidates cover different tasks: {candidates[0].name} {sorted(tasks)}, "
                              f"{c.name} {sorted(c.metrics)}")
    best = {t: min(task_error(t, c.metrics[t]) for c in candidates) for t in tasks}
    scores = {c.name: sum(math.log(task_error(t, c.metrics[t]) / best[t]) for t in tasks) / len(tasks)
              for c in candidates}
    winner = min(candidates, key=lambda c: scores[c.name])
    return winner, scores


def choice_markdown(candidates: list[Candidate], winner: Candidate, scores: dict[str, float]) -> str:
    tasks = sorted(winner.metrics)
    lines = ["# Teacher choice", "", "Validation windows of the training recording (temporal split). Score: mean "
             "over tasks of log(error / best error); lowest wins (classification error = 1 - accuracy, "
             "localization error = MSE).", "",
             "| candidate | " + " | ".join(f"{t}" for t in tasks) + " | score | checkpoints |",
             "|---|" + "---|" * len(tasks) + "---|---|"]
    for c in candidates:
        cells = []
        for t in tasks:
            m = c.metrics[t]
            cells.append(_metrics_cell(t, m))
        mark = " (chosen)" if c is winner else ""
        lines.append(f"| {c.name}{mark} | " + " | ".join(cells) + f" | {scores[c.name]:+.3f} | "
                     + ", ".join(str(p) for p in c.checkpoints) + " |")
    return "\n".join(lines) + "\n"


def _metrics_cell(task: str, m: dict[str, float]) -> str:
    if task == "classify":
        return f"accuracy {m['accuracy']:.4f}"
    if task == "localize":
        return f"MSE {m['mse']:.1f} m², mean {m['mean_distance']:.2f} m"
    if task == "quake":  # site units are metres; hypocentres read better in km
        return (f"hypocentre mean {m['hypocentre_mean'] / 1000:.2f} km (epicentral "
                f"{m['epicentral_mean'] / 1000:.2f}, depth {m['depth_mean'] / 1000:.2f})")
    return ", ".join(f"{k} {v:.3f}" for k, v in m.items())


def parse_candidate(text: str) -> tuple[str, list[str]]:
    """``NAME=dir1,dir2`` -> (NAME, [dir1, dir2])."""
    name, sep, paths = text.partition("=")
    if not sep or not name or not paths:
        raise ExportError(f"--candidate expects NAME=DIR[,DIR...], got {text!r}")
    return name, [p for p in paths.split(",") if p]


def run_choice(specs: list[str], report: str | None = None) -> Candidate:
    candidates = [load_candidate(*parse_candidate(s)) for s in specs]
    winner, scores = choose(candidates)
    if report:
        Path(report).write_text(choice_markdown(candidates, winner, scores))
    return winner

