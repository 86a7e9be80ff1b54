"""``spar-bench objectives``: SPAR vs MAE vs supervised on simulated parking-lot data (the analogue
of the paper's Table 1) and SPAR's ablations (its Table 8), beside simple floors.

One dataset is generated with the node exporter (single vehicles, so localization has one answer),
each objective is pretrained on its training windows, heads are fine-tuned on the frozen encoders
with label ratios 1.0 and 0.2, and everything is scored on the held-out last quarter of windows
(temporal split). Methods:

* SPAR, and the blind MAE of the paper's baseline (no spatial or structural embedding: nothing
  tells its nodes apart);
* the fair MAE (``mae_node``): the same MAE encoder, but its heads add a learnable vector per node
  (``train.heads.node_identity``), as AudioMAE / CAV-MAE are evaluated;
* supervised from scratch (encoder + head on the labels);
* floors on the same labelled windows (``train.floors``): softmax regression on band energies
  (classification), kNN on the same features and an energy-weighted centroid (localization).

Classification is scored with the linear probe and with the paper's head (the localizer's one
transformer block before the readout). Finished jobs are remembered in ``<workdir>/jobs.jsonl``,
so an interrupted run picks up where it stopped.
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
from benchmarks.experiment_ledger import finished_jobs, fresh_run_dir, record_job, versions
from testbed.machine import describe_machine
from testbed.report_format import table_row, table_rule

REPO = Path(__file__).resolve().parents[1]
SITE = REPO / "configs" / "sites" / "parking_lot.toml"
ABLATIONS = ("no_geometric_augmentation", "no_spatial_reconstruction", "no_spatial_embedding",
             "no_structural_embedding", "node_balanced_masking", "node_drop_masking")
METHODS = ("supervised", "mae", "mae_node", "spar")
NAMES = {"supervised": "Supervised (from scratch)", "mae": "MAE (blind)", "mae_node": "MAE + node identity (fair)",
         "spar": "SPAR"}
# Benchmark budgets by preset name (train/budgets.py names them; the benchmark sizes its own runs).
BENCH_BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"windows": 1600, "pretrain_epochs": 10, "head_steps": 700, "supervised_steps": 300, "seeds": (0, 1, 2)},
    "standard": {"windows": 4000, "pretrain_epochs": 30, "head_steps": 1500, "supervised_steps": 1500,
                 "seeds": (0, 1, 2)},
    "full": {"windows": 20000, "pretrain_epochs": 100, "head_steps": 3000, "supervised_steps": 8000,
             "seeds": (0, 1, 2)},
}


@dataclass(frozen=True)
class ObjectivesConfig:
    workdir: Path = Path("benchmarks/.work/objectives")  # dataset, checkpoints, finished jobs
    windows: int = 1600  # generated windows (the last quarter is the validation set)
    pretrain_epochs: int = 10
    head_steps: int = 700  # frozen-encoder heads, lr 3e-3: the same updates at every label ratio
    supervised_steps: int = 150  # encoder + head from scratch, lr 1e-3 (each step costs ~30 head steps)
    batch_size: int = 32
    lr: float = 1e-3
    label_ratios: tuple[float, ...] = (1.0, 0.2)
    ablations: tuple[str, ...] = ABLATIONS
    ablation_ratio: float = 0.2
    seeds: tuple[int, ...] = (0,)
    model: dict[str, Any] = field(default_factory=dict)  # SparConfig overrides for every encoder
    scenario_params: dict[str, Any] = field(default_factory=lambda: {"max_vehicles": 1, "empty_fraction": 0.1})
    preset: str = "custom"  # the budget preset these settings came from (named in the results)

    @classmethod
    def for_budget(cls, name: str, **changes: Any) -> ObjectivesConfig:
        """The settings of budget preset ``name`` (BENCH_BUDGETS), then ``changes``; a run whose
        settings were changed is named "<name>, modified" in its results."""
        if name not in BENCH_BUDGETS:
            raise BenchError(f"unknown budget {name!r}; known: {', '.join(BENCH_BUDGETS)}")
        preset = name if not changes or all(BENCH_BUDGETS[name].get(k) == v for k, v in changes.items()
                                            if k != "workdir") else f"{name}, modified"
        return replace(cls(**BENCH_BUDGETS[name], preset=preset), **changes)

    def budget(self) -> str:
        return (f"preset `{self.preset}`: {self.windows} windows (75 % train / 25 % validation, temporal split); "
                f"pretraining "
                f"{self.pretrain_epochs} epochs (lr {self.lr:g}); frozen-encoder heads {self.head_steps} steps "
                f"(lr 3e-3); supervised from scratch {self.supervised_steps} steps (lr 1e-3); batch "
                f"{self.batch_size}; seeds {list(self.seeds)}")


@dataclass(frozen=True)
class Job:
    kind: str  # pretrain | finetune | floors
    method: str  # spar | mae | mae_node | supervised | an ablation | floors
    seed: int
    task: str = ""  # localize | classify (linear probe) | classify_head (the paper's transformer head)
    ratio: float = 0.0

    @property
    def key(self) -> str:
        if self.kind == "pretrain":
            return f"pretrain/{self.method}/seed{self.seed}"
        if self.kind == "floors":
            return f"floors/{self.ratio:g}/seed{self.seed}"
        return f"finetune/{self.method}/{self.task}/{self.ratio:g}/seed{self.seed}"


def pretrained_by(method: str) -> str:
    """The pretraining a method's heads sit on: the fair MAE reuses the blind MAE's encoder."""
    return "mae" if method == "mae_node" else method


TASKS = ("localize", "classify", "classify_head")


def tasks_of(method: str) -> tuple[str, ...]:
    """Supervised trains encoder and head together, so a probe and a head are the same thing there."""
    return TASKS[:2] if method == "supervised" else TASKS


def plan(cfg: ObjectivesConfig) -> list[Job]:
    """Every job, pretraining before the fine-tuning that needs it."""
    jobs = []
    for seed in cfg.seeds:
        jobs += [Job("floors", "floors", seed, ratio=ratio) for ratio in cfg.label_ratios]
        for method in ("spar", "mae", *cfg.ablations):
            jobs.append(Job("pretrain", method, seed))
        for method in METHODS:
            for task in tasks_of(method):
                jobs += [Job("finetune", method, seed, task, ratio) for ratio in cfg.label_ratios]
        for method in cfg.ablations:
            jobs.append(Job("finetune", method, seed, "localize", cfg.ablation_ratio))
    return jobs


def ensure_dataset(cfg: ObjectivesConfig, progress: Callable[[str], None]) -> Path:
    from node_firmware_sim.dataset import DatasetSpec, export_dataset

    out = cfg.workdir / f"parking_lot-{cfg.windows}"
    if (out / "dataset.json").exists():
        return out
    progress(f"generating {cfg.windows} parking-lot windows -> {out}")
    spec = DatasetSpec(site=str(SITE), scenario="parking_lot", windows=cfg.windows, seed=1234,
                       shard_size=500, params=dict(cfg.scenario_params))
    export_dataset(spec, out, workers=2, overwrite=True)
    return out


def run_job(job: Job, cfg: ObjectivesConfig, data: Path) -> dict[str, Any]:
    from train.finetune import run_finetune
    from train.pretrain import run_pretrain
    from train.run_config import FinetuneConfig, PretrainConfig

    started = time.monotonic()
    if job.kind == "floors":
        return {**floor_job(data, job), "seconds": time.monotonic() - started}
    run_dir = fresh_run_dir(cfg.workdir / "runs" / job.key, job_settings(job, cfg))
    if job.kind == "pretrain":
        result = run_pretrain(PretrainConfig(
            data=str(data), out=str(run_dir), objective=job.method, epochs=cfg.pretrain_epochs,
            batch_size=cfg.batch_size, lr=cfg.lr, seed=job.seed, progress=False, model=dict(cfg.model)))
        return {"train_loss": result.train_loss, "val_loss": result.val_loss, "seconds": time.monotonic() - started}
    supervised = job.method == "supervised"
    encoder = None if supervised else str(cfg.workdir / "runs" / Job("pretrain", pretrained_by(job.method),
                                                                      job.seed).key)
    task, head = ("classify", "transformer") if job.task == "classify_head" else (job.task, "")
    result = run_finetune(FinetuneConfig(
        data=str(data), out=str(run_dir), task=task, head=head, encoder=encoder, label_ratio=job.ratio,
        steps=cfg.supervised_steps if supervised else cfg.head_steps, batch_size=cfg.batch_size,
        lr=1e-3 if supervised else 3e-3, seed=job.seed, progress=False, model=dict(cfg.model) if supervised else {},
        node_identity=job.method == "mae_node"))
    return {**result.metrics, "train_windows": result.train_windows, "seconds": time.monotonic() - started}


def floor_job(data: Path, job: Job, val_fraction: float = 0.25) -> dict[str, Any]:
    """Every floor fitted on the labelled training windows of (ratio, seed), the very subset the
    heads get, and scored on the validation windows: {"softmax/accuracy": ..., "knn/mse": ...}."""
    from train.data import label_subset, load_windows, temporal_split
    from train.finetune import stratify_labels, task_indices
    from train.floors import floor_metrics

    windows = load_windows(data, progress=False)
    train_idx, val_idx = temporal_split(len(windows), val_fraction)
    out: dict[str, Any] = {}
    # Each task's floors learn from the windows and label subset run_finetune gives its heads.
    for task in ("classify", "localize"):
        usable = task_indices(windows, task, train_idx)
        subset = label_subset(usable, stratify_labels(windows, task, usable), job.ratio, job.seed)
        val = task_indices(windows, task, val_idx)
        for floor, metrics in floor_metrics(windows.subset(subset), windows.subset(val)).items():
            if (floor == "softmax") == (task == "classify"):
                out.update({f"{floor}/{k}": v for k, v in metrics.items()})
    return out


def run_objectives(cfg: ObjectivesConfig, progress: Callable[[str], None] = print) -> ObjectivesReport:
    """Run (or resume) every job of ``plan(cfg)`` and return the report."""
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    data = ensure_dataset(cfg, progress)
    ledger = cfg.workdir / "jobs.jsonl"
    done = finished_jobs(ledger)
    jobs = plan(cfg)
    started = time.monotonic()
    results = {}
    for n, job in enumerate(jobs, 1):
        settings = job_settings(job, cfg)
        if (job.key, settings) in done:
            results[job.key] = done[job.key, settings]
            continue
        progress(f"[{n}/{len(jobs)}] {job.key} ({(time.monotonic() - started) / 60:.1f} min so far)")
        results[job.key] = run_job(job, cfg, data)
        record_job(ledger, job.key, settings, results[job.key])
    return ObjectivesReport(cfg, results, describe_machine(versions("torch", torch_build=False)))


def job_settings(job: Job, cfg: ObjectivesConfig) -> str:
    """The settings a job's result depends on: changing the head budget does not redo pretraining."""
    if job.kind == "floors":
        return json.dumps({"windows": cfg.windows, "scenario_params": cfg.scenario_params}, sort_keys=True)
    keys = ["windows", "scenario_params", "pretrain_epochs", "batch_size", "lr", "model"]
    if job.kind == "finetune":
        keys.append("supervised_steps" if job.method == "supervised" else "head_steps")
    values = asdict(cfg)
    return json.dumps({k: values[k] for k in keys}, sort_keys=True, default=str)


@dataclass
class ObjectivesReport:
    cfg: ObjectivesConfig
    results: dict[str, dict[str, Any]]  # job key -> metrics
    machine: str

    def metric(self, method: str, task: str, ratio: float, name: str) -> tuple[float, float]:
        """Mean and standard deviation over seeds (``method`` "floors": ``name`` is "knn/mse" etc.)."""
        if method == "floors":
            values = [self.results[Job("floors", "floors", s, ratio=ratio).key][name] for s in self.cfg.seeds]
        else:
            task = "classify" if task == "classify_head" and method == "supervised" else task
            values = [self.results[Job("finetune", method, s, task, ratio).key][name] for s in self.cfg.seeds]
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    def gap(self, baseline: str = "mae") -> float:
        """Relative localization MSE reduction of SPAR over ``baseline`` at the lowest label ratio."""
        ratio = min(self.cfg.label_ratios)
        spar = self.metric("spar", "localize", ratio, "mse")[0]
        other = self.metric(baseline, "localize", ratio, "mse")[0]
        return 1.0 - spar / other

    def best_floor(self, task: str, ratio: float) -> tuple[str, float]:
        """(floor, value) of the best floor: softmax accuracy, or the lower of kNN / centroid MSE."""
        if task == "localize":
            return min(((f, self.metric("floors", task, ratio, f"{f}/mse")[0]) for f in ("knn", "centroid")),
                       key=lambda fv: fv[1])
        return "softmax", self.metric("floors", task, ratio, "softmax/accuracy")[0]

    def margin(self, method: str, task: str, ratio: float) -> str:
        """A learned row against the best floor: MSE change in %, accuracy change in points."""
        floor, value = self.best_floor(task, ratio)
        if task == "localize":
            mse = self.metric(method, task, ratio, "mse")[0]
            return f"{(mse / value - 1) * 100:+.0f} % MSE vs {floor}" + (" (below the floor)" if mse > value else "")
        acc = self.metric(method, task, ratio, "accuracy")[0]
        return f"{(acc - value) * 100:+.1f} pts vs softmax" + (" (below the floor)" if acc < value else "")

    def to_markdown(self) -> str:
        ratios = self.cfg.label_ratios
        low = min(ratios)
        lines = ["# spar-bench objectives", "", f"machine: {self.machine}", "",
                 f"training budget: {self.cfg.budget()}; total "
                 f"{sum(r.get('seconds', 0) for r in self.results.values()) / 60:.1f} min of training", "",
                 "Simulated parking lot (8 nodes, microphone + geophone, one vehicle or none per episode). "
                 "Heads on frozen encoders (supervised: encoder + head trained together). Validation windows "
                 "only; floors fitted on exactly the labelled windows the heads get. MSE is the mean squared "
                 "Euclidean error in m². Cells are mean ± std over the seeds.", "",
                 "## Localization (the paper's Table 1)", ""]
        head = ["method"] + [f"MSE @{r:g}" for r in ratios] + [f"mean m @{r:g}" for r in ratios] + \
               [f"median m @{low:g}", f"vs best floor @{low:g}"]
        lines += [table_row(head), table_rule(len(head))]
        for method in METHODS:
            cells = [NAMES[method]]
            cells += [self._cell(method, "localize", r, "mse", "{:.1f}") for r in ratios]
            cells += [self._cell(method, "localize", r, "mean_distance", "{:.2f}") for r in ratios]
            cells += [self._cell(method, "localize", low, "median_distance", "{:.2f}"),
                      self.margin(method, "localize", low)]
            lines.append(table_row(cells))
        for floor, label in (("knn", "Floor: kNN on band energies"), ("centroid", "Floor: energy-weighted centroid"),
                             ("mean_position", "Guess: mean position")):
            cells = [label] + [self._cell("floors", "", r, f"{floor}/mse", "{:.1f}") for r in ratios]
            cells += [self._cell("floors", "", r, f"{floor}/mean_distance", "{:.2f}") for r in ratios]
            cells += [self._cell("floors", "", low, f"{floor}/median_distance", "{:.2f}"), ""]
            lines.append(table_row(cells))
        lines += ["", f"SPAR vs the fair MAE (node identity in the head), localization MSE at label ratio {low:g}: "
                  f"{self.gap('mae_node') * 100:+.1f} % lower for SPAR (target >= 30 %; the paper reports about 50 %). "
                  f"Against the blind MAE: {self.gap('mae') * 100:+.1f} %.", "",
                  "## Classification (the paper's Table 3)", "",
                  "Linear probe: masked mean of every token, then one linear layer. Paper head: the localizer's "
                  "one transformer block, then the linear readout.", ""]
        head = ["method"] + [f"probe acc. @{r:g}" for r in ratios] + [f"head acc. @{r:g}" for r in ratios] + \
               [f"head macro-F1 @{low:g}", f"head vs floor @{low:g}"]
        lines += [table_row(head), table_rule(len(head))]
        for method in METHODS:
            cells = [NAMES[method]] + [self._cell(method, "classify", r, "accuracy", "{:.3f}") for r in ratios]
            cells += [self._cell(method, "classify_head", r, "accuracy", "{:.3f}") for r in ratios]
            cells += [self._cell(method, "classify_head", low, "macro_f1", "{:.3f}"), self._margin_head(method, low)]
            lines.append(table_row(cells))
        cells = ["Floor: softmax on band energies"] + \
            [self._cell("floors", "", r, "softmax/accuracy", "{:.3f}") for r in ratios] + [""] * len(ratios) + \
            [self._cell("floors", "", low, "softmax/macro_f1", "{:.3f}"), ""]
        lines.append(table_row(cells))
        lines += ["", self.separation(), ""]
        if self.cfg.ablations:
            r = self.cfg.ablation_ratio
            lines += [f"## Ablations (the paper's Table 8), localization at label ratio {r:g}", "",
                      table_row(["variant", "MSE m²", "dist. err. m", "median m", "p90 m"]), table_rule(5)]
            for method in ("spar", *self.cfg.ablations):
                lines.append(table_row([method.replace("_", " ")] + [
                    self._cell(method, "localize", r, name, fmt) for name, fmt in
                    (("mse", "{:.1f}"), ("mean_distance", "{:.2f}"), ("median_distance", "{:.2f}"),
                     ("p90_distance", "{:.2f}"))]))
        lines += ["", f"Reproduce: `spar-bench objectives --budget {self.cfg.preset.split(',')[0]}`"
                  + (" with the changed settings above" if "modified" in self.cfg.preset else "") + ".", ""]
        return "\n".join(lines)

    def _margin_head(self, method: str, ratio: float) -> str:
        task = "classify" if method == "supervised" else "classify_head"
        floor = self.best_floor("classify", ratio)[1]
        acc = self.metric(method, task, ratio, "accuracy")[0]
        return f"{(acc - floor) * 100:+.1f} pts" + (" (below the floor)" if acc < floor else "")

    def separation(self) -> str:
        """Which tasks can tell the methods apart: a floor near perfect leaves no room."""
        low = min(self.cfg.label_ratios)
        acc = self.best_floor("classify", low)[1]
        if acc >= 0.98:
            cls = (f"Classification does not separate the methods here: the softmax floor already reaches "
                   f"{acc:.3f}.")
        else:
            cls = f"Classification separates the methods (softmax floor {acc:.3f})."
        return cls + " Localization separates them: the best floor's error is far from zero."

    def _cell(self, method: str, task: str, ratio: float, name: str, fmt: str) -> str:
        mean, std = self.metric(method, task, ratio, name)
        return fmt.format(mean) + (f" ± {fmt.format(std)}" if len(self.cfg.seeds) > 1 else "")


    def plot(self, path: Path) -> None:
        """Localization MSE per method and label ratio, and per ablation."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = 2 if self.cfg.ablations else 1
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
        ax = axes[0][0]
        width = 0.8 / len(self.cfg.label_ratios)
        for i, ratio in enumerate(self.cfg.label_ratios):
            means = [self.metric(m, "localize", ratio, "mse") for m in METHODS]
            ax.bar([x + i * width for x in range(len(METHODS))], [m for m, _ in means], width,
                   yerr=[s for _, s in means], label=f"label ratio {ratio:g}")
        ax.set_xticks([x + width * (len(self.cfg.label_ratios) - 1) / 2 for x in range(len(METHODS))], METHODS)
        low = min(self.cfg.label_ratios)
        floor, value = self.best_floor("localize", low)
        ax.axhline(value, color="k", linestyle="--", linewidth=1, label=f"best floor ({floor}) @{low:g}")
        ax.set_ylabel("localization MSE (m², lower is better)")
        ax.set_title("Objectives, frozen encoder + 1-layer head")
        ax.legend()
        if self.cfg.ablations:
            ax = axes[0][1]
            variants = ("spar", *self.cfg.ablations)
            means = [self.metric(v, "localize", self.cfg.ablation_ratio, "mse")[0] for v in variants]
            ax.barh([v.replace("_", " ") for v in variants], means, color=["C2"] + ["C7"] * (len(variants) - 1))
            ax.invert_yaxis()
            ax.set_xlabel("localization MSE (m²)")
            ax.set_title(f"Ablations, label ratio {self.cfg.ablation_ratio:g}")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)


def check_config(cfg: ObjectivesConfig) -> None:
    from train.models.config import ABLATIONS as KNOWN

    unknown = [a for a in cfg.ablations if a not in KNOWN]
    if unknown:
        raise BenchError(f"unknown ablation(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}")
    if cfg.windows < 40:
        raise BenchError("--windows must be >= 40")
    if any(not 0 < r <= 1 for r in (*cfg.label_ratios, cfg.ablation_ratio)):
        raise BenchError("label ratios must be in (0, 1]")
