"""Scoring any runner of a DeployModel graph on real windows: task metrics and parity against torch FP32.

A *runner* maps the named numpy inputs of the graph (``tokens_{m}``, ``present_{m}``, ``positions``,
``node_index``; see ``spar_wire.model_manifest``) to the outputs in ``DeployModel.output_names``
order, so torch eager, ONNX Runtime FP32 and ONNX Runtime INT8 are scored by the same code:

    metrics = evaluate_runner(model, onnx_runner("model.int8.onnx"), windows, val_idx)
    report = parity_report(model, onnx_runner("model.int8.onnx"), windows, val_idx)

Graph outputs are turned into the formats of the heads' ``predict()`` (class ids and softmax
probabilities, positions in metres, detection scores / classes / positions) and scored with
``train.metrics.summarize`` against the windows' truth, exactly as fine-tuning evaluates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from export.deploy_model import DeployModel
from export.errors import ExportError
from export.onnx_export import ParityReport
from spar_wire.model_manifest import NODE_INDEX_INPUT, NODE_TEXT_INPUT, POSITIONS_INPUT
from train.data import WindowSet
from train.metrics import summarize

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
Indices = Sequence[int] | np.ndarray
# The one metric per task that a quantized model must not lose, and whether higher is better.
PRIMARY_METRICS = {"classify": ("accuracy", True), "localize": ("mean_distance", False),
                   "quake": ("hypocentre_mean", False), "detect": ("mAP@8", True)}


# --------------------------------------------------------------------------- inputs
def window_inputs(windows: WindowSet, indices: Indices, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The graph inputs ``names`` for windows ``indices``, as ``WindowSet.batch`` assembles them
    (tokens float32, presence bool, positions float32 metres, node_index int64 0..N-1), in numpy."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == POSITIONS_INPUT:
            out[name] = np.ascontiguousarray(windows.positions[idx], dtype=np.float32)
        elif name == NODE_INDEX_INPUT:
            out[name] = np.tile(np.arange(windows.n_nodes, dtype=np.int64), (len(idx), 1))
        elif name == NODE_TEXT_INPUT and windows.node_text is not None:
            out[name] = np.ascontiguousarray(np.broadcast_to(windows.node_text, (len(idx), *windows.node_text.shape)),
                                             dtype=np.float32)
        elif name.startswith("tokens_") and name[len("tokens_"):] in windows.tokens:
            out[name] = np.ascontiguousarray(windows.tokens[name[len("tokens_"):]][idx], dtype=np.float32)
        elif name.startswith("present_") and name[len("present_"):] in windows.present:
            out[name] = np.ascontiguousarray(windows.present[name[len("present_"):]][idx], dtype=np.bool_)
        else:
            raise ExportError(f"the model needs input {name!r}, which the dataset cannot provide (its modalities: "
                              f"{', '.join(windows.modalities)})")
    return out


def check_windows(model: DeployModel, windows: WindowSet) -> None:
    """ExportError unless ``windows`` have the modalities and token shapes ``model`` was built for."""
    problems = []
    shapes = windows.token_shapes
    for spec in model.encoder.cfg.modalities:
        if spec.name not in shapes:
            problems.append(f"modality {spec.name} is missing")
        elif shapes[spec.name] != (spec.n_tokens, spec.token_dim):
            problems.append(f"{spec.name} tokens are {shapes[spec.name]}, the model takes "
                            f"{(spec.n_tokens, spec.token_dim)}")
    if windows.position_dims != model.encoder.cfg.position_dims:
        problems.append(f"positions are {windows.position_dims}-D, the model takes "
                        f"{model.encoder.cfg.position_dims}-D")
    if problems:
        raise ExportError("the dataset does not fit the model: " + "; ".join(problems))


# --------------------------------------------------------------------------- runners
def torch_runner(model: DeployModel) -> Runner:
    """Torch eager FP32 (the reference)."""
    model = model.eval()

    def tensor(array: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(array)
        return torch.from_numpy(array if array.flags.writeable else array.copy())

    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            outputs = model(*(tensor(inputs[n]) for n in model.input_names))
        return [o.numpy() for o in outputs]

    return run


def onnx_runner(path: str | Path, threads: int | None = None, output_names: Sequence[str] | None = None) -> Runner:
    """ONNX Runtime on CPU (FP32 or INT8 graph); ``threads`` intra-op threads (ORT's default when None).
    Outputs come in the graph's order, or in ``output_names`` order when given."""
    from export.onnx_export import onnx_session

    session = onnx_session(path, threads)
    names = list(output_names) if output_names is not None else None
    feeds = [i.name for i in session.get_inputs()]

    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(names, {n: inputs[n] for n in feeds})

    run.session = session  # type: ignore[attr-defined]  # for callers that want to inspect it
    return run


# --------------------------------------------------------------------------- outputs -> predictions
def predictions_from_outputs(model: DeployModel, outputs: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """task -> the head's ``predict()`` dict, from named graph outputs (numpy, metres already)."""
    by_task: dict[str, dict[str, np.ndarray]] = {}
    for spec in model.outputs:
        by_task.setdefault(spec.task, {})[spec.key] = np.asarray(outputs[spec.name])
    predictions = {}
    for task, raw in by_task.items():
        if task == "classify":
            probs = _softmax(raw["logits"])
            predictions[task] = {"label": probs.argmax(-1).astype(np.int64), "probs": probs.astype(np.float32)}
        elif task in ("localize", "quake"):
            predictions[task] = {"position": raw["position"].astype(np.float32)}
        elif task == "detect":
            probs = _softmax(raw["logits"])[..., :-1]  # drop "no object"
            predictions[task] = {"scores": probs.max(-1), "classes": probs.argmax(-1).astype(np.int64),
                                 "positions": raw["positions"].astype(np.float32)}
        else:
            raise ExportError(f"no prediction format for task {task!r}")
    return predictions


def _softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- evaluation
def collect_outputs(model: DeployModel, run: Runner, windows: WindowSet, indices: Indices,
                    batch_size: int = 32) -> dict[str, np.ndarray]:
    """Output name -> outputs of ``run`` over ``indices`` (concatenated in index order)."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    if idx.size == 0:
        raise ExportError("no windows to evaluate on")
    if batch_size < 1:
        raise ExportError(f"batch_size must be >= 1, got {batch_size}")
    parts: dict[str, list[np.ndarray]] = {n: [] for n in model.output_names}
    for start in range(0, idx.size, batch_size):
        outputs = run(window_inputs(windows, idx[start:start + batch_size], model.input_names))
        if len(outputs) != len(model.output_names):
            raise ExportError(f"the runner returned {len(outputs)} outputs, the model has "
                              f"{len(model.output_names)} ({', '.join(model.output_names)})")
        for name, value in zip(model.output_names, outputs, strict=True):
            parts[name].append(np.asarray(value))
    return {name: np.concatenate(values) for name, values in parts.items()}


def score_outputs(model: DeployModel, outputs: Mapping[str, np.ndarray], windows: WindowSet,
                  indices: Indices) -> dict[str, dict[str, float]]:
    """task -> ``train.metrics.summarize`` of the outputs against the truth of windows ``indices``."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    truth = {"label": windows.label[idx], "target_class": windows.target_class[idx],
             "target_position": windows.target_position[idx]}
    return {task: summarize(task, pred, truth) for task, pred in predictions_from_outputs(model, outputs).items()}


def evaluate_runner(model: DeployModel, run: Runner, windows: WindowSet, indices: Indices,
                    batch_size: int = 32) -> dict[str, dict[str, float]]:
    """task -> metrics of ``run`` (outputs in ``model.output_names`` order) on windows ``indices``."""
    check_windows(model, windows)
    return score_outputs(model, collect_outputs(model, run, windows, indices, batch_size), windows, indices)


def flatten_metrics(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{"classify": {"accuracy": .9}} -> {"classify/accuracy": .9}."""
    return {f"{task}/{name}": float(value) for task, values in metrics.items() for name, value in values.items()}


def agreement(model: DeployModel, reference: Mapping[str, np.ndarray],
              candidate: Mapping[str, np.ndarray]) -> dict[str, float]:
    """How far a candidate's decisions move from the reference's, per output:
    class_logits -> ``{name}/label_agreement`` (fraction of equal argmax); regression ->
    ``{name}/mean_shift`` and ``{name}/max_shift`` (Euclidean, metres); every output ->
    ``{name}/rel_rms`` (RMS of the difference over the RMS spread of the reference)."""
    out = {}
    for spec in model.outputs:
        ref = np.asarray(reference[spec.name], np.float64)
        got = np.asarray(candidate[spec.name], np.float64)
        if spec.kind == "class_logits":
            out[f"{spec.name}/label_agreement"] = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
        elif spec.kind == "regression":
            shift = np.linalg.norm(got - ref, axis=-1)
            out[f"{spec.name}/mean_shift"] = float(shift.mean())
            out[f"{spec.name}/max_shift"] = float(shift.max())
        spread = float(np.sqrt(np.mean((ref - ref.mean(axis=0)) ** 2)))
        out[f"{spec.name}/rel_rms"] = float(np.sqrt(np.mean((got - ref) ** 2))) / max(spread, 1e-12)
    return out


def parity_report(model: DeployModel, candidate_run: Runner, windows: WindowSet, indices: Indices, *,
                  reference_run: Runner | None = None, batch_size: int = 32) -> ParityReport:
    """torch FP32 (or ``reference_run``) vs ``candidate_run`` on windows ``indices``: the largest
    absolute difference per output and both sides' task metrics ("task/metric" keys)."""
    check_windows(model, windows)
    reference = collect_outputs(model, reference_run or torch_runner(model), windows, indices, batch_size)
    candidate = collect_outputs(model, candidate_run, windows, indices, batch_size)
    return parity_from_outputs(model, reference, candidate, windows, indices)


def parity_from_outputs(model: DeployModel, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                        windows: WindowSet, indices: Indices) -> ParityReport:
    """``parity_report`` from outputs already collected (``collect_outputs``)."""
    errors = {}
    for name in model.output_names:
        if reference[name].shape != candidate[name].shape:
            raise ExportError(f"output {name}: reference shape {reference[name].shape}, candidate "
                              f"{candidate[name].shape}")
        errors[name] = float(np.abs(np.asarray(candidate[name], np.float64) - reference[name]).max())
    return ParityReport(windows=int(np.asarray(indices).size), max_abs_error=errors,
                        metrics_reference=flatten_metrics(score_outputs(model, reference, windows, indices)),
                        metrics_candidate=flatten_metrics(score_outputs(model, candidate, windows, indices)))
