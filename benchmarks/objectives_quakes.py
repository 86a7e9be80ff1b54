"""``spar-bench objectives --dataset quakes``: earthquake location on the ridgecrest-like network
(the analogue of the paper's Ridgecrest table), SPAR against the MAE baselines, supervised and
physics floors.

Data: the earthquake scenario on ``configs/sites/ridgecrest_like.toml`` (16 three-component
stations about 120 km across, one event per 30.72 s window, 20 % of the station traces missing in
every window, webp:85 tokens as the nodes send them). Methods, as in ``benchmarks.objectives``:

* SPAR and the blind MAE, pretrained on the training windows; their frozen encoders get the
  hypocentre head (``train.heads.quake``: two transformer blocks, MSE), as the paper's appendix E.3;
* the fair MAE (``mae_node``): the blind MAE's encoder with a learnable vector per station in its head;
* supervised: the same encoder and head from scratch on the labelled windows;
* floors (``train.quake_floors``) fitted on exactly the labelled windows the heads get: STA/LTA P
  picks + a travel-time grid search at the known P velocity, the first-arrival station, kNN on band
  energies, and the training mean.

Errors in km on the held-out last quarter of windows (temporal split): hypocentre (3-D), epicentral
(horizontal) and depth, mean / median / p90, at label ratios 1.0 and 0.2, mean ± std over seeds.
Finished jobs are remembered in ``<workdir>/jobs.jsonl``, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.errors import BenchError
from benchmarks.machine import describe_machine
from benchmarks.objectives import _row, _versions, fresh_run_dir, run_ledger

REPO = Path(__file__).resolve().parents[1]
SITE = REPO / "configs" / "sites" / "ridgecrest_like.toml"
METHODS = ("supervised", "mae", "mae_node", "spar")
NAMES = {"supervised": "Supervised (from scratch)", "mae": "MAE (blind)", "mae_node": "MAE + node identity (fair)",
         "spar": "SPAR"}
FLOORS = ("grid_search", "first_arrival", "knn", "mean_position")
FLOOR_NAMES = {"grid_search": "Floor: STA/LTA picks + travel-time grid search",
               "first_arrival": "Floor: first-arrival station", "knn": "Floor: kNN on band energies",
               "mean_position": "Guess: mean hypocentre"}
ERRORS = ("hypocentre", "epicentral", "depth")
VAL_FRACTION = 0.25
BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"windows": 1600, "pretrain_epochs": 10, "head_steps": 700, "supervised_steps": 300},
    "standard": {"windows": 4000, "pretrain_epochs": 30, "head_steps": 1500, "supervised_steps": 1500},
    "full": {"windows": 20000, "pretrain_epochs": 100, "head_steps": 3000, "supervised_steps": 8000},
}


@dataclass(frozen=True)
class QuakeObjectivesConfig:
    workdir: Path = Path("benchmarks/.work/objectives")  # dataset, checkpoints, finished jobs
    windows: int = 1600  # generated windows (the last quarter validates)
    pretrain_epochs: int = 10
    head_steps: int = 700  # frozen-encoder heads, lr 3e-3
    supervised_steps: int = 300  # encoder + head from scratch, lr 1e-3
    batch_size: int = 32
    lr: float = 1e-3
    label_ratios: tuple[float, ...] = (1.0, 0.2)
    seeds: tuple[int, ...] = (0, 1, 2)
    missing_trace_fraction: float = 0.2  # station traces dropped per window by the scenario itself
    model: dict[str, Any] = field(default_factory=dict)  # SparConfig overrides for every encoder
    preset: str = "custom"

    @classmethod
    def for_budget(cls, name: str, **changes: Any) -> QuakeObjectivesConfig:
        """Preset ``name`` (BUDGETS), then ``changes``; changed settings name the preset "<name>, modified"."""
        if name not in BUDGETS:
            raise BenchError(f"unknown budget {name!r}; known: {', '.join(BUDGETS)}")
        same = all(BUDGETS[name].get(k, getattr(cls, k, None)) == v for k, v in changes.items() if k != "workdir")
        return replace(cls(**BUDGETS[name], preset=name if same else f"{name}, modified"), **changes)

    def budget(self) -> str:
        return (f"preset `{self.preset}`: {self.windows} windows (75 % train / 25 % validation, temporal split), "
                f"{self.missing_trace_fraction * 100:g} % of the traces missing; pretraining {self.pretrain_epochs} "
                f"epochs (lr {self.lr:g}); frozen-encoder heads {self.head_steps} steps (lr 3e-3); supervised from "
                f"scratch {self.supervised_steps} steps (lr 1e-3); batch {self.batch_size}; label ratios "
                f"{list(self.label_ratios)}; seeds {list(self.seeds)}")


@dataclass(frozen=True)
class Job:
    kind: str  # pretrain | finetune | floors
    method: str  # a METHODS name, or "floors"
    seed: int
    ratio: float = 1.0

    @property
    def key(self) -> str:
        if self.kind == "pretrain":
            return f"quakes/pretrain/{self.method}/seed{self.seed}"
        if self.kind == "floors":
            return f"quakes/floors/{self.ratio:g}/seed{self.seed}"
        return f"quakes/finetune/{self.method}/{self.ratio:g}/seed{self.seed}"


def plan(cfg: QuakeObjectivesConfig) -> list[Job]:
    """Every job, pretraining before the heads that need it; floors (a minute each) first."""
    jobs: list[Job] = []
    for seed in cfg.seeds:
        jobs += [Job("floors", "floors", seed, r) for r in cfg.label_ratios]
        jobs += [Job("pretrain", m, seed) for m in ("spar", "mae")]
        jobs += [Job("finetune", m, seed, r) for m in METHODS for r in cfg.label_ratios]
    return jobs


def check_config(cfg: QuakeObjectivesConfig) -> None:
    if cfg.windows < 80:
        raise BenchError("--windows must be >= 80")
    if any(not 0 < r <= 1 for r in cfg.label_ratios):
        raise BenchError("label ratios must be in (0, 1]")
    if not 0 <= cfg.missing_trace_fraction < 1:
        raise BenchError("the missing trace fraction must be in [0, 1)")


def ensure_dataset(cfg: QuakeObjectivesConfig, progress: Callable[[str], None]) -> Path:
    from node_firmware_sim.dataset import DatasetSpec, export_dataset

    out = cfg.workdir / f"quakes-{cfg.windows}-missing{cfg.missing_trace_fraction:g}"
    if not (out / "dataset.json").exists():
        progress(f"generating {cfg.windows} earthquake windows -> {out}")
        spec = DatasetSpec(site=str(SITE), scenario="earthquakes", windows=cfg.windows, seed=4321, codec="webp:85",
                           shard_size=500, params={"missing_trace_fraction": cfg.missing_trace_fraction})
        export_dataset(spec, out, workers=2, overwrite=True)
    return out


def job_settings(cfg: QuakeObjectivesConfig, job: Job) -> str:
    """What a job's result depends on: changing the head budget does not redo pretraining."""
    keys = ["windows", "missing_trace_fraction", "model"]
    if job.kind != "floors":
        keys += ["pretrain_epochs", "batch_size", "lr"]
    if job.kind == "finetune":
        keys.append("supervised_steps" if job.method == "supervised" else "head_steps")
    values = asdict(cfg)
    return json.dumps({k: values[k] for k in keys}, sort_keys=True, default=str)


def run_job(job: Job, cfg: QuakeObjectivesConfig, data: Path) -> dict[str, Any]:
    from train.finetune import run_finetune
    from train.pretrain import run_pretrain
    from train.run_config import FinetuneConfig, PretrainConfig

    started = time.monotonic()
    if job.kind == "floors":
        return {**floor_job(job, data), "seconds": time.monotonic() - started}
    run_dir = fresh_run_dir(cfg.workdir / "runs" / job.key, job_settings(cfg, job))
    if job.kind == "pretrain":
        result = run_pretrain(PretrainConfig(
            data=str(data), out=str(run_dir), objective=job.method, epochs=cfg.pretrain_epochs,
            batch_size=cfg.batch_size, lr=cfg.lr, seed=job.seed, progress=False, model=dict(cfg.model)))
        return {"val_loss": result.val_loss, "seconds": time.monotonic() - started}
    scratch = job.method == "supervised"
    encoder = None if scratch else str(cfg.workdir / "runs" / Job(
        "pretrain", "mae" if job.method == "mae_node" else job.method, job.seed).key)
    result = run_finetune(FinetuneConfig(
        data=str(data), out=str(run_dir), task="quake", encoder=encoder, label_ratio=job.ratio,
        steps=cfg.supervised_steps if scratch else cfg.head_steps, batch_size=cfg.batch_size,
        lr=1e-3 if scratch else 3e-3, seed=job.seed, progress=False, model=dict(cfg.model) if scratch else {},
        node_identity=job.method == "mae_node"))
    return {**result.metrics, "train_windows": result.train_windows, "seconds": time.monotonic() - started}


def floor_job(job: Job, data: Path) -> dict[str, Any]:
    """The floors on the labelled training windows of (ratio, seed), the very subset ``run_finetune``
    gives the heads, scored on the same validation windows: {"grid_search/hypocentre_mean": ...}."""
    from train.data import label_subset, load_windows, temporal_split
    from train.finetune import stratify_labels, task_indices
    from train.quake_floors import quake_floor_metrics

    windows = load_windows(data, progress=False)
    train_idx, val_idx = temporal_split(len(windows), VAL_FRACTION)
    usable = task_indices(windows, "quake", train_idx)
    subset = label_subset(usable, stratify_labels(windows, "quake", usable), job.ratio, job.seed)
    metrics = quake_floor_metrics(windows.subset(subset), windows.subset(task_indices(windows, "quake", val_idx)))
    return {f"{floor}/{name}": value for floor, values in metrics.items() for name, value in values.items()}


def run_quake_objectives(cfg: QuakeObjectivesConfig, progress: Callable[[str], None] = print
                         ) -> QuakeObjectivesReport:
    """Run (or resume) every job of ``plan(cfg)`` and return the report."""
    check_config(cfg)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    data = ensure_dataset(cfg, progress)
    results: dict[str, dict[str, Any]] = {}
    ledger = cfg.workdir / "jobs.jsonl"
    jobs = plan(cfg)
    started = time.monotonic()
    # One run_ledger call per job: each kind of job has its own settings string.
    for n, job in enumerate(jobs, 1):
        def announce(_: str, n: int = n, key: str = job.key) -> None:
            progress(f"[{n}/{len(jobs)}] {key} ({(time.monotonic() - started) / 60:.1f} min so far)")

        results.update(run_ledger([(job.key, job)], job_settings(cfg, job), ledger,
                                  lambda j: run_job(j, cfg, data), announce))
    return QuakeObjectivesReport(cfg, results, describe_machine(_versions()))


@dataclass
class QuakeObjectivesReport:
    cfg: QuakeObjectivesConfig
    results: dict[str, dict[str, Any]]  # job key -> metrics (metres)
    machine: str

    def metric(self, method: str, ratio: float, name: str) -> tuple[float, float]:
        """Mean and std over seeds in km (``method`` a floor name: that floor's value)."""
        if method in FLOORS:
            values = [self.results[Job("floors", "floors", s, ratio).key][f"{method}/{name}"] for s in self.cfg.seeds]
        else:
            values = [self.results[Job("finetune", method, s, ratio).key][name] for s in self.cfg.seeds]
        km = [float(v) / 1000.0 for v in values]
        return statistics.fmean(km), (statistics.stdev(km) if len(km) > 1 else 0.0)

    def best_floor(self, ratio: float) -> tuple[str, float]:
        """(floor, mean hypocentre error km) of the best floor that learns nothing but one threshold
        or k (the mean guess is shown, never the best floor)."""
        return min(((f, self.metric(f, ratio, "hypocentre_mean")[0]) for f in FLOORS[:-1]), key=lambda fv: fv[1])

    def margin(self, method: str, ratio: float) -> str:
        floor, value = self.best_floor(ratio)
        mine = self.metric(method, ratio, "hypocentre_mean")[0]
        return f"{(mine / value - 1) * 100:+.0f} % vs {floor.replace('_', ' ')}" + \
            (" (below the floor)" if mine > value else "")

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for method in (*METHODS, *FLOORS):
            row: dict[str, Any] = {"method": NAMES.get(method) or FLOOR_NAMES[method]}
            for ratio in self.cfg.label_ratios:
                for kind in ERRORS:
                    for stat in ("mean", "median", "p90"):
                        row[f"{kind}_{stat}_km@labels{ratio:g}"] = self.metric(method, ratio, f"{kind}_{stat}")[0]
            rows.append(row)
        return rows

    def to_markdown(self) -> str:
        cfg = self.cfg
        lines = ["# spar-bench objectives --dataset quakes", "", f"machine: {self.machine}", "",
                 f"budget: {cfg.budget()}; total "
                 f"{sum(r.get('seconds', 0) for r in self.results.values()) / 60:.1f} min of training", "",
                 "Simulated local earthquakes on the ridgecrest-like network (16 three-component stations about "
                 "120 km across, magnitudes 0.5-4.5, depths 1-20 km, one event per 30.72 s window). Errors in km "
                 "on the validation windows; cells are mean ± std over the seeds.", ""]
        for ratio in cfg.label_ratios:
            lines += [f"## Label ratio {ratio:g}", ""]
            head = ["method"] + [f"{kind} {stat}" for kind in ERRORS for stat in ("mean", "median", "p90")] + \
                ["vs best floor"]
            lines += [_row(head), _row(["---"] * len(head))]
            for method in (*METHODS, *FLOORS):
                cells = [NAMES.get(method) or FLOOR_NAMES[method]]
                cells += [self._cell(method, ratio, f"{kind}_{stat}") for kind in ERRORS
                          for stat in ("mean", "median", "p90")]
                cells.append(self.margin(method, ratio) if method in METHODS else "")
                lines.append(_row(cells))
            lines.append("")
        thresholds = sorted({self.results[Job("floors", "floors", s, r).key]["grid_search/sta_lta_threshold"]
                             for s in cfg.seeds for r in cfg.label_ratios})
        lines += ["Floors (`train/quake_floors.py`) read the same tokens as the models: the grid search picks a "
                  "P onset per station with an STA/LTA trigger on the spectrogram energy (0.64 s frames; threshold "
                  f"{', '.join(f'{t:g}' for t in thresholds)} chosen on the training windows), then searches a 2 km "
                  "grid and a 250 m grid around its best node for the hypocentre whose straight-ray P times at "
                  "the regional velocity (6 km/s) best explain the picks with an unknown origin time (L1). The "
                  "first-arrival station puts the epicentre at the station that triggered first, at the training "
                  "mean depth. \"vs best floor\": change of the mean hypocentre error against the best floor at "
                  "that label ratio (negative is better).", "",
                  f"Reproduce: `spar-bench objectives --dataset quakes --budget {cfg.preset.split(',')[0]}`"
                  + (" with the changed settings above" if "modified" in cfg.preset else "") + ".", ""]
        return "\n".join(lines)

    def _cell(self, method: str, ratio: float, name: str) -> str:
        mean, std = self.metric(method, ratio, name)
        return f"{mean:.2f}" + (f" ± {std:.2f}" if len(self.cfg.seeds) > 1 else "")

    def plot(self, path: Path) -> None:
        """Mean hypocentre, epicentral and depth error per method and floor at each label ratio."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = (*METHODS, *FLOORS[:-1])
        fig, axes = plt.subplots(1, len(ERRORS), figsize=(5 * len(ERRORS), 4), squeeze=False)
        width = 0.8 / len(self.cfg.label_ratios)
        for ax, kind in zip(axes[0], ERRORS, strict=True):
            for i, ratio in enumerate(self.cfg.label_ratios):
                stats = [self.metric(m, ratio, f"{kind}_mean") for m in rows]
                ax.bar([x + i * width for x in range(len(rows))], [m for m, _ in stats], width,
                       yerr=[s for _, s in stats], label=f"label ratio {ratio:g}")
            ax.set_xticks([x + width * (len(self.cfg.label_ratios) - 1) / 2 for x in range(len(rows))],
                          [r.replace("_", " ") for r in rows], rotation=30, ha="right")
            ax.set_ylabel(f"mean {kind} error (km)")
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Earthquake location, ridgecrest-like network (lower is better)")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
