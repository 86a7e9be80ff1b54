"""The two INT8 quantizers: static QDQ calibrated on real windows, and dynamic (weights only).

``quantize_static_int8`` is the shipped path (QDQ, S8S8, per-channel weights; the choices and their
measurements are in the docstring of ``export.quantize``): it pre-processes the graph, names the
nodes that stay float (``export.quant_graph``), computes the activation ranges from real windows
(``export.quant_calibration``) and hands them to ONNX Runtime's ``quantize_static``.
``quantize_dynamic_int8`` needs no data: the comparison point on CPU, and a deployable artifact of
its own. Both write one ONNX file and nothing else; manifests and reports are ``export.quantize``'s.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.manifests import manifest_path_for
from export.parity import Indices
from export.quant_calibration import WindowCalibrationReader, calibrate, calibration_method, check_dataset
from export.quant_graph import (
    DEFAULT_OP_TYPES,
    activation_matmuls,
    detach_shape_reads,
    load_onnx,
    name_nodes,
    regression_outputs,
    regression_tail_nodes,
)
from spar_wire.errors import WireError
from spar_wire.model_manifest import ModelManifest, load_manifest
from train.data import WindowSet


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


def _preprocess(model: Any, work: Path) -> Any:
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


def preprocess_state(path: Path, requested: bool) -> str:
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
    stays float. Defaults measured on the tiny model of the tests (see ``export.quantize``):
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
    calibrate_method = calibration_method(method)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spar-quant-") as tmp:
        work = Path(tmp)
        processed = _preprocess(model, work) if preprocess else None
        model = processed if processed is not None else model
        name_nodes(model)
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
