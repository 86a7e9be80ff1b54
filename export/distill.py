"""Knowledge distillation: a smaller student of a fine-tuned teacher, trained on unlabelled windows.

The teacher is one ``DeployModel`` built from fine-tuned checkpoints that share one frozen encoder
(``export.deploy_model.deploy_model_from_checkpoints``). The student is a ``SparEncoder`` of a
smaller config (same modalities, node table, position dims and token statistics, so it takes the
very same inputs) with fresh heads of the same tasks. It learns to imitate the teacher on the
training windows of the temporal split; their labels and targets are never read (the batches are
built from tokens, presence and positions only), so any unlabelled recording of the site works.

Loss, per batch:

* feature distillation: MSE between ``projection(student latents)`` and the teacher latents over
  valid tokens only. The projection (student d -> teacher d, ``nn.Linear``) exists only for this
  loss and is discarded afterwards. A student with ``token_merge`` k (k adjacent patches embedded as
  one token: k^2 less attention) is compared with the mean of the k teacher latents it covers
  (``merge_latents``);
* output distillation, per head: classification ``KL(softmax(t / T) || softmax(s / T)) * T^2``;
  localize / quake MSE between the positions in normalised units (both heads predict in the
  ``PositionFrame`` of the window, which both models derive from the same node positions);
  detection MSE on positions plus the KL above on class logits, *query by query*. DETR queries
  are an unordered set, but the student is trained to imitate the teacher's query ``i`` with its
  own query ``i`` from the start, so its queries take on the teacher's roles; a Hungarian matching
  between the two sets is unnecessary for this and is left out (a simplification).

The teacher is frozen and deterministic, so its latents and head outputs are computed once per
window set and cached when they fit in ``TEACHER_CACHE_BYTES``; otherwise they are recomputed for
every batch. The loss and the teacher's targets live in ``export.distill_loss``; this module builds
the models, trains, measures and reports.

``run_distill`` writes ``checkpoint.pt`` (kind ``distilled``, rebuilt by ``load_student``),
``config.json``, ``log.jsonl`` and ``report.md``: size (parameters, fp32 bytes, FLOPs at batch 1
with 8 nodes) and validation metrics of teacher and student, and how closely the student follows
the teacher before and after distillation.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from export.deploy_model import DeployModel, deploy_model_from_checkpoints
from export.distill_loss import (
    TeacherOutputs,
    distill_loss,
    forward_parts,
    soft_kl,
    unlabelled_batch,
    validation_loss,
)
from export.errors import ExportError
from train.checkpoint import load_checkpoint, save_checkpoint
from train.data import WindowSet, drop_nodes, iterate_batches, load_windows, steps_per_epoch, temporal_split
from train.distributed import pick_device
from train.errors import TrainError
from train.finetune import TaskModel, evaluate, task_indices
from train.heads import make_head, make_head_variant
from train.models.config import SparConfig
from train.models.spar import SparEncoder
from train.pretrain import lr_at

CHECKPOINT = "checkpoint.pt"
REPORT = "report.md"
KIND = "distilled"
# Student config fields that may be changed; the rest (modalities, node table, position dims,
# embedding switches) must match the teacher so the student takes exactly the teacher's inputs.
STUDENT_FIELDS = ("dim", "heads", "mlp_ratio", "modality_depth", "joint_depth", "structural_dims", "token_merge")
DEFAULT_STUDENT = {"dim": 32, "heads": 2, "modality_depth": 1, "joint_depth": 1, "mlp_ratio": 2.0}
FLOP_NODES = 8  # FLOPs are reported for one window of this many nodes


@dataclass
class DistillConfig:
    teacher: list[str] = field(default_factory=list)  # fine-tuned checkpoints sharing one encoder
    data: str = ""  # spar-node dataset directory (its labels are never read for training)
    out: str = ""  # run directory: checkpoint.pt, config.json, log.jsonl, report.md
    student: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_STUDENT))  # SparConfig overrides
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3  # peak (AdamW), one epoch of linear warm-up, cosine decay to 0
    weight_decay: float = 1e-4
    feature_weight: float = 1.0  # latent MSE (through the projection)
    output_weight: float = 1.0  # sum over heads of the output losses
    temperature: float = 2.0  # softening of class logits in the KL terms
    # Loss-robust distillation: each batch the student sees every (node, modality) message lost with
    # a probability drawn from U(0, message_loss), as the aggregator assembles a lossy window; the
    # teacher's targets come from the complete window, so the student learns the complete-window
    # answer from a partial one. 0 = the student sees what the teacher sees.
    message_loss: float = 0.0
    seed: int = 0
    val_fraction: float = 0.25  # the last windows (temporal split, as in fine-tuning)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True

    def validate(self) -> None:
        """Raise ExportError for a setting that cannot work (files are checked by ``run_distill``)."""
        if isinstance(self.teacher, str | Path):
            self.teacher = [str(self.teacher)]
        if not self.teacher or not all(isinstance(p, str | Path) and str(p) for p in self.teacher):
            raise ExportError("teacher: give at least one fine-tuned checkpoint (a list of paths)")
        if len({str(p) for p in self.teacher}) != len(self.teacher):
            raise ExportError(f"teacher: a checkpoint is listed twice: {', '.join(map(str, self.teacher))}")
        for name in ("data", "out"):
            if not getattr(self, name):
                raise ExportError(f"{name} is required")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ExportError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ExportError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "feature_weight", "output_weight"):
            if not getattr(self, name) >= 0:
                raise ExportError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.feature_weight == 0 and self.output_weight == 0:
            raise ExportError("feature_weight and output_weight are both 0: nothing to distil")
        if not 0.0 <= self.message_loss < 1.0:
            raise ExportError(f"message_loss must be in [0, 1), got {self.message_loss}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ExportError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not isinstance(self.student, dict):
            raise ExportError(f"student must be a table of model settings, got {self.student!r}")
        unknown = sorted(set(self.student) - set(STUDENT_FIELDS))
        if unknown:
            raise ExportError(f"student: unknown or fixed setting(s) {', '.join(unknown)}; a student may change "
                              f"{', '.join(STUDENT_FIELDS)} (the rest follows the teacher)")
        for name, value in self.student.items():
            if name == "mlp_ratio":
                if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                    raise ExportError(f"student.mlp_ratio must be a number > 0, got {value!r}")
                continue
            least = 0 if name.endswith("_depth") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ExportError(f"student.{name} must be an integer >= {least}, got {value!r}")
        if self.student.get("modality_depth", 1) + self.student.get("joint_depth", 1) < 1:
            raise ExportError("student: modality_depth + joint_depth must be >= 1")
        dim, heads = self.student.get("dim"), self.student.get("heads")
        if dim is not None and heads is not None and dim % heads:
            raise ExportError(f"student.dim ({dim}) must be divisible by student.heads ({heads})")
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise ExportError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")


@dataclass
class DistillResult:
    checkpoint: Path
    report: Path
    teacher_metrics: dict[str, dict[str, float]]  # task -> validation metrics
    student_metrics: dict[str, dict[str, float]]
    discrepancy_before: dict[str, float]  # student vs teacher on validation windows, untrained student
    discrepancy_after: dict[str, float]  # ... and distilled student
    teacher_size: dict[str, int]  # parameters, fp32_bytes, flops
    student_size: dict[str, int]
    train_loss: float  # mean distillation loss of the last epoch
    val_loss_before: float  # distillation loss on the validation windows, untrained student
    val_loss: float  # ... and distilled student
    train_windows: int
    val_windows: int
    epochs: int
    steps: int
    teacher_cached: bool
    seconds: float


# --------------------------------------------------------------------------- models
def load_teacher(paths: list[str]) -> tuple[DeployModel, list[dict[str, Any]]]:
    """The frozen teacher (eval mode, no gradients) and its checkpoints; ExportError when they do not
    load or do not share one encoder."""
    try:
        teacher, ckpts = deploy_model_from_checkpoints([str(p) for p in paths])
    except TrainError as exc:
        raise ExportError(f"teacher: {exc}") from None
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, ckpts


def student_config(teacher_cfg: SparConfig, overrides: dict[str, Any]) -> SparConfig:
    """The teacher's encoder config with the student's size settings applied."""
    unknown = sorted(set(overrides) - set(STUDENT_FIELDS))
    if unknown:
        raise ExportError(f"student: unknown or fixed setting(s) {', '.join(unknown)}")
    try:
        return replace(teacher_cfg, objective=KIND, **overrides)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"bad student setting: {exc}") from None


def head_settings(teacher: DeployModel) -> dict[str, dict[str, Any]]:
    """Constructor settings the student's heads copy from the teacher's: a head variant and its data
    kwargs (fusion layout, legal grid), the detector's query count."""
    out: dict[str, dict[str, Any]] = {}
    for task, head in teacher.heads.items():
        if getattr(head, "variant", ""):
            out[task] = {"variant": head.variant, **head.variant_kwargs}
        else:
            out[task] = {"n_queries": int(head.n_queries)} if task == "detect" else {}
    return out


def build_student(cfg: SparConfig, tasks: list[str], n_classes: int, out_dims: int,
                  head_kwargs: dict[str, dict[str, Any]]) -> DeployModel:
    """A fresh student DeployModel (weights from the current torch seed)."""
    try:
        encoder = SparEncoder(cfg)
        heads = {task: _student_head(task, cfg.dim, n_classes, out_dims, dict(head_kwargs.get(task, {})))
                 for task in tasks}
    except ValueError as exc:
        raise ExportError(f"cannot build the student (dim {cfg.dim}): {exc}") from None
    return DeployModel(encoder, heads, n_classes, out_dims)


def _student_head(task: str, d: int, n_classes: int, out_dims: int, kwargs: dict[str, Any]):
    variant = kwargs.pop("variant", "")
    head = (make_head_variant(variant, d, n_classes, out_dims, **kwargs) if variant
            else make_head(task, d, n_classes, out_dims, **kwargs))
    if variant:
        head.variant, head.variant_kwargs = variant, kwargs
    return head


def student_from_teacher(teacher: DeployModel, overrides: dict[str, Any], n_classes: int, out_dims: int,
                         seed: int = 0) -> DeployModel:
    """An untrained student of ``teacher``: smaller encoder, same inputs and token statistics, same tasks."""
    torch.manual_seed(seed)
    cfg, heads = student_config(teacher.encoder.cfg, overrides), head_settings(teacher)
    laid_out = [task for task, kwargs in heads.items() if "layout" in kwargs]
    if cfg.token_merge > 1 and laid_out:
        raise ExportError(f"token_merge {cfg.token_merge}: the {', '.join(laid_out)} head reads the teacher's "
                          "token grid; distil it with token_merge 1")
    student = build_student(cfg, list(teacher.heads), n_classes, out_dims, heads)
    with torch.no_grad():
        for name, emb in student.encoder.embeddings.items():
            emb.token_mean.copy_(teacher.encoder.embeddings[name].token_mean)
            emb.token_std.copy_(teacher.encoder.embeddings[name].token_std)
    return student


def load_student(path: str | Path) -> tuple[DeployModel, dict[str, Any]]:
    """Rebuild a distilled student (eval mode) from its checkpoint alone."""
    try:
        ckpt = load_checkpoint(path, kind=KIND)
    except TrainError as exc:
        raise ExportError(str(exc)) from None
    extra = ckpt["extra"]
    model = build_student(SparConfig.from_dict(extra["encoder_config"]), list(extra["tasks"]), extra["n_classes"],
                          extra["out_dims"], extra.get("head_kwargs", {}))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


# --------------------------------------------------------------------------- measures
@torch.no_grad()
def discrepancy(teacher: DeployModel, student: DeployModel, windows: WindowSet, indices: np.ndarray,
                batch_size: int = 32, device: torch.device | str = "cpu") -> dict[str, float]:
    """How closely ``student`` follows ``teacher`` on ``indices`` (no labels read), per graph output:
    ``<output>_agreement`` (share of equal arg-max classes; per query for detection) and
    ``<output>_kl`` (temperature 1) for logits; ``<output>_rmse`` (metres) for positions."""
    if [s.name for s in teacher.outputs] != [s.name for s in student.outputs]:
        raise ExportError("teacher and student have different outputs")
    teacher.eval()
    student.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(key: str, value: torch.Tensor, n: int) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)
        counts[key] = counts.get(key, 0) + n

    for index in iterate_batches(indices, batch_size, shuffle=False, seed=0, epoch=0, drop_last=False):
        inputs = teacher.inputs_from_batch(unlabelled_batch(windows, index).to(device))
        for spec, t, s in zip(teacher.outputs, teacher(*inputs), student(*inputs), strict=True):
            if spec.kind == "class_logits" or spec.key == "logits":
                rows = t.reshape(-1, t.shape[-1]).float(), s.reshape(-1, s.shape[-1]).float()
                add(f"{spec.name}_agreement", (rows[0].argmax(-1) == rows[1].argmax(-1)).sum(), rows[0].shape[0])
                add(f"{spec.name}_kl", soft_kl(rows[1], rows[0], 1.0) * rows[0].shape[0], rows[0].shape[0])
            else:
                sq = ((t.float() - s.float()) ** 2).sum(-1).reshape(-1)
                add(f"{spec.name}_rmse", sq.sum(), sq.numel())
    out = {k: sums[k] / max(1, counts[k]) for k in sums}
    return {k: (v ** 0.5 if k.endswith("_rmse") else v) for k, v in out.items()}


def example_inputs(model: DeployModel, nodes: int = FLOP_NODES, batch: int = 1) -> tuple[torch.Tensor, ...]:
    """Fixed dB-like inputs of ``batch`` windows with ``nodes`` present nodes on a ring."""
    g = torch.Generator().manual_seed(0)
    cfg = model.encoder.cfg
    flat: list[torch.Tensor] = []
    for s in cfg.modalities:
        flat += [torch.randn(batch, nodes, s.n_tokens, s.token_dim, generator=g) * 10 - 60,
                 torch.ones(batch, nodes, dtype=torch.bool)]
    angle = torch.arange(nodes, dtype=torch.float32) * (2 * np.pi / nodes)
    ring = torch.stack([torch.cos(angle), torch.sin(angle)] + [torch.zeros(nodes)] * (cfg.position_dims - 2), -1)
    flat.append((ring[:, : cfg.position_dims] * 20.0).expand(batch, -1, -1).contiguous())
    flat.append(model.example_structure(batch, nodes, g))
    return tuple(flat)


def model_size(model: DeployModel, nodes: int = FLOP_NODES) -> dict[str, int]:
    """parameters, fp32_bytes (every float tensor of the state dict at 4 bytes) and flops of one
    forward pass at batch 1 with ``nodes`` nodes (torch's FlopCounterMode: matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    floats = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    device = next(model.parameters()).device
    inputs = tuple(t.to(device) for t in example_inputs(model, nodes))
    was_training, grads = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)  # FlopCounterMode's module tracker trips over no_grad views of parameters
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(g)
    return {"parameters": int(params), "fp32_bytes": int(floats * 4), "flops": int(counter.get_total_flops())}


def task_metrics(model: DeployModel, windows: WindowSet, indices: np.ndarray, batch_size: int,
                 device: torch.device) -> dict[str, dict[str, float]]:
    """Validation metrics of every head (``train.finetune.evaluate`` through a TaskModel per head)."""
    out = {}
    for task, head in model.heads.items():
        usable = task_indices(windows, task, indices)
        if len(usable) == 0:
            out[task] = {}
            continue
        out[task] = evaluate(TaskModel(model.encoder, head, task), windows, usable, batch_size, device)
    return out


# --------------------------------------------------------------------------- run
def run_distill(cfg: DistillConfig) -> DistillResult:
    """Distil the teacher checkpoints into a student; writes checkpoint.pt, config.json, log.jsonl and
    report.md under ``cfg.out``."""
    started = time.monotonic()
    cfg.validate()
    try:
        device = pick_device(cfg.device)
    except TrainError as exc:
        raise ExportError(str(exc)) from None
    out = Path(cfg.out)
    teacher, ckpts = load_teacher(cfg.teacher)
    extra = ckpts[0]["extra"]
    n_classes, out_dims = int(extra["n_classes"]), int(extra["out_dims"])
    try:
        windows = load_windows(cfg.data, progress=cfg.progress)
    except TrainError as exc:
        raise ExportError(f"data: {exc}") from None
    _check_data(windows, ckpts[0], n_classes, out_dims)
    train_idx, val_idx = temporal_split(len(windows), cfg.val_fraction)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ExportError(f"{cfg.data}: too few windows to distil ({len(windows)})")

    teacher.to(device)
    student = student_from_teacher(teacher, cfg.student, n_classes, out_dims, cfg.seed).to(device)
    projection = nn.Linear(student.encoder.cfg.dim, teacher.encoder.cfg.dim).to(device)
    tasks = list(teacher.heads)
    merge = student.encoder.cfg.token_merge
    train_targets = TeacherOutputs(teacher, windows, train_idx, cfg.batch_size, device, cfg.progress, merge)
    val_targets = TeacherOutputs(teacher, windows, val_idx, cfg.batch_size, device, merge=merge)
    before = discrepancy(teacher, student, windows, val_idx, cfg.batch_size, device)
    val_before = validation_loss(student, projection, val_targets, val_idx, cfg, device)

    per_epoch = steps_per_epoch(len(train_idx), cfg.batch_size, drop_last=False)
    total = cfg.epochs * per_epoch
    params = list(student.parameters()) + list(projection.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    out.mkdir(parents=True, exist_ok=True)
    step, train_loss = 0, float("nan")
    losses = torch.Generator().manual_seed(cfg.seed + 1)  # its own stream: message_loss 0 changes nothing
    bar = tqdm(range(cfg.epochs), desc="distil", unit="epoch", disable=not cfg.progress)
    with open(out / "log.jsonl", "w") as log:
        for epoch in bar:
            student.train()
            sums: dict[str, float] = {}
            for index in iterate_batches(train_idx, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                                         drop_last=False):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, per_epoch, cfg.lr)
                batch = unlabelled_batch(windows, index)
                if cfg.message_loss > 0:
                    rate = float(torch.rand((), generator=losses)) * cfg.message_loss
                    batch = drop_nodes(batch, rate, losses, per_modality=True)
                parts = forward_parts(student, batch.to(device))
                loss, pieces = distill_loss(parts, train_targets.get(index), projection, tasks, cfg)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                for key, value in {"loss": loss, **pieces}.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach()) * len(index)
            means = {k: v / len(train_idx) for k, v in sums.items()}
            train_loss = means["loss"]
            bar.set_postfix(loss=f"{train_loss:.4f}")
            log.write(json.dumps({"epoch": epoch + 1, "step": step, **means}) + "\n")
            log.flush()

    val_loss = validation_loss(student, projection, val_targets, val_idx, cfg, device)
    after = discrepancy(teacher, student, windows, val_idx, cfg.batch_size, device)
    teacher_metrics = task_metrics(teacher, windows, val_idx, cfg.batch_size, device)
    student_metrics = task_metrics(student, windows, val_idx, cfg.batch_size, device)
    teacher_size, student_size = model_size(teacher), model_size(student)
    student.eval()
    metrics = {"teacher": teacher_metrics, "student": student_metrics, "discrepancy_before": before,
               "discrepancy": after, "train_loss": train_loss, "val_loss_before": val_before, "val_loss": val_loss,
               "teacher_size": teacher_size, "student_size": student_size}
    data = dict(ckpts[0]["data"])
    data.update(distilled_on=str(cfg.data), distill_train_windows=len(train_idx), distill_val_windows=len(val_idx))
    run_config = asdict(cfg)
    run_config["teacher"] = [str(p) for p in cfg.teacher]
    checkpoint = save_checkpoint(
        out / CHECKPOINT, kind=KIND, model_config=student.encoder.cfg.to_dict(), model=student.cpu(),
        run_config=run_config, data_info=data, step=step, epoch=cfg.epochs, metrics=metrics,
        extra={"encoder_config": student.encoder.cfg.to_dict(), "tasks": tasks, "n_classes": n_classes,
               "out_dims": out_dims, "head_kwargs": head_settings(teacher),
               "teacher_checkpoints": [c["path"] for c in ckpts],
               "teacher_encoder_config": teacher.encoder.cfg.to_dict()})
    result = DistillResult(checkpoint, out / REPORT, teacher_metrics, student_metrics, before, after, teacher_size,
                           student_size, train_loss, val_before, val_loss, len(train_idx), len(val_idx), cfg.epochs,
                           step, train_targets.cache is not None, time.monotonic() - started)
    (out / REPORT).write_text(report_markdown(cfg, result, teacher, student.encoder.cfg, ckpts))
    return result


def _check_data(windows: WindowSet, ckpt: dict[str, Any], n_classes: int, out_dims: int) -> None:
    theirs, ours = ckpt["data"].get("feature_hashes", {}), dict(windows.feature_hashes)
    if theirs != ours:
        raise ExportError(f"the teacher was trained on feature configs {theirs}, this dataset has {ours}; "
                          "tokens would not mean the same thing")
    if windows.n_nodes > SparConfig.from_dict(ckpt["extra"]["encoder_config"]).max_nodes:
        raise ExportError(f"the dataset has {windows.n_nodes} nodes, more than the teacher's node table")
    if len(windows.class_names) != n_classes or windows.target_dims != out_dims:
        raise ExportError(f"the dataset has {len(windows.class_names)} classes and {windows.target_dims}-D "
                          f"targets, the teacher {n_classes} and {out_dims}-D")


# --------------------------------------------------------------------------- report
def _fmt(value: float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def report_markdown(cfg: DistillConfig, r: DistillResult, teacher: DeployModel, student_cfg: SparConfig,
                    ckpts: list[dict[str, Any]]) -> str:
    t_cfg = teacher.encoder.cfg

    def shape(c: SparConfig) -> str:
        merge = f", {c.token_merge} patches per token" if c.token_merge > 1 else ""
        return (f"dim {c.dim}, heads {c.heads}, modality depth {c.modality_depth}, joint depth {c.joint_depth}, "
                f"mlp ratio {c.mlp_ratio:g}{merge}")

    lines = ["# Distillation report", "",
             f"- teacher: {', '.join('`' + str(c['path']) + '`' for c in ckpts)} ({shape(t_cfg)})",
             f"- student: {shape(student_cfg)}; tasks {', '.join(teacher.heads)}",
             f"- data: `{cfg.data}`: {r.train_windows} training windows (labels not read), {r.val_windows} "
             f"validation windows (last {cfg.val_fraction:g} of the temporal split)",
             f"- {r.epochs} epochs, {r.steps} steps, batch {cfg.batch_size}, lr {cfg.lr:g}, temperature "
             f"{cfg.temperature:g}, feature weight {cfg.feature_weight:g}, output weight {cfg.output_weight:g}, "
             f"seed {cfg.seed}; teacher outputs {'cached' if r.teacher_cached else 'recomputed per batch'}; "
             f"{r.seconds:.1f} s",
             *([f"- loss-robust: the student saw each token message lost with probability U(0, "
                f"{cfg.message_loss:g}) per batch; the teacher saw complete windows"] if cfg.message_loss else []),
             "", "## Size", "",
             f"| model | parameters | fp32 weights (bytes) | FLOPs (batch 1, {FLOP_NODES} nodes) |",
             "|---|---|---|---|"]
    for name, size in (("teacher", r.teacher_size), ("student", r.student_size)):
        lines.append(f"| {name} | {size['parameters']:,} | {size['fp32_bytes']:,} | {size['flops']:,} |")
    ratio = {k: r.student_size[k] / max(1, r.teacher_size[k]) for k in r.teacher_size}
    lines.append(f"| student / teacher | {ratio['parameters']:.3f} | {ratio['fp32_bytes']:.3f} | "
                 f"{ratio['flops']:.3f} |")
    lines += ["", "## Task metrics (validation windows)", "", "| task | metric | teacher | student |",
              "|---|---|---|---|"]
    for task, values in r.teacher_metrics.items():
        for key, value in values.items():
            lines.append(f"| {task} | {key} | {_fmt(value)} | {_fmt(r.student_metrics[task].get(key, float('nan')))} |")
    lines += ["", "## Student vs teacher (validation windows, no labels)", "",
              "| measure | untrained student | distilled student |", "|---|---|---|",
              f"| distillation loss | {_fmt(r.val_loss_before)} | {_fmt(r.val_loss)} |"]
    for key, value in r.discrepancy_before.items():
        lines.append(f"| {key} | {_fmt(value)} | {_fmt(r.discrepancy_after[key])} |")
    lines += ["", f"Last epoch's training loss: {_fmt(r.train_loss)}.", "",
              "Agreement: share of equal arg-max classes (per query for detection); rmse in metres; kl at "
              "temperature 1. Detection queries are distilled query by query (student query i imitates "
              "teacher query i), without a matching between the two sets.", ""]
    return "\n".join(lines)
