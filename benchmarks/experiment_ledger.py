"""What every training benchmark shares: the ledger of finished jobs, run folders that resume only
their own settings, and the library versions stamped on a report's machine line.

The objectives, placement and model benchmarks run for tens of minutes to hours; each finished job
is appended to ``<workdir>/jobs.jsonl`` so an interrupted run resumes after its last finished job,
and a result is reused only for the very settings it was computed with.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LedgerJob:
    """One job of a per-dataset training benchmark: pretrain an encoder, fine-tune a head, or fit the
    floors. Its ``key`` names both its run folder and its ledger entry, so keys must stay as they are:
    an interrupted run resumes by key."""

    kind: str  # pretrain | finetune | floors
    method: str  # a method name of the benchmark, or "floors"
    seed: int
    ratio: float = 1.0  # the share of labelled windows
    dataset: str = ""
    encoder: str = ""  # what a pretrain job's key names (e.g. its objective, shared by methods); "": the method

    @property
    def key(self) -> str:
        if self.kind == "pretrain":
            return f"{self.dataset}/pretrain/{self.encoder or self.method}/seed{self.seed}"
        if self.kind == "floors":
            return f"{self.dataset}/floors/{self.ratio:g}/seed{self.seed}"
        return f"{self.dataset}/finetune/{self.method}/{self.ratio:g}/seed{self.seed}"


# The libraries a machine line may name. torch's local version ("+cpu", "+cu121") says which build
# ran: a latency row needs it, a training metric does not.
LIBRARIES = ("torch", "onnxruntime", "numpy", "SQLite")


def versions(*libraries: str, torch_build: bool = True) -> dict[str, str]:
    """Name -> version of each of ``libraries`` (``torch``, ``onnxruntime``, ``numpy``, ``SQLite``),
    in that order, for ``testbed.machine.describe_machine``. ``torch_build=False`` drops torch's
    local build tag ("2.3.1+cpu" -> "2.3.1"). A library that is not installed is left out, so a
    section that runs without it still gets its machine line."""
    unknown = sorted(set(libraries) - set(LIBRARIES))
    if unknown:
        raise ValueError(f"no version known for {unknown}; known: {', '.join(LIBRARIES)}")
    out = {}
    for name in libraries:
        if name == "SQLite":
            import sqlite3

            out[name] = sqlite3.sqlite_version
            continue
        try:
            version = str(import_module(name).__version__)
        except ImportError:
            continue
        out[name] = version if torch_build or name != "torch" else version.split("+")[0]
    return out


def finished_jobs(ledger: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(job key, settings) -> result of every job already run (a result with other settings is kept
    in the ledger but not reused)."""
    done = {}
    if ledger.exists():
        for line in ledger.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write: that job simply runs again
            done[record["key"], record["settings"]] = record["result"]
    return done


def record_job(ledger: Path, key: str, settings: str, result: dict[str, Any]) -> None:
    """Append one finished job to ``ledger`` (one JSON line, written as soon as the job ends)."""
    with open(ledger, "a") as f:
        f.write(json.dumps({"settings": settings, "key": key, "result": result}) + "\n")


def fresh_run_dir(run_dir: Path, settings: str) -> Path:
    """``run_dir`` for a job with ``settings``: kept when it holds an interrupted run with the same
    settings (pretraining resumes from its checkpoint), emptied when it holds another settings' run
    (whose checkpoint would otherwise be resumed as if it were this one)."""
    stamp = run_dir / "bench-settings.json"
    if run_dir.exists() and (not stamp.exists() or stamp.read_text() != settings):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(settings)
    return run_dir


def run_ledger(jobs: list[tuple[str, Any]], settings: str, ledger: Path, run: Callable[[Any], dict[str, Any]],
               progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Run every (key, job) not already in ``ledger`` with the same ``settings``; append each result
    as it finishes (an interrupted benchmark resumes after its last finished job)."""
    done = finished_jobs(ledger)
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    for n, (key, job) in enumerate(jobs, 1):
        if (key, settings) in done:
            results[key] = done[key, settings]
            continue
        progress(f"[{n}/{len(jobs)}] {key} ({(time.monotonic() - started) / 60:.1f} min so far)")
        results[key] = run(job)
        record_job(ledger, key, settings, results[key])
    return results
