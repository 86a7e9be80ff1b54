"""TensorRT engines from exported ONNX graphs: optimisation profile over batch and node count, FP16 or
explicit-quantization INT8, a derived manifest and a build record next to every engine.

``spar-export engine`` runs :func:`build_engine` on the machine that will serve the model: an engine
only loads on the TensorRT version and GPU it was built with (the aggregator's TensorRT backend says
so when it refuses one). Nothing here imports ``tensorrt`` at module level: :func:`profile_shapes`,
:func:`qdq_report` and :func:`engine_summary` work everywhere.

Precision, with TensorRT 10 (checked against its Python API docs):

* ``fp32``: a plain network; TF32 is cleared so "fp32" really computes in float32.
* ``fp16``: ``BuilderFlag.FP16`` on a (weakly typed) network; TensorRT picks per layer, so it may keep
  LayerNorm/Softmax in float32 where it judges that safer. The flag is deprecated since TensorRT 10.12
  ("weak typing") and removed in 11: there the graph itself must be FP16 (ModelOpt AutoCast), which
  this module refuses with a message rather than guess.
* ``int8``: explicit quantization only. The ONNX must be a Q/DQ graph (``spar-export quantize``);
  the network is created ``STRONGLY_TYPED``, so precision follows the graph: quantized ops in INT8,
  everything outside Q/DQ pairs (LayerNorm, Softmax, ...) in the graph's float type. No INT8/FP16
  builder flag and no calibrator (implicit-quantization calibrators are deprecated since 10.1).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from export.errors import ExportError
from export.formats import build_record_name, engine_name, export_format
from export.manifests import derive_manifest, manifest_path_for, sha256_of
from spar_wire.atomic_file import write_atomic
from spar_wire.model_manifest import ModelManifest, load_manifest

log = logging.getLogger("export.tensorrt")

PRECISIONS = ("fp16", "int8", "fp32")
MIN_TENSORRT_MAJOR = 10
BUILD_INFO_FORMAT = "spar-trt-build"
BUILD_INFO_VERSION = 1
INSTALL_HINT = ("install it on the machine with the target GPU: `pip install 'tensorrt>=10,<11' 'cuda-python>=12'` "
                "(the `jetson` extra; TensorRT 11 removed the FP16 builder flag), or on a Jetson use the "
                "JetPack packages")

Range3 = tuple[int, int, int]
Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


# --------------------------------------------------------------------------- what to build
@dataclass(frozen=True)
class EngineSpec:
    """How to build an engine.

    Attributes:
        precision: "fp16", "int8" (needs a Q/DQ ONNX) or "fp32".
        batch: (min, opt, max) batch size of the optimisation profile.
        nodes: (min, opt, max) node count; None: the manifest's ``node_range`` with opt = ``site_nodes``
            (or the range's top when that is not given). Must lie inside the manifest's node_range.
        site_nodes: the site's node count, used as the node-count opt when ``nodes`` is None.
        workspace_mib: limit of TensorRT's WORKSPACE memory pool.
        timing_cache: file to load tactic timings from (when it exists) and save them to after the
            build; None: no persistent cache.
    """

    precision: str = "fp16"
    batch: Range3 = (1, 1, 8)
    nodes: Range3 | None = None
    site_nodes: int | None = None
    workspace_mib: int = 1024
    timing_cache: str | Path | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ExportError(f"engine precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.workspace_mib, int) or self.workspace_mib < 1:
            raise ExportError(f"workspace_mib must be a positive integer, got {self.workspace_mib!r}")
        _check_range("batch", self.batch)
        if self.nodes is not None:
            _check_range("nodes", self.nodes)
        if self.site_nodes is not None and (not isinstance(self.site_nodes, int) or self.site_nodes < 1):
            raise ExportError(f"site_nodes must be a positive integer, got {self.site_nodes!r}")


def _check_range(what: str, value: Iterable[int]) -> Range3:
    values = tuple(value)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ExportError(f"{what} range must be three integers (min, opt, max), got {values!r}")
    low, opt, high = values
    if not 1 <= low <= opt <= high:
        raise ExportError(f"{what} range must satisfy 1 <= min <= opt <= max, got {values}")
    return values  # type: ignore[return-value]


def node_profile(manifest: ModelManifest, spec: EngineSpec) -> Range3:
    """(min, opt, max) node count of the profile; ExportError when it leaves the manifest's node_range."""
    low, high = manifest.node_range
    if spec.nodes is not None:
        nodes = spec.nodes
    else:
        opt = spec.site_nodes if spec.site_nodes is not None else high
        if not low <= opt <= high:
            raise ExportError(f"the site has {opt} nodes, outside the model's node_range [{low}, {high}] "
                              f"({manifest.source}): this model cannot serve that site")
        nodes = (low, opt, high)
    if nodes[0] < low or nodes[2] > high:
        raise ExportError(f"engine node range {nodes[0]}..{nodes[2]} is outside the model's node_range "
                          f"[{low}, {high}] ({manifest.source}); the model was exported for at most {high} nodes")
    return nodes


def profile_shapes(manifest: ModelManifest, spec: EngineSpec) -> ProfileShapes:
    """(min, opt, max) shape of every manifest input: "batch" and "nodes" axes from the spec's ranges,
    static axes kept. Pure Python; ExportError on ranges outside the manifest's node_range."""
    nodes = node_profile(manifest, spec)
    batch = spec.batch
    shapes: ProfileShapes = {}
    for tensor in manifest.inputs:
        per_bound = []
        for i in range(3):
            per_bound.append(tuple(batch[i] if d == "batch" else nodes[i] if d == "nodes" else int(d)
                                   for d in tensor.shape))
        shapes[tensor.name] = (per_bound[0], per_bound[1], per_bound[2])
    return shapes


def default_engine_path(onnx_path: str | Path, precision: str) -> Path:
    """The engine beside ``onnx_path``, named by the formats table's rule (``export.formats.engine_name``)."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(engine_name(onnx_path.name, precision))


def build_info_path(engine_path: str | Path) -> Path:
    """Where the build record of ``engine_path`` goes: ``<stem>.build.json`` beside it."""
    engine_path = Path(engine_path)
    return engine_path.with_name(build_record_name(engine_path.name))


# --------------------------------------------------------------------------- Q/DQ graphs
@dataclass(frozen=True)
class QdqReport:
    """Quantize/DequantizeLinear nodes of an ONNX graph and what TensorRT would object to."""

    quantize: int
    dequantize: int
    problems: tuple[str, ...]

    @property
    def is_qdq(self) -> bool:
        return self.quantize > 0


_Q_OPS = ("QuantizeLinear", "DequantizeLinear")


def qdq_report(onnx_path: str | Path) -> QdqReport:
    """Count Q/DQ nodes (onnx package, no TensorRT) and list those TensorRT's INT8 path cannot take.

    TensorRT takes symmetric signed INT8 only: zero points must be int8 zeros (the onnx-tensorrt
    operator table: QuantizeLinear "`y_zero_point` must be 0", DequantizeLinear INT8/FP8 inputs).
    A QuantizeLinear without a zero point means uint8 in ONNX (ONNX Runtime computes it that way),
    so it is flagged too.
    """
    import onnx
    from onnx import numpy_helper

    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # OSError, protobuf DecodeError, ...: all mean "not a readable ONNX file"
        raise ExportError(f"{path}: cannot read the ONNX graph: {exc}") from None
    graph = model.graph
    constants: dict[str, Any] = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0}
    problems: list[str] = []
    for node in _all_nodes(graph):
        if node.op_type not in _Q_OPS:
            continue
        label = f"{node.op_type} {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{label}: domain {node.domain!r} (TensorRT parses only the standard ONNX op)")
            continue
        counts[node.op_type] += 1
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if zero_point is None:
            output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
            if node.op_type == "QuantizeLinear" and output_dtype != onnx.TensorProto.INT8:
                problems.append(f"{label}: no zero point, which ONNX reads as uint8 (asymmetric)")
            continue
        tensor = constants.get(zero_point)
        if tensor is None:
            continue  # computed at run time: nothing to check statically
        try:
            value = numpy_helper.to_array(tensor)
        except (ValueError, TypeError, OSError):  # external data not loaded
            continue
        if value.dtype.name != "int8":
            problems.append(f"{label}: zero point type {value.dtype.name} (TensorRT needs int8)")
        elif value.size and bool((value != 0).any()):
            problems.append(f"{label}: nonzero zero point (TensorRT needs symmetric quantization)")
    return QdqReport(counts["QuantizeLinear"], counts["DequantizeLinear"], tuple(problems))


def _all_nodes(graph) -> Iterable[Any]:
    """Nodes of ``graph`` and of its subgraphs (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def require_qdq(onnx_path: str | Path) -> QdqReport:
    """The Q/DQ report of a graph that an INT8 engine can be built from; ExportError otherwise."""
    report = qdq_report(onnx_path)
    if not report.is_qdq:
        raise ExportError(f"{onnx_path} has no QuantizeLinear nodes: an int8 TensorRT engine is built from an "
                          "explicitly quantized (Q/DQ) graph. Run `spar-export quantize` first (INT8 Q/DQ ONNX "
                          "calibrated on real windows) and build from its output, or build with precision fp16")
    if report.problems:
        shown = "; ".join(report.problems[:5]) + (f"; ... ({len(report.problems)} in all)"
                                                  if len(report.problems) > 5 else "")
        raise ExportError(f"{onnx_path}: Q/DQ nodes TensorRT cannot build as INT8: {shown}. TensorRT takes "
                          "symmetric signed INT8 only: quantize activations and weights as QInt8 with symmetric "
                          "scales (zero point 0)")
    return report


def require_standard_ops(onnx_path: str | Path) -> None:
    """ExportError when the graph has ops outside the standard ONNX domain (ONNX Runtime's contrib
    MultiHeadAttention of a fused-attention export): TensorRT's ONNX parser cannot take them."""
    from export.attention import contrib_ops

    try:
        foreign = contrib_ops(onnx_path)
    except Exception as exc:  # OSError, protobuf DecodeError, ...: all mean "not a readable ONNX file"
        raise ExportError(f"{onnx_path}: cannot read the ONNX graph: {exc}") from None
    if foreign:
        plain, plain_int8 = export_format("onnx-plain").file, export_format("onnx-int8-plain").file
        raise ExportError(f"{onnx_path} has ops TensorRT cannot parse ({', '.join(foreign)}): it is the fused-"
                          "attention graph for ONNX Runtime. Build the engine from the plain-attention graph "
                          f"beside it: {plain} for fp16/fp32 (`spar-export onnx` writes it), "
                          f"{plain_int8} for int8 (`spar-export quantize --onnx {plain}`)")


# --------------------------------------------------------------------------- TensorRT
def import_tensorrt() -> ModuleType:
    """``tensorrt`` (>= 10), or ExportError with the install hint."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the package is there, its libnvinfer is not
        raise ExportError(f"building a TensorRT engine needs the tensorrt Python package, which cannot be "
                          f"imported ({exc}); {INSTALL_HINT}") from None
    version = str(getattr(trt, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TENSORRT_MAJOR:
        raise ExportError(f"TensorRT {version} is too old: engines here are built with TensorRT >= "
                          f"{MIN_TENSORRT_MAJOR} (named I/O tensors, INT64/BOOL inputs); {INSTALL_HINT}")
    return trt


def _collecting_logger(trt: ModuleType):
    """A ``trt.ILogger`` that forwards to Python logging and keeps errors for the ExportError message."""
    severity = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, level, msg) -> None:  # called by TensorRT
            if level in (severity.INTERNAL_ERROR, severity.ERROR):
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif level == severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def build_engine(onnx_path: str | Path, out_path: str | Path | None = None, spec: EngineSpec | None = None,
                 manifest: ModelManifest | str | Path | None = None) -> Path:
    """Build a TensorRT engine from ``onnx_path`` and write it with its manifest and build record.

    Args:
        onnx_path: an ONNX graph from ``spar-export`` (dynamic "batch" and "nodes" axes); for int8 a
            Q/DQ graph.
        out_path: the engine file; None: :func:`default_engine_path`.
        spec: precision, profile ranges, workspace, timing cache (default: fp16, batch 1..8).
        manifest: the ONNX's manifest (object or path); None: the one beside the ONNX
            (``manifest_path_for``). Its sha256 must match the ONNX.

    Returns:
        The engine path. Beside it: ``<stem>.manifest.json`` (artifact format "tensorrt", the
        precision, node_range = the profile's node range) and ``<stem>.build.json``
        (:func:`engine_summary` reads it).

    Raises:
        ExportError: missing tensorrt (with the install hint), a bad spec or profile, a non-Q/DQ
            graph for int8, every ONNX parser error, or a failed build (TensorRT's errors quoted).
    """
    spec = spec or EngineSpec()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError(f"ONNX file {onnx_path} does not exist")
    out_path = Path(out_path) if out_path is not None else default_engine_path(onnx_path, spec.precision)
    source = _source_manifest(onnx_path, manifest)
    _check_paths(onnx_path, out_path, source)
    shapes = profile_shapes(source, spec)  # every pure check before TensorRT is touched
    nodes = node_profile(source, spec)
    require_standard_ops(onnx_path)
    qdq = require_qdq(onnx_path) if spec.precision == "int8" else qdq_report(onnx_path)
    if spec.precision != "int8" and qdq.is_qdq:
        raise ExportError(f"{onnx_path} is a Q/DQ (quantized) graph: build it with precision int8, or build "
                          f"{spec.precision} from the float ONNX it was quantized from")

    trt = import_tensorrt()
    logger = _collecting_logger(trt)
    try:
        builder = trt.Builder(logger)
    except (RuntimeError, TypeError) as exc:
        raise ExportError(f"TensorRT could not create a builder (no usable CUDA GPU or driver?): {exc}") from None
    if builder is None:
        raise ExportError("TensorRT could not create a builder (no usable CUDA GPU or driver?)")
    strongly_typed = spec.precision == "int8"
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        listing = "\n  ".join(errors) or "(no parser errors reported)"
        raise ExportError(f"TensorRT {trt.__version__} cannot parse {onnx_path} ({len(errors)} error(s)):\n  "
                          f"{listing}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib * (1 << 20))
    builder_flags = _set_precision(trt, config, spec.precision)
    config.add_optimization_profile(_profile(builder, network, shapes, onnx_path))
    cache_reused = _attach_timing_cache(config, spec.timing_cache)

    log.info("building %s TensorRT %s engine from %s (batch %s, nodes %s)", spec.precision, trt.__version__,
             onnx_path, spec.batch, nodes)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        detail = "; ".join(logger.errors[-5:]) or "see the TensorRT log"
        raise ExportError(f"TensorRT failed to build the {spec.precision} engine from {onnx_path}: {detail}")

    # Engines, their caches and records keep the temporary file's mode (0600), as they always had.
    write_atomic(out_path, serialized)
    if spec.timing_cache is not None:
        write_atomic(Path(spec.timing_cache), config.get_timing_cache().serialize())
    derived = derive_manifest(source, out_path, artifact_format="tensorrt", precision=spec.precision,
                              node_range=(nodes[0], nodes[2]))
    manifest_path = manifest_path_for(out_path)
    write_atomic(manifest_path, json.dumps(derived.to_dict(), indent=2) + "\n")
    info = {
        "format": BUILD_INFO_FORMAT, "version": BUILD_INFO_VERSION,
        "engine": out_path.name, "engine_sha256": derived.sha256, "engine_bytes": out_path.stat().st_size,
        "manifest": manifest_path.name,
        "source_onnx": onnx_path.name, "source_sha256": source.sha256,
        "model": {"name": source.name, "version": source.version},
        "precision": spec.precision, "strongly_typed": strongly_typed, "builder_flags": builder_flags,
        "tensorrt_version": str(trt.__version__), "gpu": gpu_info(),
        "batch_range": list(spec.batch), "node_range": list(nodes),
        "profile": {name: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                    for name, (lo, opt, hi) in shapes.items()},
        "workspace_mib": spec.workspace_mib,
        "timing_cache": str(spec.timing_cache) if spec.timing_cache is not None else None,
        "timing_cache_reused": cache_reused,
        "build_seconds": round(seconds, 3),
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "note": "an engine loads only on the TensorRT version and GPU (compute capability) it was built with",
    }
    write_atomic(build_info_path(out_path), json.dumps(info, indent=2) + "\n")
    log.info("wrote %s (%.1f s, %d bytes), %s and %s", out_path, seconds, info["engine_bytes"], manifest_path.name,
             build_info_path(out_path).name)
    return out_path


def _source_manifest(onnx_path: Path, manifest: ModelManifest | str | Path | None) -> ModelManifest:
    if not isinstance(manifest, ModelManifest):
        path = Path(manifest) if manifest is not None else manifest_path_for(onnx_path)
        if not path.is_file():
            raise ExportError(f"no manifest for {onnx_path}: expected {path} (written by `spar-export` beside "
                              "every ONNX it exports); pass the manifest explicitly")
        try:
            manifest = load_manifest(path)
        except Exception as exc:  # WireError("bad_manifest", ...) names the field
            raise ExportError(f"cannot use manifest {path}: {exc}") from None
    if manifest.artifact_format != "onnx":
        raise ExportError(f"{manifest.source} describes a {manifest.artifact_format!r} artifact; an engine is "
                          "built from an ONNX model's manifest")
    digest = sha256_of(onnx_path)
    if digest != manifest.sha256:
        raise ExportError(f"{manifest.source} does not describe {onnx_path}: its sha256 is {manifest.sha256[:12]}..., "
                          f"the file's is {digest[:12]}... (re-export, or pass the matching manifest)")
    return manifest


def _check_paths(onnx_path: Path, out_path: Path, source: ModelManifest) -> None:
    targets = {"engine": out_path, "engine manifest": manifest_path_for(out_path),
               "build record": build_info_path(out_path)}
    protected = {onnx_path.resolve(), Path(source.source).resolve()}
    for what, path in targets.items():
        if path.resolve() in protected:
            raise ExportError(f"the {what} would overwrite {path} (the source model or its manifest); choose "
                              f"another engine name, e.g. {default_engine_path(onnx_path, 'fp16').name}")
    if out_path.suffix in (".onnx", ".json"):
        raise ExportError(f"engine path {out_path} has suffix {out_path.suffix}; use .engine or .plan")


def _set_precision(trt: ModuleType, config, precision: str) -> list[str]:
    """Set the builder flags of ``precision``; returns their names (for the build record)."""
    flags = []
    if precision == "fp16":
        fp16 = getattr(trt.BuilderFlag, "FP16", None)
        if fp16 is None:
            raise ExportError(f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (removed in TensorRT 11: "
                              "networks are strongly typed). Convert the ONNX to FP16 first (ModelOpt AutoCast) "
                              "and build it as fp32, or use TensorRT 10 for an fp16 build")
        config.set_flag(fp16)  # deprecated since TensorRT 10.12 (weak typing), still the 10.x FP16 path
        flags.append("FP16")
    elif precision == "fp32":
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if tf32 is not None:
            config.clear_flag(tf32)  # TF32 is on by default: fp32 should mean float32 matmuls
            flags.append("-TF32")
    # int8: strongly typed network, precision comes from the Q/DQ graph; no builder flag
    return flags


def _profile(builder, network, shapes: ProfileShapes, onnx_path: Path):
    """Optimisation profile 0 from ``shapes``, checked against the parsed network's inputs."""
    inputs = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        inputs[tensor.name] = tuple(int(d) for d in tensor.shape)
    if set(inputs) != set(shapes):
        raise ExportError(f"{onnx_path}: the graph's inputs {sorted(inputs)} differ from the manifest's "
                          f"{sorted(shapes)}")
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        dims = inputs[name]
        if len(dims) != len(low) or any(d >= 0 and d != lo for d, lo in zip(dims, low, strict=True)):
            raise ExportError(f"{onnx_path}: input {name!r} has shape {list(dims)} in the graph (-1 = dynamic), "
                              f"the manifest implies {list(low)}..{list(high)}")
        try:
            profile.set_shape(name, low, opt, high)  # bool and int64 inputs included
        except ValueError as exc:
            raise ExportError(f"TensorRT refused profile {low}/{opt}/{high} for input {name!r}: {exc}") from None
    return profile


def _attach_timing_cache(config, path: str | Path | None) -> bool:
    """Load ``path`` into the config's timing cache (empty when absent); True if a saved cache was used."""
    if path is None:
        return False
    path = Path(path)
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return bool(blob)
    if blob:
        log.warning("timing cache %s is from another TensorRT version or GPU: starting an empty one", path)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return False


def gpu_info() -> dict[str, Any] | None:
    """Current CUDA device's name and compute capability via cuda-python; None when unavailable."""
    cudart = None
    for name in ("cuda.bindings.runtime", "cuda.cudart"):  # new layout first; the old one is deprecated
        try:
            cudart = importlib.import_module(name)
            break
        except ImportError:
            continue
    if cudart is None:
        return None
    try:
        ok = cudart.cudaError_t.cudaSuccess
        err, device = cudart.cudaGetDevice()
        if err != ok:
            return None
        err, props = cudart.cudaGetDeviceProperties(device)
        if err != ok:
            return None
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return {"device": int(device), "name": name.strip("\x00").strip(),
                "compute_capability": f"{props.major}.{props.minor}"}
    except (AttributeError, TypeError, ValueError, RuntimeError):  # the record never fails a build
        return None


# --------------------------------------------------------------------------- reading back
def engine_summary(path: str | Path) -> dict[str, Any]:
    """The build record of an engine (pass the engine or its ``.build.json``), plus ``engine_present`` and
    ``engine_matches`` (the engine file's sha256 equals the recorded one)."""
    path = Path(path)
    record = path if path.name.endswith(".build.json") else build_info_path(path)
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ExportError(f"no build record {record}: {exc.strerror or exc} (engines built by `spar-export "
                          "engine` have one beside them)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"build record {record} is not JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != BUILD_INFO_FORMAT:
        raise ExportError(f"{record} is not a {BUILD_INFO_FORMAT} record")
    engine = record.with_name(str(info.get("engine", "")))
    info["engine_present"] = engine.is_file()
    info["engine_matches"] = engine.is_file() and sha256_of(engine) == info.get("engine_sha256")
    return info
