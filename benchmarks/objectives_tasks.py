"""``spar-bench objectives --dataset quakes|parking_lot_multi``: SPAR against the MAE baselines,
supervised and floors on the two located-target tasks of the paper's Tables 2 and 3.

* quakes: earthquake location on the ridgecrest-like network (16 three-component stations about
  120 km across, one event per 30.72 s window, 20 % of the station traces missing in every window);
  the hypocentre head (``train.heads.quake``: two transformer blocks, MSE, the paper's appendix E.3);
  hypocentre, epicentral and depth errors in km (mean / median / p90). Floors
  (``train.quake_floors``): STA/LTA P picks + a travel-time grid search at the known P velocity, the
  first-arrival station, kNN on band energies, and the training mean.
* parking_lot_multi: up to three vehicles at once in the parking lot (8 nodes, microphone +
  geophone); the node-anchored detector (``train.heads.anchor_detector``, ``detector="anchors"``) or
  the paper's plain DETR head (``train.heads.detector``, ``detector="detr"``); mAP@{4,6,8,10} m (a detection
  counts with the right class within r metres). Floors (``train.detect_floors``): the vehicles of
  the nearest training windows (kNN on band energies) and energy peaks among neighbouring nodes.

Methods, as in ``benchmarks.objectives``: SPAR and the blind MAE pretrained on the training windows
with their frozen encoders under the task's head; the fair MAE (``mae_node``: the blind MAE's encoder
with a learnable vector per node in its head); supervised (the same encoder and head from scratch on
the labelled windows). Floors are fitted on exactly the labelled windows the heads get. Everything
is scored on the held-out last quarter of windows (temporal split), at label ratios 1.0 and 0.2,
mean ± std over seeds. Finished jobs are remembered in ``<workdir>/jobs.jsonl``, so an interrupted
run resumes.
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
from benchmarks.experiment_ledger import LedgerJob, fresh_run_dir, run_ledger, versions
from testbed.machine import describe_machine
from testbed.report_format import table_row, table_rule

REPO = Path(__file__).resolve().parents[1]
METHODS = ("supervised", "mae", "mae_node", "spar")
NAMES = {"supervised": "Supervised (from scratch)", "mae": "MAE (blind)", "mae_node": "MAE + node identity (fair)",
         "spar": "SPAR"}
ERRORS = ("hypocentre", "epicentral", "depth")
VAL_FRACTION = 0.25


@dataclass(frozen=True)
class TaskSpec:
    """What differs between the two datasets."""

    site: str  # file under configs/sites
    scenario: str
    task: str  # the finetune task: quake | detect
    floors: dict[str, str]  # floor name -> row name; the last one is a guess, never the best floor
    columns: tuple[tuple[str, str], ...]  # (metric key, column heading)
    headline: str  # the metric that ranks rows against the floors
    lower_is_better: bool
    scale: float  # divisor for display (metres -> km for quakes)
    description: str
    floor_text: str


SPECS = {
    "quakes": TaskSpec(
        "ridgecrest_like.toml", "earthquakes", "quake",
        {"grid_search": "Floor: STA/LTA picks + travel-time grid search",
         "first_arrival": "Floor: first-arrival station", "knn": "Floor: kNN on band energies",
         "mean_position": "Guess: mean hypocentre"},
        tuple((f"{kind}_{stat}", f"{kind} {stat}") for kind in ERRORS for stat in ("mean", "median", "p90")),
        "hypocentre_mean", True, 1000.0,
        "Simulated local earthquakes on the ridgecrest-like network (16 three-component stations about 120 km "
        "across, magnitudes 0.5-4.5, depths 1-20 km, one event per 30.72 s window). Errors in km on the validation "
        "windows; cells are mean ± std over the seeds.",
        "Floors (`train/quake_floors.py`) read the same tokens as the models: the grid search picks a P onset per "
        "station with an STA/LTA trigger on the spectrogram energy (0.64 s frames; threshold {setting} chosen on the "
        "training windows), then searches a 2 km grid and a 250 m grid around its best node for the hypocentre "
        "whose straight-ray P times at the regional velocity (6 km/s) best explain the picks with an unknown origin "
        "time (L1). The first-arrival station puts the epicentre at the station that triggered first, at the "
        "training mean depth. \"vs best floor\": change of the mean hypocentre error against the best floor at that "
        "label ratio (negative is better)."),
    "parking_lot_multi": TaskSpec(
        "parking_lot.toml", "parking_lot", "detect",
        {"energy_peaks": "Floor: energy peaks among neighbouring nodes",
         "knn": "Floor: kNN (the nearest training windows' vehicles)"},
        tuple((f"mAP@{r}", f"mAP@{r}") for r in (4, 6, 8, 10)),
        "mAP@8", False, 1.0,
        "Simulated parking lot with up to three vehicles at once (8 nodes, microphone + geophone; 10 % of "
        "episodes empty). The detector named in the budget line on the frozen encoders (supervised: encoder + "
        "detector from scratch): `anchors`, one DETR query per node that predicts its vehicle as an offset from the "
        "node (`train/heads/anchor_detector.py`), or `detr`, the paper's DETR head with 8 learnt queries. mAP@r: a "
        "detection counts only with the right vehicle class within r metres (the paper's "
        "Table 2); cells are mean ± std over the seeds.",
        "Floors (`train/detect_floors.py`) read the same per-node band energies: kNN gives the vehicles of the k "
        "nearest training windows (k {setting} chosen on the training windows), weighted by similarity; energy "
        "peaks call every node louder than its two nearest neighbours (and within a tuned margin of the loudest) a "
        "vehicle at the energy centroid of the three, classed by a softmax on that node's band energies. "
        "\"vs best floor\": change of mAP@8 in points against the best floor (positive is better)."),
}
DETECTORS = {"anchors": "anchors", "detr": ""}  # --detector -> spar-train finetune --head
BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"windows": 1600, "pretrain_epochs": 10, "head_steps": 700, "supervised_steps": 300},
    "standard": {"windows": 4000, "pretrain_epochs": 30, "head_steps": 1500, "supervised_steps": 1500},
    "full": {"windows": 20000, "pretrain_epochs": 100, "head_steps": 3000, "supervised_steps": 8000},
}


@dataclass(frozen=True)
class TaskObjectivesConfig:
    dataset: str = "quakes"  # a SPECS name
    workdir: Path = Path("benchmarks/.work/objectives")  # dataset, checkpoints, finished jobs
    windows: int = 1600  # generated windows (the last quarter validates)
    pretrain_epochs: int = 10
    head_steps: int = 700  # frozen-encoder heads, lr 3e-3
    supervised_steps: int = 300  # encoder + head from scratch, lr 1e-3
    batch_size: int = 32
    lr: float = 1e-3
    label_ratios: tuple[float, ...] = (1.0, 0.2)
    seeds: tuple[int, ...] = (0, 1, 2)
    missing_trace_fraction: float = 0.2  # quakes: station traces dropped per window by the scenario itself
    max_vehicles: int = 3  # parking_lot_multi: most vehicles at once
    detector: str = "anchors"  # parking_lot_multi: anchors (one query per node) or detr (8 learnt queries)
    model: dict[str, Any] = field(default_factory=dict)  # SparConfig overrides for every encoder
    preset: str = "custom"

    @classmethod
    def for_budget(cls, name: str, **changes: Any) -> TaskObjectivesConfig:
        """Preset ``name`` (BUDGETS), then ``changes``; changed settings name the preset "<name>, modified"."""
        if name not in BUDGETS:
            raise BenchError(f"unknown budget {name!r}; known: {', '.join(BUDGETS)}")
        same = all(BUDGETS[name].get(k, getattr(cls, k, None)) == v for k, v in changes.items()
                   if k not in ("workdir", "dataset", "detector"))  # what is measured, not its budget
        return replace(cls(**BUDGETS[name], preset=name if same else f"{name}, modified"), **changes)

    @property
    def spec(self) -> TaskSpec:
        return SPECS[self.dataset]

    def budget(self) -> str:
        data = (f"{self.missing_trace_fraction * 100:g} % of the traces missing" if self.dataset == "quakes" else
                f"up to {self.max_vehicles} vehicles, detector `{self.detector}`")
        return (f"preset `{self.preset}`: {self.windows} windows (75 % train / 25 % validation, temporal split), "
                f"{data}; pretraining {self.pretrain_epochs} "
                f"epochs (lr {self.lr:g}); frozen-encoder heads {self.head_steps} steps (lr 3e-3); supervised from "
                f"scratch {self.supervised_steps} steps (lr 1e-3); batch {self.batch_size}; label ratios "
                f"{list(self.label_ratios)}; seeds {list(self.seeds)}")


@dataclass(frozen=True)
class Job(LedgerJob):
    """A job of this benchmark (``LedgerJob``; the dataset defaults to the seismic network)."""

    dataset: str = "quakes"


def plan(cfg: TaskObjectivesConfig) -> list[Job]:
    """Every job, pretraining before the heads that need it; floors (a minute each) first."""
    jobs: list[Job] = []
    d = cfg.dataset
    for seed in cfg.seeds:
        jobs += [Job("floors", "floors", seed, r, d) for r in cfg.label_ratios]
        jobs += [Job("pretrain", m, seed, dataset=d) for m in ("spar", "mae")]
        jobs += [Job("finetune", m, seed, r, d) for m in METHODS for r in cfg.label_ratios]
    return jobs


def check_config(cfg: TaskObjectivesConfig) -> None:
    if cfg.dataset not in SPECS:
        raise BenchError(f"unknown dataset {cfg.dataset!r}; known: {', '.join(SPECS)}")
    if not 1 <= cfg.max_vehicles <= 8:
        raise BenchError("max_vehicles must be in 1..8 (the detector has 8 queries)")
    if cfg.detector not in DETECTORS:
        raise BenchError(f"unknown detector {cfg.detector!r}; known: {', '.join(DETECTORS)}")
    if cfg.windows < 80:
        raise BenchError("--windows must be >= 80")
    if any(not 0 < r <= 1 for r in cfg.label_ratios):
        raise BenchError("label ratios must be in (0, 1]")
    if not 0 <= cfg.missing_trace_fraction < 1:
        raise BenchError("the missing trace fraction must be in [0, 1)")


def ensure_dataset(cfg: TaskObjectivesConfig, progress: Callable[[str], None]) -> Path:
    from node_firmware_sim.dataset import DatasetSpec, export_dataset

    if cfg.dataset == "quakes":
        out = cfg.workdir / f"quakes-{cfg.windows}-missing{cfg.missing_trace_fraction:g}"
        params: dict[str, Any] = {"missing_trace_fraction": cfg.missing_trace_fraction}
    else:
        out = cfg.workdir / f"parking_lot_multi-{cfg.windows}-max{cfg.max_vehicles}"
        params = {"max_vehicles": cfg.max_vehicles, "empty_fraction": 0.1}
    if not (out / "dataset.json").exists():
        progress(f"generating {cfg.windows} {cfg.spec.scenario} windows -> {out}")
        spec = DatasetSpec(site=str(REPO / "configs" / "sites" / cfg.spec.site), scenario=cfg.spec.scenario,
                           windows=cfg.windows, seed=4321, codec="webp:85", shard_size=500, params=params)
        export_dataset(spec, out, workers=2, overwrite=True)
    return out


def job_settings(cfg: TaskObjectivesConfig, job: Job) -> str:
    """What a job's result depends on: changing the head budget does not redo pretraining."""
    # quakes' keys predate the second dataset: its ledger stays valid
    keys = ["windows", "missing_trace_fraction", "model"] if cfg.dataset == "quakes" else \
        ["dataset", "windows", "max_vehicles", "model"]
    if job.kind != "floors":
        keys += ["pretrain_epochs", "batch_size", "lr"]
    if job.kind == "finetune":
        keys.append("supervised_steps" if job.method == "supervised" else "head_steps")
        if cfg.dataset == "parking_lot_multi" and cfg.detector != "detr":
            keys.append("detector")  # ledgers from before the anchored head hold detr results
    values = asdict(cfg)
    return json.dumps({k: values[k] for k in keys}, sort_keys=True, default=str)


def run_job(job: Job, cfg: TaskObjectivesConfig, data: Path) -> dict[str, Any]:
    from train.finetune import run_finetune
    from train.pretrain import run_pretrain
    from train.run_config import FinetuneConfig, PretrainConfig

    started = time.monotonic()
    if job.kind == "floors":
        return {**floor_job(job, cfg, data), "seconds": time.monotonic() - started}
    run_dir = fresh_run_dir(cfg.workdir / "runs" / job.key, job_settings(cfg, job))
    if job.kind == "pretrain":
        result = run_pretrain(PretrainConfig(
            data=str(data), out=str(run_dir), objective=job.method, epochs=cfg.pretrain_epochs,
            batch_size=cfg.batch_size, lr=cfg.lr, seed=job.seed, progress=False, model=dict(cfg.model)))
        return {"val_loss": result.val_loss, "seconds": time.monotonic() - started}
    scratch = job.method == "supervised"
    encoder = None if scratch else str(cfg.workdir / "runs" / Job(
        "pretrain", "mae" if job.method == "mae_node" else job.method, job.seed, dataset=cfg.dataset).key)
    result = run_finetune(FinetuneConfig(
        data=str(data), out=str(run_dir), task=cfg.spec.task, encoder=encoder, label_ratio=job.ratio,
        steps=cfg.supervised_steps if scratch else cfg.head_steps, batch_size=cfg.batch_size,
        lr=1e-3 if scratch else 3e-3, seed=job.seed, progress=False, model=dict(cfg.model) if scratch else {},
        node_identity=job.method == "mae_node", head=DETECTORS[cfg.detector] if cfg.spec.task == "detect" else ""))
    return {**result.metrics, "train_windows": result.train_windows, "seconds": time.monotonic() - started}


def floor_job(job: Job, cfg: TaskObjectivesConfig, data: Path) -> dict[str, Any]:
    """The floors on the labelled training windows of (ratio, seed), the very subset ``run_finetune``
    gives the heads, scored on the same validation windows: {"grid_search/hypocentre_mean": ...}."""
    from train.data import label_subset, load_windows, temporal_split
    from train.detect_floors import detect_floor_metrics
    from train.finetune import stratify_labels, task_indices
    from train.quake_floors import quake_floor_metrics

    task = cfg.spec.task
    windows = load_windows(data, progress=False)
    train_idx, val_idx = temporal_split(len(windows), VAL_FRACTION)
    usable = task_indices(windows, task, train_idx)
    subset = label_subset(usable, stratify_labels(windows, task, usable), job.ratio, job.seed)
    floors = quake_floor_metrics if task == "quake" else detect_floor_metrics
    metrics = floors(windows.subset(subset), windows.subset(task_indices(windows, task, val_idx)))
    return {f"{floor}/{name}": value for floor, values in metrics.items() for name, value in values.items()}


def run_task_objectives(cfg: TaskObjectivesConfig, progress: Callable[[str], None] = print
                         ) -> TaskObjectivesReport:
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
    return TaskObjectivesReport(cfg, results, describe_machine(versions("torch", torch_build=False)))


@dataclass
class TaskObjectivesReport:
    cfg: TaskObjectivesConfig
    results: dict[str, dict[str, Any]]  # job key -> metrics (metres for quakes)
    machine: str

    @property
    def spec(self) -> TaskSpec:
        return self.cfg.spec

    def metric(self, method: str, ratio: float, name: str) -> tuple[float, float]:
        """Mean and std over seeds, in display units (km for quakes); ``method`` a floor name: that floor's."""
        d = self.cfg.dataset
        if method in self.spec.floors:
            values = [self.results[Job("floors", "floors", s, ratio, d).key][f"{method}/{name}"]
                      for s in self.cfg.seeds]
        else:
            values = [self.results[Job("finetune", method, s, ratio, d).key][name] for s in self.cfg.seeds]
        shown = [float(v) / self.spec.scale for v in values]
        return statistics.fmean(shown), (statistics.stdev(shown) if len(shown) > 1 else 0.0)

    def best_floor(self, ratio: float) -> tuple[str, float]:
        """(floor, headline metric) of the best floor (the guess in the last row is never the best floor)."""
        floors = list(self.spec.floors)
        floors = floors[:-1] if self.cfg.dataset == "quakes" else floors
        scores = [(f, self.metric(f, ratio, self.spec.headline)[0]) for f in floors]
        return (min if self.spec.lower_is_better else max)(scores, key=lambda fv: fv[1])

    def margin(self, method: str, ratio: float) -> str:
        floor, value = self.best_floor(ratio)
        mine = self.metric(method, ratio, self.spec.headline)[0]
        name = floor.replace("_", " ")
        if self.spec.lower_is_better:
            return f"{(mine / value - 1) * 100:+.0f} % vs {name}" + (" (below the floor)" if mine > value else "")
        return f"{(mine - value) * 100:+.1f} pts vs {name}" + (" (below the floor)" if mine < value else "")

    def rows(self) -> list[tuple[str, str]]:
        """(key, row name) of every method, then every floor."""
        return [(m, NAMES[m]) for m in METHODS] + list(self.spec.floors.items())

    def table(self) -> list[dict[str, Any]]:
        unit = "_km" if self.cfg.dataset == "quakes" else ""
        out = []
        for key, name in self.rows():
            row: dict[str, Any] = {"method": name}
            for ratio in self.cfg.label_ratios:
                for metric, _ in self.spec.columns:
                    row[f"{metric}{unit}@labels{ratio:g}"] = self.metric(key, ratio, metric)[0]
            out.append(row)
        return out

    def to_markdown(self) -> str:
        cfg, spec = self.cfg, self.spec
        lines = [f"# spar-bench objectives --dataset {cfg.dataset}", "", f"machine: {self.machine}", "",
                 f"budget: {cfg.budget()}; total "
                 f"{sum(r.get('seconds', 0) for r in self.results.values()) / 60:.1f} min of training", "",
                 spec.description, ""]
        for ratio in cfg.label_ratios:
            lines += [f"## Label ratio {ratio:g}", ""]
            head = ["method"] + [label for _, label in spec.columns] + ["vs best floor"]
            lines += [table_row(head), table_rule(len(head))]
            for key, name in self.rows():
                cells = [name] + [self._cell(key, ratio, metric) for metric, _ in spec.columns]
                cells.append(self.margin(key, ratio) if key in METHODS else "")
                lines.append(table_row(cells))
            lines.append("")
        setting_key = "grid_search/sta_lta_threshold" if cfg.dataset == "quakes" else "knn/k"
        settings = sorted({self.results[Job("floors", "floors", s, r, cfg.dataset).key][setting_key]
                           for s in cfg.seeds for r in cfg.label_ratios})
        lines += [spec.floor_text.format(setting=", ".join(f"{t:g}" for t in settings)), "",
                  f"Reproduce: `spar-bench objectives --dataset {cfg.dataset} --budget {cfg.preset.split(',')[0]}"
                  + (f" --detector {cfg.detector}" if cfg.spec.task == "detect" else "") + "`"
                  + (" with the changed settings above" if "modified" in cfg.preset else "") + ".", ""]
        return "\n".join(lines)

    def _cell(self, method: str, ratio: float, name: str) -> str:
        mean, std = self.metric(method, ratio, name)
        fmt = "{:.2f}" if self.cfg.dataset == "quakes" else "{:.3f}"
        return fmt.format(mean) + (f" ± {fmt.format(std)}" if len(self.cfg.seeds) > 1 else "")

    def plot(self, path: Path) -> None:
        """Quakes: mean hypocentre / epicentral / depth error per row; detection: mAP against r."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if self.cfg.dataset == "quakes":
            fig = self._plot_errors(plt)
        else:
            fig = self._plot_map(plt)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def _plot_errors(self, plt):
        rows = [k for k, _ in self.rows()][:-1]  # not the guess
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
        return fig

    def _plot_map(self, plt):
        radii = [int(m.split("@")[1]) for m, _ in self.spec.columns]
        fig, axes = plt.subplots(1, len(self.cfg.label_ratios), figsize=(6 * len(self.cfg.label_ratios), 4),
                                 squeeze=False)
        for ax, ratio in zip(axes[0], self.cfg.label_ratios, strict=True):
            floors = list(self.spec.floors)
            for key, name in self.rows():
                values = [self.metric(key, ratio, f"mAP@{r}")[0] for r in radii]
                style = {"color": "k", "linestyle": ("--", ":")[floors.index(key) % 2], "linewidth": 1} \
                    if key in floors else {}
                ax.plot(radii, values, marker="o", label=name, **style)
            ax.set(xlabel="match radius r (m)", ylabel="mAP@r (higher is better)", title=f"label ratio {ratio:g}")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle("Multi-vehicle detection, parking lot (up to 3 vehicles)")
        return fig
