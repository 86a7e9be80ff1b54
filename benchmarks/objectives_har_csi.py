"""``spar-bench objectives --dataset har|csi``: every pretraining objective on the data of the
alternative objectives' papers, on the same backbone and budget.

* har: simulated body-worn IMUs (configs/sites/body_har.toml, 6 positions x acc/gyro/mag), activity
  classification: accuracy and macro-F1 with 0 / 5 / 10 / 15 % of the (node, sensor) streams of each
  window missing at test time (RobustHAR's robustness table), at label ratios 1.0 and 0.15.
* csi: simulated indoor Wi-Fi CSI (configs/sites/indoor_csi.toml, 8 access points), device
  localization: median and 90th-percentile error in metres (AEMP's metric), same missing rates
  (access points whose packets did not arrive).

Every objective's encoder is pretrained on the training windows and frozen under the default head
(linear classifier / one-block localizer), so the rows compare objectives, not heads. Two extra rows
give each paper its own fine-tuning: RobustHAR with its multi-scale fusion head, and AEMP with the
map-aware localizer and layer-wise fine-tuning (encoder unfrozen, so it gets the end-to-end budget).
"Supervised" trains encoder + head from scratch on the labelled windows.

Floors (``train.floors``) sit under the learned rows: softmax regression on band energies (har), kNN
on the same features and the energy-weighted centroid of the access points (csi). They are fitted on
exactly the labelled training windows the heads get (same ``label_subset`` per label ratio and seed)
and scored on the same validation windows with the same missing streams (``missing_streams``: one
generator per rate, drawn batch by batch as the models are scored). Every learned row gets its margin
against the best floor. Finished jobs are remembered in ``<workdir>/jobs.jsonl``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.errors import BenchError
from benchmarks.experiment_ledger import LedgerJob, fresh_run_dir, run_ledger, versions
from testbed.machine import describe_machine
from testbed.report_format import table_row, table_rule

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DatasetSpec:
    site: str  # file under configs/sites
    scenario: str
    task: str  # classify | localize
    metrics: tuple[str, ...]  # headline metrics of the task (train.metrics.summarize names)
    description: str


DATASETS = {
    "har": DatasetSpec("body_har.toml", "body_har", "classify", ("accuracy", "macro_f1"),
                       "simulated body-worn IMUs: 6 positions x accelerometer, gyroscope, magnetometer; "
                       "activity classification"),
    "csi": DatasetSpec("indoor_csi.toml", "indoor_csi", "localize", ("median_distance", "p90_distance"),
                       "simulated indoor Wi-Fi CSI: 8 access points, 32 subcarriers; device localization in a "
                       "20 m x 12 m office"),
}


@dataclass(frozen=True)
class Method:
    objective: str  # pretraining objective ("supervised": none, encoder trained from scratch)
    head: str = ""  # fine-tuning head variant ("" = the task's default)
    layerwise: bool = False


METHODS: dict[str, Method] = {
    "supervised": Method("supervised"),
    "mae": Method("mae"),
    "spar": Method("spar"),
    "robusthar": Method("robusthar"),
    "aemp": Method("aemp"),
    "robusthar + fusion head": Method("robusthar", head="fusion"),
    "aemp + map head, layer-wise": Method("aemp", head="map", layerwise=True),
}
EXTRA_ROW = {"har": "robusthar + fusion head", "csi": "aemp + map head, layer-wise"}
# Floors of each task (train.floors names) and their rows; the guess is shown, never the best floor.
FLOORS = {"classify": ("softmax",), "localize": ("knn", "centroid")}
FLOOR_ROWS = {"softmax": "Floor: softmax on band energies", "knn": "Floor: kNN on band energies",
              "centroid": "Floor: energy-weighted centroid", "mean_position": "Guess: mean position"}
SHOWN_FLOORS = {"classify": ("softmax",), "localize": ("knn", "centroid", "mean_position")}
SEPARATES_BELOW = 0.98  # a floor at or above this accuracy leaves no room to tell methods apart
VAL_FRACTION = 0.25  # the fine-tuning default: the last quarter of windows validates
DROP_SEED = 7  # one generator per missing rate, the same for every method and floor


@dataclass(frozen=True)
class DatasetObjectivesConfig:
    dataset: str = "har"
    workdir: Path = Path("benchmarks/.work/objectives")
    windows: int = 800
    pretrain_epochs: int = 6
    head_steps: int = 500  # frozen-encoder heads (lr 3e-3)
    end_to_end_steps: int = 150  # supervised and layer-wise runs: the encoder trains too (lr 1e-3)
    batch_size: int = 32
    lr: float = 1e-3
    label_ratios: tuple[float, ...] = (1.0, 0.15)
    missing_rates: tuple[float, ...] = (0.0, 0.05, 0.10, 0.15)
    seeds: tuple[int, ...] = (0,)
    model: dict[str, Any] = field(default_factory=dict)  # SparConfig overrides for every encoder
    # AEMP encodes one batch per view (N-1 of the top-N APs); two views per step keep its cost near
    # the others' on two CPU cores. The standard and full budgets use every view, as the paper.
    aemp_params: dict[str, Any] = field(default_factory=lambda: {"views_per_step": 2})

    @classmethod
    def full(cls, **changes: Any) -> DatasetObjectivesConfig:
        return replace(cls(windows=3000, pretrain_epochs=30, head_steps=1500, end_to_end_steps=1000,
                           seeds=(0, 1, 2), aemp_params={}), **changes)

    @property
    def spec(self) -> DatasetSpec:
        return DATASETS[self.dataset]

    @property
    def methods(self) -> tuple[str, ...]:
        return ("supervised", "mae", "spar", "robusthar", "aemp", EXTRA_ROW[self.dataset])

    def budget(self) -> str:
        return (f"{self.windows} windows (75 % train / 25 % validation, temporal split); pretraining "
                f"{self.pretrain_epochs} epochs (lr {self.lr:g}); frozen-encoder heads {self.head_steps} steps "
                f"(lr 3e-3); from scratch and layer-wise {self.end_to_end_steps} steps (lr 1e-3); batch "
                f"{self.batch_size}; label ratios {list(self.label_ratios)}; seeds {list(self.seeds)}")


def dataset_job(dataset: str, kind: str, method: str, seed: int, ratio: float = 1.0) -> LedgerJob:
    """A job of this benchmark; a pretrain job's key names its objective, so methods that share an
    objective (SPAR and its heads) share one pretrained encoder."""
    return LedgerJob(kind, method, seed, ratio, dataset, METHODS[method].objective if kind == "pretrain" else "")


def plan(cfg: DatasetObjectivesConfig) -> list[LedgerJob]:
    jobs: list[LedgerJob] = []
    for seed in cfg.seeds:
        jobs += [dataset_job(cfg.dataset, "floors", "floors", seed, r) for r in cfg.label_ratios]  # seconds: first
        pretrained = dict.fromkeys(METHODS[m].objective for m in cfg.methods if m != "supervised")
        jobs += [dataset_job(cfg.dataset, "pretrain", next(m for m in cfg.methods if METHODS[m].objective == o), seed)
                 for o in pretrained]
        jobs += [dataset_job(cfg.dataset, "finetune", m, seed, r) for m in cfg.methods for r in cfg.label_ratios]
    return jobs


def ensure_dataset(cfg: DatasetObjectivesConfig, progress: Callable[[str], None]) -> Path:
    from node_firmware_sim.dataset import DatasetSpec as ExportSpec
    from node_firmware_sim.dataset import export_dataset

    out = cfg.workdir / f"{cfg.dataset}-{cfg.windows}"
    if not (out / "dataset.json").exists():
        progress(f"generating {cfg.windows} {cfg.spec.scenario} windows -> {out}")
        spec = ExportSpec(site=str(REPO / "configs" / "sites" / cfg.spec.site), scenario=cfg.spec.scenario,
                          windows=cfg.windows, seed=2024, shard_size=500)
        export_dataset(spec, out, workers=2, overwrite=True)
    return out


def run_job(job: LedgerJob, cfg: DatasetObjectivesConfig, data: Path) -> dict[str, Any]:
    from train.finetune import run_finetune
    from train.pretrain import run_pretrain
    from train.run_config import FinetuneConfig, PretrainConfig

    if job.kind == "floors":
        started = time.monotonic()
        return {**floor_job(job, cfg, data), "seconds": time.monotonic() - started}
    method = METHODS[job.method]
    run_dir = fresh_run_dir(cfg.workdir / "runs" / job.key, job_settings(cfg))
    started = time.monotonic()
    if job.kind == "pretrain":
        model = dict(cfg.model)
        if method.objective == "aemp" and cfg.aemp_params:
            model["objective_params"] = dict(cfg.aemp_params)
        result = run_pretrain(PretrainConfig(
            data=str(data), out=str(run_dir), objective=method.objective, epochs=cfg.pretrain_epochs,
            batch_size=cfg.batch_size, lr=cfg.lr, seed=job.seed, progress=False, model=model))
        return {"val_loss": result.val_loss, "seconds": time.monotonic() - started}
    scratch = method.objective == "supervised"
    end_to_end = scratch or method.layerwise
    pretrained = dataset_job(cfg.dataset, "pretrain", job.method, job.seed)
    encoder = None if scratch else str(cfg.workdir / "runs" / pretrained.key)
    result = run_finetune(FinetuneConfig(
        data=str(data), out=str(run_dir), task=cfg.spec.task, encoder=encoder, label_ratio=job.ratio,
        steps=cfg.end_to_end_steps if end_to_end else cfg.head_steps, batch_size=cfg.batch_size,
        lr=1e-3 if end_to_end else 3e-3, seed=job.seed, progress=False, head=method.head,
        layerwise=method.layerwise, model=dict(cfg.model) if scratch else {}))
    return {"missing": missing_data_metrics(result.checkpoint, data, cfg), "seconds": time.monotonic() - started,
            "train_windows": result.train_windows}


def missing_data_metrics(checkpoint: Path, data: Path, cfg: DatasetObjectivesConfig) -> dict[str, dict[str, float]]:
    """Validation metrics with each (node, modality) stream of a window lost at each missing rate
    (the same losses for every method and floor: ``missing_streams``)."""
    import torch

    from train.data import load_windows
    from train.finetune import evaluate, load_task_model

    model, _ = load_task_model(checkpoint)
    windows = load_windows(data, progress=False)
    val_idx = validation_indices(windows, cfg.spec.task)
    out = {}
    for rate in cfg.missing_rates:
        seen = missing_streams(windows, val_idx, rate, cfg.batch_size)
        out[f"{rate:g}"] = evaluate(model, seen, np.arange(len(seen)), cfg.batch_size, torch.device("cpu"))
    return out


def validation_indices(windows, task: str) -> np.ndarray:
    """The validation windows the fine-tuned heads are scored on (temporal split, usable for the task)."""
    from train.data import temporal_split
    from train.finetune import task_indices

    return task_indices(windows, task, temporal_split(len(windows), VAL_FRACTION)[1])


def missing_streams(windows, indices: np.ndarray, rate: float, batch_size: int):
    """The WindowSet of ``indices`` with each (node, modality) token message lost with probability
    ``rate``: ``train.data.drop_nodes`` per batch of ``batch_size`` (in order, as the models are
    scored) from a generator seeded ``DROP_SEED``, so models and floors see identical inputs. Lost
    streams have present False and zero tokens (the floors mask them out)."""
    import torch

    from train.data import drop_nodes, iterate_batches

    out = windows.subset(indices)  # a copy: edited in place below
    if not rate:
        return out
    generator = torch.Generator().manual_seed(DROP_SEED)
    for rows in iterate_batches(np.arange(len(out)), batch_size, shuffle=False, seed=0, epoch=0, drop_last=False):
        batch = drop_nodes(out.batch(rows), rate, generator, per_modality=True)
        for name in batch.modalities:
            out.tokens[name][rows] = batch.tokens[name].numpy()
            out.present[name][rows] = batch.present[name].numpy()
    return out


def floor_job(job: LedgerJob, cfg: DatasetObjectivesConfig, data: Path) -> dict[str, Any]:
    """The task's floors fitted on the labelled training windows of (ratio, seed), the very subset
    ``run_finetune`` gives the heads, and scored on the validation windows at every missing rate:
    {"missing": {"0.1": {"softmax/accuracy": ..., ...}, ...}, "train_windows": ...}."""
    from train.data import label_subset, load_windows, temporal_split
    from train.finetune import stratify_labels, task_indices
    from train.floors import floor_metrics

    task = cfg.spec.task
    windows = load_windows(data, progress=False)
    train_all = task_indices(windows, task, temporal_split(len(windows), VAL_FRACTION)[0])
    train_idx = label_subset(train_all, stratify_labels(windows, task, train_all), job.ratio, job.seed)
    train, val_idx = windows.subset(train_idx), validation_indices(windows, task)
    missing = {}
    for rate in cfg.missing_rates:
        metrics = floor_metrics(train, missing_streams(windows, val_idx, rate, cfg.batch_size))
        missing[f"{rate:g}"] = {f"{floor}/{name}": value for floor in SHOWN_FLOORS[task]
                                for name, value in metrics[floor].items()}
    return {"missing": missing, "train_windows": len(train_idx)}


def run_dataset_objectives(cfg: DatasetObjectivesConfig, progress: Callable[[str], None] = print
                           ) -> DatasetObjectivesReport:
    """Run (or resume) every job of ``plan(cfg)`` and return the report."""
    check_config(cfg)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    data = ensure_dataset(cfg, progress)
    results = run_ledger([(job.key, job) for job in plan(cfg)], job_settings(cfg),
                         cfg.workdir / "jobs.jsonl", lambda job: run_job(job, cfg, data), progress)
    return DatasetObjectivesReport(cfg, results, describe_machine(versions("torch", torch_build=False)))


def job_settings(cfg: DatasetObjectivesConfig) -> str:
    values = asdict(cfg)
    keys = ["dataset", "windows", "pretrain_epochs", "head_steps", "end_to_end_steps", "batch_size", "lr", "model",
            "aemp_params", "missing_rates"]
    return json.dumps({k: values[k] for k in keys}, sort_keys=True, default=str)


def check_config(cfg: DatasetObjectivesConfig) -> None:
    if cfg.dataset not in DATASETS:
        raise BenchError(f"unknown dataset {cfg.dataset!r}; known: parking, {', '.join(DATASETS)}")
    if cfg.windows < 80:
        raise BenchError("--windows must be >= 80")
    if any(not 0 < r <= 1 for r in cfg.label_ratios) or any(not 0 <= r < 1 for r in cfg.missing_rates):
        raise BenchError("label ratios must be in (0, 1] and missing rates in [0, 1)")


@dataclass
class DatasetObjectivesReport:
    cfg: DatasetObjectivesConfig
    results: dict[str, dict[str, Any]]
    machine: str

    def metric(self, method: str, ratio: float, rate: float, name: str) -> tuple[float, float]:
        """Mean and standard deviation over seeds (``method`` "floors": ``name`` is "softmax/accuracy",
        "knn/median_distance" etc.)."""
        kind = "floors" if method == "floors" else "finetune"
        values = [float(self.results[dataset_job(self.cfg.dataset, kind, method, s, ratio).key]["missing"][f"{rate:g}"]
                        [name]) for s in self.cfg.seeds]
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    def best_floor(self, ratio: float, rate: float = 0.0) -> tuple[str, float]:
        """(floor, headline metric) of the best floor: the highest accuracy, or the lowest median error."""
        task, name = self.cfg.spec.task, self.cfg.spec.metrics[0]
        scores = [(f, self.metric("floors", ratio, rate, f"{f}/{name}")[0]) for f in FLOORS[task]]
        return (max if task == "classify" else min)(scores, key=lambda fv: fv[1])

    def margin(self, method: str, ratio: float, rate: float = 0.0) -> str:
        """A learned row against the best floor: accuracy change in points, or the relative change of
        the median error in % (positive: more error than the floor)."""
        floor, value = self.best_floor(ratio, rate)
        mine = self.metric(method, ratio, rate, self.cfg.spec.metrics[0])[0]
        if self.cfg.spec.task == "classify":
            return f"{(mine - value) * 100:+.1f} pts vs {floor}" + (" (below the floor)" if mine < value else "")
        return f"{(mine / value - 1) * 100:+.0f} % vs {floor}" + (" (below the floor)" if mine > value else "")

    def separation(self) -> str:
        """Whether the task can tell the methods apart: a floor near perfect leaves no room."""
        ratio = min(self.cfg.label_ratios)
        floor, value = self.best_floor(ratio)
        if self.cfg.spec.task == "classify":
            if value >= SEPARATES_BELOW:
                return (f"This task does not separate the methods: the {floor} floor already reaches {value:.3f} "
                        f"accuracy at label ratio {ratio:g} (>= {SEPARATES_BELOW:g}).")
            return (f"This task can separate the methods: the best floor ({floor}) reaches {value:.3f} accuracy at "
                    f"label ratio {ratio:g}, below {SEPARATES_BELOW:g}, so there is room above it.")
        guess = self.metric("floors", ratio, 0.0, f"mean_position/{self.cfg.spec.metrics[0]}")[0]
        return (f"This task can separate the methods: the best floor ({floor}) leaves a median error of {value:.2f} m "
                f"at label ratio {ratio:g} (the mean-position guess: {guess:.2f} m), far from zero.")

    def table(self) -> list[dict[str, Any]]:
        """One row per method, then one per floor: every metric at every (label ratio, missing rate)."""
        rows = []
        cfg = self.cfg
        for method in (*cfg.methods, *SHOWN_FLOORS[cfg.spec.task]):
            floor = method not in cfg.methods
            row: dict[str, Any] = {"method": FLOOR_ROWS[method] if floor else method}
            for ratio in cfg.label_ratios:
                for rate in cfg.missing_rates:
                    for name in cfg.spec.metrics:
                        value = self.metric("floors", ratio, rate, f"{method}/{name}") if floor else \
                            self.metric(method, ratio, rate, name)
                        row[f"{name}@labels{ratio:g}/missing{rate:g}"] = value[0]
            rows.append(row)
        return rows

    def to_markdown(self) -> str:
        cfg, spec = self.cfg, self.cfg.spec
        first, fmt = spec.metrics[0], ("{:.3f}" if spec.task == "classify" else "{:.2f}")
        unit = "" if spec.task == "classify" else " (m, lower is better)"
        lines = [f"# spar-bench objectives --dataset {cfg.dataset}", "", f"machine: {self.machine}", "",
                 f"data: {spec.description}", "", f"budget: {cfg.budget()}; total "
                 f"{sum(r.get('seconds', 0) for r in self.results.values()) / 60:.1f} min of training", ""]
        for ratio in cfg.label_ratios:
            lines += [f"## {first.replace('_', ' ')}{unit}, label ratio {ratio:g}, by share of missing streams", ""]
            head = ["method"] + [f"{rate * 100:g} % missing" for rate in cfg.missing_rates] + \
                   [f"{spec.metrics[1].replace('_', ' ')} @0 %", "vs best floor @0 %"]
            lines += [table_row(head), table_rule(len(head))]
            for method in cfg.methods:
                cells = [method] + [self._cell(method, ratio, rate, first, fmt) for rate in cfg.missing_rates]
                cells += [self._cell(method, ratio, 0.0, spec.metrics[1], fmt), self.margin(method, ratio)]
                lines.append(table_row(cells))
            for floor in SHOWN_FLOORS[spec.task]:
                cells = [FLOOR_ROWS[floor]] + [self._cell("floors", ratio, rate, f"{floor}/{first}", fmt)
                                               for rate in cfg.missing_rates]
                cells += [self._cell("floors", ratio, 0.0, f"{floor}/{spec.metrics[1]}", fmt), ""]
                lines.append(table_row(cells))
            lines.append("")
        margin = ("accuracy points" if spec.task == "classify" else
                  "relative change of the median error, negative is better")
        lines += ["Missing streams: each (node, sensor) token message of a validation window is dropped with the "
                  "given probability (the same drops for every method and floor), as the aggregator would assemble "
                  "a window whose messages did not arrive.", "",
                  "Floors (train.floors, on per-node band energies) are fitted on exactly the labelled windows the "
                  "heads get and see the same missing streams (absent streams are masked out). "
                  f"\"vs best floor\": {margin}, against the best floor of the same label ratio at 0 % missing.", "",
                  self.separation(), "",
                  f"Reproduce: `spar-bench objectives --dataset {cfg.dataset}` (add `--budget standard` for the "
                  "longer budget: 3000 windows, 30 epochs, 3 seeds).", ""]
        return "\n".join(lines)

    def _cell(self, method: str, ratio: float, rate: float, name: str, fmt: str) -> str:
        mean, std = self.metric(method, ratio, rate, name)
        return fmt.format(mean) + (f" ± {fmt.format(std)}" if len(self.cfg.seeds) > 1 else "")

    def plot(self, path: Path) -> None:
        """Headline metric against the share of missing streams, one line per method."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cfg = self.cfg
        name = cfg.spec.metrics[0]
        fig, axes = plt.subplots(1, len(cfg.label_ratios), figsize=(6 * len(cfg.label_ratios), 4), squeeze=False)
        for ax, ratio in zip(axes[0], cfg.label_ratios, strict=True):
            for method in cfg.methods:
                values = [self.metric(method, ratio, rate, name)[0] for rate in cfg.missing_rates]
                ax.plot([r * 100 for r in cfg.missing_rates], values, marker="o", label=method)
            for floor, style in zip(FLOORS[cfg.spec.task], ("--", ":"), strict=False):
                values = [self.metric("floors", ratio, rate, f"{floor}/{name}")[0] for rate in cfg.missing_rates]
                ax.plot([r * 100 for r in cfg.missing_rates], values, color="k", linestyle=style, linewidth=1,
                        label=FLOOR_ROWS[floor])
            ax.set_xlabel("missing streams (%)")
            ax.set_ylabel(name.replace("_", " ") + (" (m)" if cfg.spec.task == "localize" else ""))
            ax.set_title(f"{cfg.dataset}: label ratio {ratio:g}")
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
