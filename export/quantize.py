"""Static INT8 (QDQ) quantization of the FP32 ONNX graph, calibrated on real windows, with its parity report.

Choices (see DESIGN.md, "Deployment path"):

* QDQ format, signed INT8 activations and weights (S8S8), symmetric activation ranges, per-channel
  weights: what TensorRT's explicit quantization consumes, and a format ONNX Runtime's CPU kernels
  fuse. (ONNX Runtime 1.32's own docstring suggests U8 activations with ``reduce_range`` on x86
  without VNNI; S8S8 keeps one artifact for both back ends.)
* Only ``MatMul`` / ``Gemm`` with a weight are quantized, and only on their inputs. Residual
  ``Add``, ``LayerNormalization`` and ``Softmax`` stay float (quantizing residual adds and
  normalisations is what wrecks transformer accuracy), and so do the activation x activation
  MatMuls of attention (``matmul_const_b_only``; ONNX Runtime ignores its own ``MatMulConstBOnly``
  in QDQ mode, so they are excluded by name).
* The last layer of every position output (walking back from the output to the first MatMul/Gemm)
  stays float: positions come out in metres, where one INT8 step of a wide-range readout is a
  visible error.
* Calibration data are real windows of the target dataset (``WindowCalibrationReader``). The
  method (MinMax, Percentile, Entropy) is picked by measurement (``choose_calibration``); the
  ranges are computed here rather than by ``quantize_static``, which cannot set histogram bins
  and whose Entropy default (128 bins -> 128) degenerates to MinMax.
* ``Shape`` nodes are moved off DequantizeLinear outputs after quantization (``detach_shape_reads``):
  left there they keep ONNX Runtime from fusing the MatMul into an integer kernel.

Measured on the tiny model of tests/export (d = 16, 12 held-out parking-lot windows, 1 thread;
relative RMS output error vs torch FP32 / batch-8 latency): defaults 0.0088 / 31.5 ms; Q/DQ on
MatMul outputs too 0.0151 / 32.1 ms; attention MatMuls quantized 0.0089 / 37.3 ms; both (what
``quantize_static`` does by default) 0.0152 / 42.1 ms; regression readouts quantized: position mean
shift 0.17 m instead of 0.14 m and detection-position error 0.29 m instead of 0.22 m (the largest
position shift was not better: 0.30 vs 0.39 m); per-tensor weights 0.0100; ``quant_pre_process``
changed nothing (kept: it is cheap and ONNX Runtime asks for it); FP32 32.3 ms, dynamic INT8
0.0074 / 30.4 ms. At d = 16 the float attention dominates the time, so INT8 barely speeds it up.

``quantize`` does all of it and writes ``<out>`` (INT8 ONNX), its manifest (derived from the FP32
one) and ``parity-int8.md`` beside it.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from export.deploy_model import DeployModel
from export.errors import ExportError
from export.manifests import derive_manifest, manifest_path_for
from export.onnx_export import ParityReport
from export.parity import (
    PRIMARY_METRICS,
    Indices,
    agreement,
    check_windows,
    collect_outputs,
    onnx_runner,
    parity_from_outputs,
    torch_runner,
    window_inputs,
)
from spar_wire.errors import WireError
from spar_wire.model_manifest import ModelManifest, load_manifest
from train.data import WindowSet

METHODS = ("minmax", "percentile", "entropy")
DEFAULT_OP_TYPES = ("MatMul", "Gemm")
# Outputs in metres (besides any output a manifest marks "regression").
POSITION_OUTPUTS = ("position", "hypocentre", "detection_positions")
REPORT_NAME = "parity-int8.md"
# Primary-metric losses up to this (1 accuracy / mAP point, or 1 % of a mean distance) rank as ties.
TASK_LOSS_TOLERANCE = 0.01
_LINEAR_OPS = ("MatMul", "Gemm")
_INTEGER_LINEAR_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm")


# --------------------------------------------------------------------------- input checks
def load_onnx(path: str | Path):
    """The ONNX model at ``path``; ExportError for a missing file or one that is not ONNX."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ExportError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node or not model.graph.output:
        raise ExportError(f"{path}: not an ONNX model (no graph)")
    return model


def fp32_manifest(fp32_path: str | Path, required: bool = True) -> ModelManifest | None:
    """The manifest beside the FP32 artifact (``manifest_path_for``); ExportError when required and absent."""
    path = manifest_path_for(Path(fp32_path))
    if not path.is_file():
        if required:
            raise ExportError(f"{fp32_path}: no manifest beside it ({path}); export the FP32 model with its "
                              "manifest first")
        return None
    try:
        return load_manifest(path)
    except WireError as exc:
        raise ExportError(f"{path}: {exc.detail}") from None


def check_dataset(manifest: ModelManifest, windows: WindowSet) -> None:
    """ExportError unless ``windows`` were made with the feature configs the model was trained on."""
    problems = []
    hashes, shapes = windows.feature_hashes, windows.token_shapes
    for name, need in manifest.modalities.items():
        if name not in hashes:
            problems.append(f"modality {name} is missing (the dataset has {', '.join(sorted(hashes)) or 'none'})")
        elif hashes[name] != need.feature_hash:
            problems.append(f"{name} feature hash is {hashes[name]}, the model was trained on {need.feature_hash}")
        elif shapes[name] != (need.n_tokens, need.token_dim):
            problems.append(f"{name} tokens are {shapes[name]}, the model takes {(need.n_tokens, need.token_dim)}")
    if problems:
        raise ExportError(f"the calibration dataset does not match {manifest.source}: " + "; ".join(problems))


def _check_indices(indices: Indices, n: int, what: str) -> np.ndarray:
    idx = np.asarray(indices, np.int64).reshape(-1)
    if idx.size == 0:
        raise ExportError(f"no {what} windows given")
    if idx.min() < 0 or idx.max() >= n:
        raise ExportError(f"{what} window index out of range for {n} windows: {idx.min()}..{idx.max()}")
    return idx


# --------------------------------------------------------------------------- calibration data
class WindowCalibrationReader(CalibrationDataReader):
    """Real windows as calibration batches: each ``get_next()`` is one dict of named numpy inputs
    (tokens float32, presence bool, positions float32, node_index int64; the bool and int64 inputs
    only feed float ops and pass through unquantized). ``None`` after the last batch; ``rewind()``
    starts over (calibration may read the data more than once)."""

    def __init__(self, windows: WindowSet, indices: Indices, input_names: Sequence[str], batch_size: int = 1):
        if batch_size < 1:
            raise ExportError(f"calibration batch_size must be >= 1, got {batch_size}")
        self.windows, self.input_names, self.batch_size = windows, tuple(input_names), batch_size
        self.indices = _check_indices(indices, len(windows), "calibration")
        window_inputs(windows, self.indices[:1], self.input_names)  # fail now, not inside ORT
        self._next = 0

    def __len__(self) -> int:
        return -(-self.indices.size // self.batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self.indices.size:
            return None
        chunk = self.indices[self._next:self._next + self.batch_size]
        self._next += self.batch_size
        return window_inputs(self.windows, chunk, self.input_names)

    def rewind(self) -> None:
        self._next = 0


def calibration_indices(train_idx: np.ndarray, count: int) -> np.ndarray:
    """``count`` windows spread evenly over the training part ``train_idx`` (episodes differ,
    consecutive windows do not), sorted and unique: the calibration set of every INT8 graph here."""
    count = min(count, len(train_idx))
    return np.unique(train_idx[np.linspace(0, len(train_idx) - 1, count).astype(int)])


def report_name(out: Path) -> str:
    """The parity report beside an INT8 file: parity-int8.md for model.int8.onnx, parity-int8.plain.md for
    the TensorRT source model.plain.int8.onnx (both live in one model folder), else parity-<stem>.md."""
    return {"model.int8.onnx": REPORT_NAME, "model.plain.int8.onnx": "parity-int8.plain.md"}.get(
        out.name, f"parity-{out.stem}.md")


# --------------------------------------------------------------------------- graph helpers
def regression_tail_nodes(model, outputs: Sequence[str]) -> list[str]:
    """Names of the nodes between each of ``outputs`` and the first MatMul/Gemm met walking the graph
    backwards from it (that MatMul/Gemm included), on every path: the readout of a regression output
    and the float post-processing after it (de-normalisation to metres). Paths that reach a graph
    input without a MatMul/Gemm (e.g. the position frame) are kept too; only MatMul/Gemm ever get
    quantized, so excluding them changes nothing."""
    producer = {out: node for node in model.graph.node for out in node.output}
    excluded: list[str] = []
    seen: set[int] = set()
    stack = [producer[name] for name in outputs if name in producer]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        excluded.append(node.name)
        if node.op_type in _LINEAR_OPS:
            continue  # the regression layer itself: stop here on this path
        stack += [producer[i] for i in node.input if i in producer]
    return excluded


def activation_matmuls(model) -> list[str]:
    """MatMuls whose second input is not a weight (attention scores and their product with values)."""
    constant = {i.name for i in model.graph.initializer}
    constant |= {out for n in model.graph.node if n.op_type == "Constant" for out in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in constant]


def regression_outputs(model, manifest: ModelManifest | None = None) -> list[str]:
    """Graph outputs that are positions: kind "regression" in the manifest, or a known position name."""
    names = {o.name for o in model.graph.output}
    found = {name for name in POSITION_OUTPUTS if name in names}
    if manifest is not None:
        found |= {o.name for o in manifest.outputs if o.kind == "regression" and o.name in names}
    return sorted(found)


def _named_nodes(model) -> None:
    """Give every unnamed node a unique name (exclusion lists address nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


@dataclass(frozen=True)
class GraphSummary:
    """What quantization did to a graph: linear ops fed by DequantizeLinear vs left float."""

    quantized: tuple[str, ...]  # MatMul/Gemm whose inputs come from DequantizeLinear
    float_linear: tuple[str, ...]  # MatMul/Gemm left in float
    quantized_other: tuple[str, ...]  # any other op type fed by DequantizeLinear (should be empty)
    op_counts: dict[str, int] = field(default_factory=dict)


def summarize_graph(path_or_model) -> GraphSummary:
    """Which MatMul/Gemm read DequantizeLinear outputs (or are integer ops), which stay float, and
    which other ops read dequantized values (none with the defaults), from a path or ModelProto."""
    model = load_onnx(path_or_model) if isinstance(path_or_model, (str, Path)) else path_or_model
    producer = {out: node for node in model.graph.node for out in node.output}
    quantized, float_linear, other = [], [], []
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        fed = any(i in producer and producer[i].op_type == "DequantizeLinear" for i in node.input)
        if node.op_type in _INTEGER_LINEAR_OPS or (node.op_type in _LINEAR_OPS and fed):
            quantized.append(node.name)
        elif node.op_type in _LINEAR_OPS:
            float_linear.append(node.name)
        elif fed and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            other.append(node.name)
    return GraphSummary(tuple(quantized), tuple(float_linear), tuple(other), dict(sorted(counts.items())))


# --------------------------------------------------------------------------- quantization
def _calibration_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}
    if method not in table:
        raise ExportError(f"calibration method must be one of {', '.join(table)}, got {method!r}")
    return table[method]


def _preprocess(model, work: Path):
    """``quant_pre_process`` (symbolic shape inference; graph optimisation skipped: ORT applies the
    same fusions at session creation, and an optimised graph renames the nodes we exclude).
    Returns the processed model, or ``None`` when pre-processing fails (the raw graph is then used)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = work / "raw.onnx", work / "pre.onnx"
    onnx.save(model, str(src))
    try:
        quant_pre_process(str(src), str(dst), skip_optimization=True)
        return onnx.load(str(dst))
    except Exception:  # noqa: BLE001  # any failure: quantize the graph as exported
        return None


def _preprocess_state(path: Path, requested: bool) -> str:
    """"applied" when the quantized graph carries quant_pre_process's metadata, else why not."""
    if not requested:
        return "off"
    keys = {p.key for p in load_onnx(path).metadata_props}
    return "applied" if "onnx.quant.pre_process" in keys else "failed (raw graph quantized)"


def quantize_static_int8(fp32_path: str | Path, out_path: str | Path, windows: WindowSet, calib_indices: Indices, *,
                         method: str = "minmax", per_channel: bool = True, exclude_regression: bool = True,
                         op_types: Sequence[str] = DEFAULT_OP_TYPES, batch_size: int = 1, preprocess: bool = True,
                         matmul_const_b_only: bool = True, output_qdq: bool = False,
                         calibrator_options: Mapping[str, Any] | None = None,
                         extra_options: Mapping[str, Any] | None = None, activations: str = "s8",
                         reduce_range: bool = False) -> Path:
    """Static INT8 QDQ quantization of ``fp32_path`` calibrated on windows ``calib_indices``.

    ``activations`` "s8" (default: symmetric signed, what TensorRT consumes) or "u8" (asymmetric
    unsigned, ONNX Runtime's x86 default); ``reduce_range`` quantizes weights to 7 bits (guards the
    16-bit accumulator of u8 x s8 on CPUs without VNNI). ``spar-bench quant --int8-settings`` measures them.

    S8S8 with symmetric activation ranges, per-channel weights when ``per_channel``; only
    ``op_types`` quantized; with ``exclude_regression`` the last layer of every position output
    stays float. Defaults measured on the tiny model of the tests (see the module docstring):
    ``matmul_const_b_only`` keeps the activation x activation MatMuls of attention float, and
    ``output_qdq=False`` puts Q/DQ on MatMul inputs only (ONNX Runtime fuses DQ -> MatMul into
    MatMulIntegerToFloat; TensorRT quantizes the inputs of weighted layers). ``calibrator_options``
    override ``CALIBRATOR_OPTIONS[method]`` (e.g. fewer entropy bins). When a manifest sits beside
    the FP32 file, the dataset's feature hashes must match it.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static, save_tensors_data

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    model = load_onnx(fp32_path)
    manifest = fp32_manifest(fp32_path, required=False)
    if manifest is not None:
        check_dataset(manifest, windows)
    input_names = [i.name for i in model.graph.input]
    reader = WindowCalibrationReader(windows, calib_indices, input_names, batch_size)
    calibrate_method = _calibration_method(method)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spar-quant-") as tmp:
        work = Path(tmp)
        processed = _preprocess(model, work) if preprocess else None
        model = processed if processed is not None else model
        _named_nodes(model)
        exclude = regression_tail_nodes(model, regression_outputs(model, manifest)) if exclude_regression else []
        if matmul_const_b_only:  # ORT honours MatMulConstBOnly in QOperator/dynamic mode only, not in QDQ
            exclude += activation_matmuls(model)
        source = work / "input.onnx"
        onnx.save(model, str(source))
        if activations not in ("s8", "u8"):
            raise ExportError(f"activations must be s8 or u8, got {activations!r}")
        options = {"ActivationSymmetric": activations == "s8", "WeightSymmetric": True, **(extra_options or {})}
        if not output_qdq:
            options.setdefault("OpTypesToExcludeOutputQuantization", list(op_types))
        try:
            ranges = calibrate(source, reader, method, op_types, work, calibrator_options)
            save_tensors_data(ranges, work / "ranges.json")
            quantize_static(str(source), str(out_path), None, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(op_types), per_channel=per_channel, reduce_range=reduce_range,
                            activation_type=QuantType.QInt8 if activations == "s8" else QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            nodes_to_exclude=exclude or None, calibrate_method=calibrate_method,
                            extra_options=options, calibration_cache_path=work / "ranges.json")
        except ExportError:
            raise
        except Exception as exc:  # ORT raises plain exceptions for bad graphs / inputs
            raise ExportError(f"static quantization of {fp32_path} failed ({method}): {type(exc).__name__}: "
                              f"{exc}") from exc
    quantized = onnx.load(str(out_path))
    if detach_shape_reads(quantized):
        onnx.save(quantized, str(out_path))
    return out_path


# Histogram settings. ORT's quantize_static does not pass bin counts through, and its Entropy
# default (128 bins into 128 quantized bins) leaves a single candidate threshold: the MinMax range.
# 2048 / 128 are the counts TensorRT's entropy calibrator uses.
CALIBRATOR_OPTIONS = {
    "minmax": {},
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128, "symmetric": True},
}


CALIBRATION_CHUNK = 16  # calibration batches per collect_data call


class _Chunk(CalibrationDataReader):
    """At most ``size`` batches of ``reader`` per pass; ``more()`` starts the next pass."""

    def __init__(self, reader: CalibrationDataReader, size: int):
        self.reader, self.size, self.left, self._peek = reader, size, 0, None

    def more(self) -> bool:
        self._peek = self.reader.get_next()
        self.left = self.size
        return self._peek is not None

    def get_next(self):
        if self.left <= 0:
            return None
        self.left -= 1
        if self._peek is not None:
            item, self._peek = self._peek, None
            return item
        return self.reader.get_next()


def calibrate(model_path: Path, reader: WindowCalibrationReader, method: str, op_types: Sequence[str], work: Path,
              options: Mapping[str, Any] | None = None):
    """Activation ranges (ORT ``TensorsData``) of the tensors around ``op_types`` over ``reader``'s windows."""
    from onnxruntime.quantization.calibrate import create_calibrator

    reader.rewind()
    calibrator = create_calibrator(Path(model_path), list(op_types), augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=_calibration_method(method),
                                   extra_options={**CALIBRATOR_OPTIONS[method], **(options or {})})
    # ORT keeps every intermediate tensor of one collect_data call in memory: feed it in chunks
    # (ranges and histograms accumulate across calls).
    chunk = _Chunk(reader, CALIBRATION_CHUNK)
    while chunk.more():
        calibrator.collect_data(chunk)
    ranges = calibrator.compute_data()
    del calibrator
    return ranges


def detach_shape_reads(model) -> int:
    """Let ``Shape`` nodes read the float tensor instead of its DequantizeLinear copy.

    The exporter reads shapes of tensors that also feed a MatMul; after QDQ insertion those
    ``Shape`` nodes hang off the DequantizeLinear, which then has several consumers, and ONNX
    Runtime only fuses DQ -> MatMul -> (Q) into an integer kernel when the DQ feeds the MatMul alone:
    the MatMul ran dequantized, in float. A shape is the same either way. Returns how many inputs moved.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    moved = 0
    for node in model.graph.node:
        if node.op_type != "Shape":
            continue
        dq = producer.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue  # a weight's DQ: no float tensor to point at
        node.input[0] = q.input[0]
        moved += 1
    return moved


def quantize_dynamic_int8(fp32_path: str | Path, out_path: str | Path, *, per_channel: bool = False,
                          weights: str = "s8", reduce_range: bool = False) -> Path:
    """Dynamic INT8 quantization of the MatMuls with constant weights (activations quantized to u8 at
    run time per batch; no calibration data). The comparison point for static QDQ on CPU.
    ``weights`` "s8" or "u8"; ``reduce_range``: 7-bit weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if weights not in ("s8", "u8"):
        raise ExportError(f"weights must be s8 or u8, got {weights!r}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    load_onnx(fp32_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        weight_type = QuantType.QInt8 if weights == "s8" else QuantType.QUInt8
        quantize_dynamic(str(fp32_path), str(out_path), op_types_to_quantize=["MatMul"], per_channel=per_channel,
                         reduce_range=reduce_range, weight_type=weight_type, extra_options={"MatMulConstBOnly": True})
    except Exception as exc:
        raise ExportError(f"dynamic quantization of {fp32_path} failed: {type(exc).__name__}: {exc}") from exc
    return out_path


# --------------------------------------------------------------------------- measuring candidates
@dataclass
class Candidate:
    """One quantized graph measured against torch FP32 on held-out windows."""

    label: str
    path: Path
    file_bytes: int
    max_abs_error: dict[str, float]
    agreement: dict[str, float]
    metrics: dict[str, float]  # "task/metric"
    task_loss: float  # primary-metric loss vs FP32 (0 when not worse), summed over tasks
    rel_error: float  # mean over outputs of RMS(candidate - FP32) / RMS spread of FP32
    seconds: float = 0.0  # time to quantize

    @property
    def key(self) -> tuple[float, float]:
        """Ranking: least task-metric loss beyond ``TASK_LOSS_TOLERANCE`` first (smaller losses are
        noise on a held-out set of a few dozen windows), then the closest outputs."""
        return (round(max(self.task_loss - TASK_LOSS_TOLERANCE, 0.0), 9), self.rel_error)


def _task_loss(model: DeployModel, reference: Mapping[str, float], candidate: Mapping[str, float]) -> float:
    """Sum over tasks of how much worse the candidate's primary metric is than FP32's: absolute for
    scores in [0, 1] (accuracy, mAP), relative for distances (metres / FP32 metres)."""
    loss = 0.0
    for task in model.heads:
        name, higher_better = PRIMARY_METRICS[task]
        key = f"{task}/{name}"
        ref, got = reference.get(key, float("nan")), candidate.get(key, float("nan"))
        if not (np.isfinite(ref) and np.isfinite(got)):
            continue
        worse = (ref - got) if higher_better else (got - ref) / max(abs(ref), 1e-9)
        loss += max(0.0, worse)
    return loss


def measure_candidate(label: str, path: Path, model: DeployModel, reference: Mapping[str, np.ndarray],
                      windows: WindowSet, eval_indices: Indices, *, threads: int | None = None,
                      seconds: float = 0.0) -> tuple[Candidate, ParityReport]:
    """Run ``path`` in ORT on ``eval_indices`` and compare with ``reference`` (torch FP32 outputs)."""
    outputs = collect_outputs(model, onnx_runner(path, threads, model.output_names), windows, eval_indices)
    parity = parity_from_outputs(model, reference, outputs, windows, eval_indices)
    agree = agreement(model, reference, outputs)
    rel = [v for k, v in agree.items() if k.endswith("/rel_rms")]
    candidate = Candidate(label, Path(path), Path(path).stat().st_size, parity.max_abs_error, agree,
                          parity.metrics_candidate, _task_loss(model, parity.metrics_reference,
                                                               parity.metrics_candidate),
                          float(np.mean(rel)) if rel else 0.0, seconds)
    return candidate, parity


@dataclass
class CalibrationChoice:
    """The calibration methods tried, each measured on held-out windows, and the one picked."""

    best: str
    candidates: list[Candidate]
    reference_metrics: dict[str, float]
    calib_windows: int
    eval_windows: int

    @property
    def best_candidate(self) -> Candidate:
        return next(c for c in self.candidates if c.label == self.best)

    def to_markdown(self) -> str:
        keys = list(self.reference_metrics)
        agree_keys = sorted({k for c in self.candidates for k in c.agreement if not k.endswith("/rel_rms")})
        head = ["method", "task loss", "mean rel. RMS error", *agree_keys, *keys, "quantize s"]
        lines = [f"calibration on {self.calib_windows} windows, measured on {self.eval_windows} held-out windows "
                 f"against torch FP32; ranked by primary task-metric loss (ties up to {TASK_LOSS_TOLERANCE:g}), "
                 f"then mean relative RMS output error; picked: **{self.best}**", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines.append("| torch FP32 | | | " + " | ".join("" for _ in agree_keys) + (" | " if agree_keys else "")
                     + " | ".join(f"{self.reference_metrics[k]:.4g}" for k in keys) + " | |")
        for c in sorted(self.candidates, key=lambda c: c.key):
            cells = [c.label, f"{c.task_loss:.4g}", f"{c.rel_error:.4g}",
                     *(f"{c.agreement.get(k, float('nan')):.4g}" for k in agree_keys),
                     *(f"{c.metrics.get(k, float('nan')):.4g}" for k in keys), f"{c.seconds:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def choose_calibration(fp32_path: str | Path, out_dir: str | Path, windows: WindowSet, calib_indices: Indices,
                       eval_indices: Indices, model: DeployModel, *, methods: Sequence[str] = METHODS,
                       threads: int | None = None, reference: Mapping[str, np.ndarray] | None = None,
                       **quant_options: Any) -> CalibrationChoice:
    """Quantize with each of ``methods`` into ``out_dir/<method>.onnx``, measure each against torch
    FP32 on ``eval_indices`` and pick the best (least primary-metric loss, then the smallest mean
    relative output error). ``quant_options`` go to ``quantize_static_int8``."""
    if not methods:
        raise ExportError("give at least one calibration method")
    for method in methods:
        _calibration_method(method)
    check_windows(model, windows)
    eval_idx = _check_indices(eval_indices, len(windows), "evaluation")
    calib_idx = _check_indices(calib_indices, len(windows), "calibration")
    out_dir = Path(out_dir)
    if reference is None:
        reference = collect_outputs(model, torch_runner(model), windows, eval_idx)
    candidates, metrics_ref = [], {}
    for method in methods:
        start = time.perf_counter()
        path = quantize_static_int8(fp32_path, out_dir / f"{method}.onnx", windows, calib_idx, method=method,
                                    **quant_options)
        candidate, parity = measure_candidate(method, path, model, reference, windows, eval_idx, threads=threads,
                                              seconds=time.perf_counter() - start)
        candidates.append(candidate)
        metrics_ref = parity.metrics_reference
    best = min(candidates, key=lambda c: c.key)
    return CalibrationChoice(best.label, candidates, metrics_ref, int(calib_idx.size), int(eval_idx.size))


# --------------------------------------------------------------------------- the whole step
@dataclass
class QuantReport:
    """What ``quantize`` wrote and how the INT8 graph compares with FP32 (torch and ORT)."""

    fp32_path: Path
    int8_path: Path
    manifest_path: Path
    report_path: Path
    method: str
    settings: dict[str, Any]
    parity_fp32: ParityReport  # torch FP32 vs ORT FP32
    parity_int8: ParityReport  # torch FP32 vs ORT INT8 (static QDQ)
    agreement_int8: dict[str, float]
    graph: GraphSummary
    excluded_linear: tuple[str, ...]
    file_bytes: dict[str, int]
    calibration: CalibrationChoice | None = None
    dynamic: Candidate | None = None
    parity_dynamic: ParityReport | None = None
    calib_windows: int = 0
    eval_windows: int = 0

    @property
    def metric(self) -> dict[str, Any]:
        """The manifest's metric entry: INT8 metrics on the held-out windows."""
        return {**self.parity_int8.metrics_candidate, "windows": self.eval_windows, "precision": "int8"}

    def to_markdown(self) -> str:
        fp32_mb, int8_mb = self.file_bytes["fp32"] / 2 ** 20, self.file_bytes["int8"] / 2 ** 20
        lines = [
            "# INT8 parity", "",
            f"FP32 `{self.fp32_path.name}` ({fp32_mb:.2f} MiB) -> INT8 `{self.int8_path.name}` ({int8_mb:.2f} MiB); "
            f"calibrated on {self.calib_windows} real windows with **{self.method}**, measured on "
            f"{self.eval_windows} held-out windows.", "",
            "settings: " + "; ".join(f"{k}={v}" for k, v in self.settings.items()), "",
            f"quantized MatMul/Gemm: {len(self.graph.quantized)}; left float: {len(self.graph.float_linear)} "
            f"(regression readouts kept float: {', '.join(self.excluded_linear) or 'none'}); "
            "other ops reading a DequantizeLinear output: "
            + (", ".join(self.graph.quantized_other) if self.graph.quantized_other else
               "none (LayerNormalization, Softmax and the residual Adds run in float on float inputs)") + ".", "",
            "## torch FP32 vs ONNX Runtime FP32", "", self.parity_fp32.to_markdown("torch FP32", "ORT FP32"),
            "## torch FP32 vs ONNX Runtime INT8 (static QDQ)", "",
            self.parity_int8.to_markdown("torch FP32", "ORT INT8"),
            "| agreement with FP32 | INT8 |" + (" INT8 dynamic |" if self.dynamic else ""),
            "|---|---|" + ("---|" if self.dynamic else ""),
        ]
        for key, value in self.agreement_int8.items():
            row = f"| {key} | {value:.4g} |"
            if self.dynamic:
                row += f" {self.dynamic.agreement.get(key, float('nan')):.4g} |"
            lines.append(row)
        if self.dynamic and self.parity_dynamic:
            lines += ["", "## torch FP32 vs ONNX Runtime INT8 dynamic (MatMul weights only, for comparison)", "",
                      f"`{self.dynamic.path.name}` ({self.dynamic.file_bytes / 2 ** 20:.2f} MiB)", "",
                      self.parity_dynamic.to_markdown("torch FP32", "ORT INT8 dynamic")]
        if self.calibration:
            lines += ["## Calibration methods", "", self.calibration.to_markdown()]
        return "\n".join(lines) + "\n"


def quantize(fp32_onnx: str | Path, out: str | Path, windows: WindowSet, calib_indices: Indices,
             eval_indices: Indices, model: DeployModel, method: str = "auto", *, per_channel: bool = True,
             exclude_regression: bool = True, matmul_const_b_only: bool = True, output_qdq: bool = False,
             preprocess: bool = True, include_dynamic: bool = True, threads: int | None = None,
             methods: Sequence[str] = METHODS, **quant_options: Any) -> QuantReport:
    """FP32 ONNX (with its manifest beside it) -> INT8 QDQ ONNX at ``out`` + manifest + ``parity-int8.md``.

    ``method``: "auto" (try each of ``methods``, keep the best by measurement) or one of ``METHODS``.
    ``model`` is the DeployModel the FP32 graph was exported from (the torch reference).
    Calibration windows ``calib_indices`` and evaluation windows ``eval_indices`` should not overlap.
    Quantization options: see ``quantize_static_int8``. ``include_dynamic`` also writes
    ``<out stem>.dynamic.onnx`` (dynamic INT8) with its manifest and reports it beside the static one.
    ``threads``: ORT intra-op threads of the parity runs.
    """
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    load_onnx(fp32_onnx)
    base = fp32_manifest(fp32_onnx, required=True)
    check_dataset(base, windows)
    check_windows(model, windows)
    if method != "auto":
        _calibration_method(method)
    calib_idx = _check_indices(calib_indices, len(windows), "calibration")
    eval_idx = _check_indices(eval_indices, len(windows), "evaluation")
    if out.resolve() == fp32_onnx.resolve():
        raise ExportError(f"{out}: the INT8 model would overwrite the FP32 model")
    options = {"per_channel": per_channel, "exclude_regression": exclude_regression,
               "matmul_const_b_only": matmul_const_b_only, "output_qdq": output_qdq, "preprocess": preprocess,
               **quant_options}
    reference = collect_outputs(model, torch_runner(model), windows, eval_idx)
    out.parent.mkdir(parents=True, exist_ok=True)

    calibration = None
    start = time.perf_counter()
    if method == "auto":
        with tempfile.TemporaryDirectory(prefix="spar-calib-") as tmp:
            calibration = choose_calibration(fp32_onnx, tmp, windows, calib_idx, eval_idx, model, methods=methods,
                                             threads=threads, reference=reference, **options)
            shutil.copyfile(calibration.best_candidate.path, out)
            calibration.candidates = [dataclasses.replace(c, path=Path(c.path.name)) for c in calibration.candidates]
        method = calibration.best
    else:
        quantize_static_int8(fp32_onnx, out, windows, calib_idx, method=method, **options)
    seconds = time.perf_counter() - start

    fp32_outputs = collect_outputs(model, onnx_runner(fp32_onnx, threads, model.output_names), windows, eval_idx)
    parity_fp32 = parity_from_outputs(model, reference, fp32_outputs, windows, eval_idx)
    int8, parity_int8 = measure_candidate(method, out, model, reference, windows, eval_idx, threads=threads,
                                          seconds=seconds)
    dynamic = parity_dynamic = None
    if include_dynamic:
        dynamic_path = quantize_dynamic_int8(fp32_onnx, out.with_name(f"{out.stem}.dynamic.onnx"))
        dynamic, parity_dynamic = measure_candidate("dynamic", dynamic_path, model, reference, windows, eval_idx,
                                                    threads=threads)

    graph = summarize_graph(out)
    fp32_model = load_onnx(fp32_onnx)
    _named_nodes(fp32_model)
    tail = set(regression_tail_nodes(fp32_model, regression_outputs(fp32_model, base))) if exclude_regression else set()
    excluded_linear = tuple(n for n in graph.float_linear if n in tail)
    settings = {"format": "QDQ", "activations": "QInt8 symmetric", "weights": "QInt8 symmetric",
                "per_channel": per_channel, "op_types": "/".join(options.get("op_types", DEFAULT_OP_TYPES)),
                "exclude_regression": exclude_regression, "matmul_const_b_only": matmul_const_b_only,
                "output_qdq": output_qdq, "preprocess": _preprocess_state(out, preprocess),
                "ort_threads": threads or "ORT default"}
    report = QuantReport(
        fp32_path=fp32_onnx, int8_path=out, manifest_path=manifest_path_for(out),
        report_path=out.parent / report_name(out),
        method=method, settings=settings, parity_fp32=parity_fp32, parity_int8=parity_int8,
        agreement_int8=int8.agreement, graph=graph, excluded_linear=excluded_linear,
        file_bytes={"fp32": fp32_onnx.stat().st_size, "int8": out.stat().st_size}, calibration=calibration,
        dynamic=dynamic, parity_dynamic=parity_dynamic, calib_windows=int(calib_idx.size),
        eval_windows=int(eval_idx.size))
    manifest = derive_manifest(base, out, artifact_format="onnx", precision="int8", metric=report.metric)
    manifest.write(report.manifest_path)
    if dynamic is not None and parity_dynamic is not None:
        # Dynamic INT8 runs on ONNX Runtime's CPU kernels only, and on a CPU without VNNI it is the
        # INT8 graph that pays (spar-bench quant --int8-settings): give it a manifest to deploy with.
        metric = {**parity_dynamic.metrics_candidate, "windows": int(eval_idx.size), "precision": "int8"}
        derive_manifest(base, dynamic.path, artifact_format="onnx", precision="int8",
                        metric=metric).write(manifest_path_for(dynamic.path))
    report.report_path.write_text(report.to_markdown())
    return report
