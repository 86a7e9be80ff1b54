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

The pieces, one module each (imported in this order, none imports a later one):
``export.quant_graph`` (which nodes stay float, what got quantized, ``detach_shape_reads``),
``export.quant_calibration`` (calibration windows and activation ranges), ``export.quant_int8`` (the
static and dynamic quantizers), ``export.quant_candidates`` (measuring and ranking quantized graphs,
``choose_calibration``), ``export.quant_report`` (``parity-int8.md``); file names come from
``export.formats``.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from export.deploy_model import DeployModel
from export.errors import ExportError
from export.formats import dynamic_name, report_name
from export.manifests import derive_manifest, manifest_path_for
from export.parity import Indices, check_windows, collect_outputs, onnx_runner, parity_from_outputs, torch_runner
from export.quant_calibration import METHODS, calibration_method, check_dataset, check_indices
from export.quant_candidates import choose_calibration, measure_candidate
from export.quant_graph import (
    DEFAULT_OP_TYPES,
    load_onnx,
    name_nodes,
    regression_outputs,
    regression_tail_nodes,
    summarize_graph,
)
from export.quant_int8 import fp32_manifest, preprocess_state, quantize_dynamic_int8, quantize_static_int8
from export.quant_report import QuantReport
from train.data import WindowSet


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
        calibration_method(method)
    calib_idx = check_indices(calib_indices, len(windows), "calibration")
    eval_idx = check_indices(eval_indices, len(windows), "evaluation")
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
        dynamic_path = quantize_dynamic_int8(fp32_onnx, out.with_name(dynamic_name(out.name)))
        dynamic, parity_dynamic = measure_candidate("dynamic", dynamic_path, model, reference, windows, eval_idx,
                                                    threads=threads)

    graph = summarize_graph(out)
    fp32_model = load_onnx(fp32_onnx)
    name_nodes(fp32_model)
    tail = set(regression_tail_nodes(fp32_model, regression_outputs(fp32_model, base))) if exclude_regression else set()
    excluded_linear = tuple(n for n in graph.float_linear if n in tail)
    settings = {"format": "QDQ", "activations": "QInt8 symmetric", "weights": "QInt8 symmetric",
                "per_channel": per_channel, "op_types": "/".join(options.get("op_types", DEFAULT_OP_TYPES)),
                "exclude_regression": exclude_regression, "matmul_const_b_only": matmul_const_b_only,
                "output_qdq": output_qdq, "preprocess": preprocess_state(out, preprocess),
                "ort_threads": threads or "ORT default"}
    report = QuantReport(
        fp32_path=fp32_onnx, int8_path=out, manifest_path=manifest_path_for(out),
        report_path=out.parent / report_name(out.name),
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
