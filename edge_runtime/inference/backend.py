"""One small interface over the inference engines the aggregator can use, and the table that picks one.

Every backend takes a :class:`~spar_wire.model_manifest.ModelManifest` and runs batched placement
tensors named as the manifest says (``tokens_{m}`` [B, N, m, D] float32, ``present_{m}`` [B, N] bool,
``positions`` [B, N, d_S] float32, ``node_index`` [B, N] int64). Input checking lives here, once, so
that every backend refuses the same bad input with the same message.

``BACKENDS`` is the single source of truth about what exists: :func:`load_backend` selects from it and
:func:`backend_table_markdown` renders it for the docs, so the two cannot drift apart.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.errors import AggregatorError
from spar_wire.errors import WireError
from spar_wire.model_manifest import NODE_INDEX_INPUT, ModelManifest, TensorSpec

log = logging.getLogger("edge_runtime.inference")

AUTO = "auto"
# Devices a caller may ask for. "tensorrt" is a device in the ONNX Runtime sense (its TensorRT
# execution provider); the native TensorRT backend runs on "cuda".
DEVICES = (AUTO, "cpu", "cuda", "tensorrt")


@dataclass(frozen=True)
class BackendOptions:
    """Tuning knobs; each backend reads the ones that apply to it."""

    intra_op_threads: int | None = None  # ONNX Runtime: threads inside one op; None = all usable cores
    # ONNX Runtime: treat denormal floats as zero. Masked attention (absent nodes, most windows on a
    # lossy link) yields denormals that cost the CPU ~5x in attention. ORT sets the flag on the thread
    # that creates the session and on its own pool threads, for the life of those threads: right for
    # the aggregator's own process, wrong for a process that needs IEEE subnormals elsewhere.
    flush_denormals: bool = False


@dataclass(frozen=True)
class BackendInfo:
    """One row of the backend table: what a backend loads, where it runs and what it needs."""

    name: str  # the ``preference`` value that selects it
    artifact_format: str  # manifest ``artifact.format`` it loads (spar_wire.model_manifest.ARTIFACT_FORMATS)
    devices: tuple[str, ...]  # DEVICES values it can run on, best first
    dynamic_batch: bool  # accepts any batch size within its limits without a rebuild
    dynamic_nodes: bool  # accepts any node count within the manifest's node_range
    needs_gpu: bool
    packages: tuple[str, ...]  # pip distributions it needs (for messages and docs)
    # Import names that must resolve, one tuple per package; any name of a tuple will do (cuda-python
    # moved its runtime module from ``cuda.cudart`` to ``cuda.bindings.runtime``).
    imports: tuple[tuple[str, ...], ...]
    module: str  # where the class lives, imported only when chosen
    class_name: str
    summary: str

    def missing_packages(self) -> list[str]:
        """The pip names of the required packages that cannot be imported here."""
        return [package for package, names in zip(self.packages, self.imports, strict=True)
                if not any(_importable(name) for name in names)]

    def is_available(self) -> bool:
        return not self.missing_packages()

    def load_class(self) -> type[InferenceBackend]:
        return getattr(importlib.import_module(self.module), self.class_name)


# Table order is the "auto" priority among backends that load the same artifact format.
BACKENDS: tuple[BackendInfo, ...] = (
    BackendInfo(
        name="tensorrt", artifact_format="tensorrt", devices=("cuda",),
        dynamic_batch=True, dynamic_nodes=True, needs_gpu=True,
        packages=("tensorrt", "cuda-python"),
        imports=(("tensorrt",), ("cuda.bindings.runtime", "cuda.cudart")),
        module="edge_runtime.inference.tensorrt_backend", class_name="TensorRTBackend",
        summary="native TensorRT 10 engine built for this GPU and TensorRT version (optimisation "
                "profile bounds batch and node count)",
    ),
    BackendInfo(
        name="onnxruntime", artifact_format="onnx", devices=("tensorrt", "cuda", "cpu"),
        dynamic_batch=True, dynamic_nodes=True, needs_gpu=False,
        packages=("onnxruntime",), imports=(("onnxruntime",),),
        module="edge_runtime.inference.onnxruntime_backend", class_name="OnnxRuntimeBackend",
        summary="ONNX Runtime; execution provider TensorRT > CUDA > CPU, whichever "
                "onnxruntime.get_available_providers() lists",
    ),
)
BACKEND_NAMES: tuple[str, ...] = tuple(b.name for b in BACKENDS)
PREFERENCES: tuple[str, ...] = (AUTO, *BACKEND_NAMES)


def backend_info(name: str) -> BackendInfo:
    for info in BACKENDS:
        if info.name == name:
            return info
    raise AggregatorError(f"unknown inference backend {name!r}; choose one of {', '.join(PREFERENCES)}")


def backend_table_markdown() -> str:
    """The backend table as Markdown, for README/docs (generated from ``BACKENDS``)."""
    rows = ["| backend | loads | devices | dynamic batch | dynamic nodes | needs GPU | packages | |",
            "|---|---|---|---|---|---|---|---|"]
    for b in BACKENDS:
        rows.append(f"| `{b.name}` | {b.artifact_format} | {', '.join(b.devices)} | "
                    f"{_yes(b.dynamic_batch)} | {_yes(b.dynamic_nodes)} | {_yes(b.needs_gpu)} | "
                    f"{', '.join(b.packages)} | {b.summary} |")
    return "\n".join(rows) + "\n"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _importable(name: str) -> bool:
    # find_spec imports parent packages; a missing parent raises instead of returning None.
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- the interface
class InferenceBackend(ABC):
    """A loaded model that runs batched placement tensors.

    Subclasses implement ``_infer`` (inputs already checked) and ``_release``; this base class
    owns the checks, warm-up, closing and the log line. Not every backend is safe to call from
    several threads at once: the aggregator calls ``run`` from one inference worker.
    """

    name: str = "?"

    def __init__(self, manifest: ModelManifest):
        self.manifest = manifest
        self._closed = False
        self._close_lock = threading.Lock()

    # ----------------------------------------------------------------- what it expects
    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self.manifest.inputs

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.manifest.outputs)

    def describe(self) -> str:
        """One line for logs: backend, device, model."""
        m = self.manifest
        return (f"{self.name} on {self.device_description()}: model {m.name} {m.version} "
                f"({m.artifact_format}, {m.precision}) from {m.artifact_path}")

    def device_description(self) -> str:
        return "?"

    # ----------------------------------------------------------------- running
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch.

        Args:
            inputs: every manifest input by name; leading dim B (batch), then N (nodes) where the
                manifest says "nodes"; dtypes exactly as the manifest says (no silent casts).

        Returns:
            Every manifest output by name, e.g. ``logits`` [B, n_classes] float32.

        Raises:
            AggregatorError: a missing, unexpected, mistyped or misshaped input (the message names
                it), a closed backend, or a failure inside the engine.
        """
        if self._closed:
            raise AggregatorError(f"{self.name}: run() on a closed backend")
        arrays, batch, nodes = check_inputs(self.manifest, inputs)
        outputs = self._infer(arrays, batch, nodes)
        missing = [n for n in self.output_names if n not in outputs]
        if missing:
            raise AggregatorError(f"{self.name}: the engine produced no output {missing}")
        return {n: outputs[n] for n in self.output_names}

    def warmup(self, n_nodes: int, batch: int = 1) -> float:
        """Run one dummy batch so lazy allocation and kernel selection happen before real data.

        Returns the seconds it took.
        """
        started = time.perf_counter()
        self.run(dummy_inputs(self.manifest, batch=batch, n_nodes=n_nodes))
        elapsed = time.perf_counter() - started
        log.info("%s warm-up (batch %d, %d nodes): %.1f ms", self.name, batch, n_nodes, elapsed * 1e3)
        return elapsed

    def close(self) -> None:
        """Release the engine and its memory; safe to call twice."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._release()

    def __enter__(self) -> InferenceBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- for subclasses
    @abstractmethod
    def _infer(self, inputs: dict[str, np.ndarray], batch: int, nodes: int) -> dict[str, np.ndarray]:
        """Run checked, C-contiguous inputs; return at least every manifest output."""

    @abstractmethod
    def _release(self) -> None:
        """Free what the backend holds (called once)."""


# --------------------------------------------------------------------------- input checks
def check_inputs(manifest: ModelManifest,
                 inputs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int, int]:
    """Check names, dtypes and shapes of ``inputs`` against ``manifest``.

    Returns:
        (C-contiguous arrays in manifest order, batch size B, node count N; N is 0 when no input
        has a "nodes" axis).

    Raises:
        AggregatorError naming the offending input.
    """
    if not isinstance(inputs, Mapping):
        raise AggregatorError(f"inputs must be a mapping name -> numpy array, got {type(inputs).__name__}")
    expected = [spec.name for spec in manifest.inputs]
    missing = [name for name in expected if name not in inputs]
    unexpected = sorted(str(name) for name in inputs if name not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected input(s) {', '.join(unexpected)}")
        raise AggregatorError(f"model {manifest.name}: {'; '.join(parts)} (expected: {', '.join(expected)})")

    sizes: dict[str, tuple[int, str]] = {}  # "batch"/"nodes" -> (size, the input that fixed it)
    arrays: dict[str, np.ndarray] = {}
    for spec in manifest.inputs:
        value = inputs[spec.name]
        if not isinstance(value, np.ndarray):
            raise AggregatorError(f"input {spec.name!r}: expected a numpy array, got {type(value).__name__}")
        if value.dtype != np.dtype(spec.dtype):
            raise AggregatorError(f"input {spec.name!r}: dtype {value.dtype}, the model expects {spec.dtype}")
        if value.ndim != len(spec.shape):
            raise AggregatorError(f"input {spec.name!r}: shape {value.shape} has {value.ndim} dims, the "
                                  f"model expects {len(spec.shape)}: {_shape_text(spec.shape)}")
        for axis, (want, got) in enumerate(zip(spec.shape, value.shape, strict=True)):
            if isinstance(want, int):
                if got != want:
                    raise AggregatorError(f"input {spec.name!r}: shape {value.shape}, axis {axis} must be "
                                          f"{want} (expected {_shape_text(spec.shape)})")
                continue
            if want in sizes and sizes[want][0] != got:
                size, first = sizes[want]
                raise AggregatorError(f"input {spec.name!r}: {want} size {got} on axis {axis}, but "
                                      f"{first!r} has {want} size {size}")
            sizes.setdefault(want, (got, spec.name))
        arrays[spec.name] = np.ascontiguousarray(value)

    batch = sizes.get("batch", (1, ""))[0]
    nodes = sizes.get("nodes", (0, ""))[0]
    if batch < 1:
        raise AggregatorError(f"input {sizes['batch'][1]!r}: batch size must be at least 1, got {batch}")
    low, high = manifest.node_range
    if "nodes" in sizes and not low <= nodes <= high:
        raise AggregatorError(f"input {sizes['nodes'][1]!r}: {nodes} nodes is outside the model's node "
                              f"range [{low}, {high}]")
    return arrays, batch, nodes


def dummy_inputs(manifest: ModelManifest, *, batch: int, n_nodes: int) -> dict[str, np.ndarray]:
    """Valid inputs of the given size: zeros, every node present, node_index 0..N-1."""
    low, high = manifest.node_range
    if not low <= n_nodes <= high:
        raise AggregatorError(f"warm-up with {n_nodes} nodes: outside the model's node range [{low}, {high}]")
    if batch < 1:
        raise AggregatorError(f"warm-up batch must be at least 1, got {batch}")
    out = {}
    for spec in manifest.inputs:
        shape = tuple(batch if d == "batch" else n_nodes if d == "nodes" else d for d in spec.shape)
        if spec.dtype == "bool":
            out[spec.name] = np.ones(shape, dtype=bool)
        elif spec.name == NODE_INDEX_INPUT:
            out[spec.name] = np.broadcast_to(np.arange(n_nodes, dtype=spec.dtype), shape).copy()
        else:
            out[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return out


def _shape_text(shape: tuple[int | str, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# --------------------------------------------------------------------------- selection
def verify_artifact(manifest: ModelManifest) -> None:
    """AggregatorError unless the manifest's artifact exists and matches its sha256."""
    try:
        manifest.verify_artifact()
    except WireError as exc:
        raise AggregatorError(f"model {manifest.name} refused: {exc.detail}") from None


def select_backend(manifest: ModelManifest, preference: str = AUTO, *, device: str = AUTO) -> BackendInfo:
    """The table row ``load_backend`` would use; AggregatorError saying why when none fits.

    "auto": the first row (table order) that loads the manifest's artifact format, runs on
    ``device`` and whose packages import. An explicit name is used as given or refused; it is
    never swapped for another backend.
    """
    if device not in DEVICES:
        raise AggregatorError(f"unknown inference device {device!r}; choose one of {', '.join(DEVICES)}")
    if preference != AUTO:
        info = backend_info(preference)
        problems = _problems(info, manifest, device)
        if problems:
            raise AggregatorError(f"inference backend {info.name!r} cannot load {manifest.artifact_path}: "
                                  + "; ".join(problems))
        return info

    candidates = [b for b in BACKENDS if b.artifact_format == manifest.artifact_format]
    if not candidates:  # unreachable while the table covers ARTIFACT_FORMATS; a test checks that
        raise AggregatorError(f"no inference backend loads {manifest.artifact_format!r} artifacts")
    reasons = []
    for info in candidates:
        problems = _problems(info, manifest, device)
        if not problems:
            return info
        reasons.append(f"{info.name}: {'; '.join(problems)}")
    raise AggregatorError(f"no inference backend can load {manifest.artifact_path} "
                          f"({manifest.artifact_format}, device {device}): " + " | ".join(reasons))


def _problems(info: BackendInfo, manifest: ModelManifest, device: str) -> list[str]:
    problems = []
    missing = info.missing_packages()
    if missing:
        problems.append(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed "
                        f"(pip install {' '.join(missing)}; on a Jetson use the JetPack packages)")
    if info.artifact_format != manifest.artifact_format:
        problems.append(f"it loads {info.artifact_format!r} artifacts, this manifest's artifact is "
                        f"{manifest.artifact_format!r}")
    if device != AUTO and device not in info.devices:
        problems.append(f"it runs on {', '.join(info.devices)}, not on {device!r}")
    return problems


def load_backend(manifest: ModelManifest, preference: str = AUTO, *, device: str = AUTO,
                 options: BackendOptions | None = None) -> InferenceBackend:
    """Verify the artifact, pick a backend from ``BACKENDS`` and load the model into it.

    Args:
        manifest: the model's manifest; its artifact's sha256 is checked before anything loads.
        preference: "auto" (native TensorRT for a tensorrt artifact; ONNX Runtime for an onnx one)
            or a backend name from ``BACKEND_NAMES``.
        device: "auto" (best available), "cpu", "cuda" or "tensorrt" (ONNX Runtime's TensorRT
            execution provider). An explicit device that is not available is an error.
        options: tuning knobs (threads).

    Raises:
        AggregatorError: the artifact fails verification, the choice is unknown or unavailable, or
            the engine refuses the model; the message says which and why.
    """
    if preference not in PREFERENCES:
        raise AggregatorError(f"unknown inference backend {preference!r}; "
                              f"choose one of {', '.join(PREFERENCES)}")
    verify_artifact(manifest)
    info = select_backend(manifest, preference, device=device)
    # Verified above: the backend need not hash the artifact a second time.
    backend = info.load_class()(manifest, device=device, options=options or BackendOptions(), verify=False)
    log.info("inference backend: %s (asked: backend %s, device %s)", backend.describe(), preference, device)
    return backend
