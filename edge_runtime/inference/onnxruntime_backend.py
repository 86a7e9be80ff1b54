"""ONNX Runtime backend: any ONNX model, on CPU or on the GPU through ORT's CUDA / TensorRT providers."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from edge_runtime.errors import AggregatorError
from edge_runtime.inference.backend import AUTO, BackendOptions, InferenceBackend, verify_artifact
from spar_wire.model_manifest import ModelManifest, TensorSpec

log = logging.getLogger("edge_runtime.inference")

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"
# device -> providers that may serve it, best first. CPU closes every GPU chain on purpose: ORT
# places the few ops a GPU provider does not implement on the CPU (graph partitioning, not a swap
# of the user's choice), and refuses to start a GPU session without a CPU fallback listed.
_CHAINS = {
    AUTO: (TENSORRT_EP, CUDA_EP, CPU_EP),
    "tensorrt": (TENSORRT_EP, CUDA_EP, CPU_EP),
    "cuda": (CUDA_EP, CPU_EP),
    "cpu": (CPU_EP,),
}
# ONNX type strings as ORT reports them -> manifest dtypes
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(bool)": "bool"}


def choose_providers(device: str, available: Sequence[str]) -> list[str]:
    """Execution providers for ``device``, best first, keeping only those in ``available``.

    Raises:
        AggregatorError: an explicit device whose provider ``available`` lacks.
    """
    if device not in _CHAINS:
        raise AggregatorError(f"onnxruntime: unknown device {device!r}; choose one of {', '.join(_CHAINS)}")
    chain = [p for p in _CHAINS[device] if p in available]
    if device != AUTO and (not chain or chain[0] != _CHAINS[device][0]):
        raise AggregatorError(f"onnxruntime: device {device!r} needs {_CHAINS[device][0]}, but this "
                              f"onnxruntime {ort.__version__} offers only "
                              f"{', '.join(available) or 'nothing'} "
                              f"(install onnxruntime-gpu, or on a Jetson the JetPack wheel)")
    if not chain:
        raise AggregatorError(f"onnxruntime offers none of {', '.join(_CHAINS[device])} "
                              f"(available: {', '.join(available) or 'nothing'})")
    return chain


def usable_cores() -> int:
    """CPU cores this process may run on (respects taskset / cgroup CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class OnnxRuntimeBackend(InferenceBackend):
    """An ``onnxruntime.InferenceSession`` behind the :class:`InferenceBackend` interface.

    ``session.run`` is thread-safe, so this backend may be shared between threads.
    """

    name = "onnxruntime"

    def __init__(self, manifest: ModelManifest, *, device: str = AUTO,
                 options: BackendOptions | None = None, verify: bool = True):
        super().__init__(manifest)
        options = options or BackendOptions()
        if manifest.artifact_format != "onnx":
            raise AggregatorError(f"onnxruntime loads onnx artifacts; {manifest.source} describes a "
                                  f"{manifest.artifact_format!r} artifact")
        if verify:
            verify_artifact(manifest)
        providers = choose_providers(device, ort.get_available_providers())
        threads = options.intra_op_threads if options.intra_op_threads is not None else usable_cores()
        if threads < 1:
            raise AggregatorError(f"onnxruntime: intra_op_threads must be at least 1, got {threads}")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.log_severity_level = 3  # errors only: ORT's warnings (unused initialisers...) are noise here
        if options.flush_denormals:
            # Masked attention (absent nodes: most windows on a lossy link) yields denormal
            # intermediates, which cost the CPU ~5x in attention (measured, issue 20: 40.0 -> 27.8 ms at
            # batch 8 with 20 % of nodes absent); flushing them changes no output beyond 1e-38.
            so.add_session_config_entry("session.set_denormal_as_zero", "1")
        try:
            self._session = ort.InferenceSession(str(manifest.artifact_path), sess_options=so,
                                                 providers=providers)
        except Exception as exc:  # ORT's pybind errors (Fail, InvalidGraph...) derive from Exception only
            raise AggregatorError(f"onnxruntime cannot load {manifest.artifact_path}: {exc}") from None
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self.intra_op_threads = threads
        # ORT drops a provider that fails to initialise (e.g. missing CUDA libraries) with only a
        # log line; an explicit device must not be quietly downgraded.
        if self.providers[0] != providers[0]:
            message = (f"onnxruntime could not start {providers[0]} (session runs on "
                       f"{', '.join(self.providers)}); check the CUDA/TensorRT libraries")
            if device != AUTO:
                raise AggregatorError(message)
            log.warning("%s", message)
        _check_model_io(manifest, self._session)
        self._output_names = [t.name for t in manifest.outputs]

    def device_description(self) -> str:
        threads = f", intra-op threads {self.intra_op_threads}" if self.providers[0] == CPU_EP else ""
        return f"{' > '.join(self.providers)}{threads} (onnxruntime {ort.__version__})"

    def _infer(self, inputs: dict[str, np.ndarray], batch: int, nodes: int) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(self._output_names, inputs)
        except Exception as exc:  # see __init__: ORT errors derive from Exception only
            raise AggregatorError(f"onnxruntime run failed (batch {batch}, {nodes} nodes): {exc}") from None
        return dict(zip(self._output_names, values, strict=True))

    def _release(self) -> None:
        # ORT frees the session when the last reference goes; drop ours now, not at GC time.
        self._session = None


def _check_model_io(manifest: ModelManifest, session: ort.InferenceSession) -> None:
    """AggregatorError unless the ONNX graph's inputs/outputs are exactly the manifest's."""
    model_inputs = {i.name: i for i in session.get_inputs()}
    model_outputs = {o.name: o for o in session.get_outputs()}
    for kind, specs, actual in (("input", manifest.inputs, model_inputs),
                                ("output", manifest.outputs, model_outputs)):
        want = [t.name for t in specs]
        if kind == "input":
            names_ok = set(want) == set(actual)
        else:  # extra graph outputs are harmless: only the manifest's are fetched
            names_ok = set(want) <= set(actual)
        if not names_ok:
            raise AggregatorError(f"{manifest.artifact_path}: the model's {kind}s are {sorted(actual)}, the "
                                  f"manifest {manifest.source} says {sorted(want)}")
        for spec in specs:
            _check_tensor(manifest, kind, spec, actual[spec.name].type, actual[spec.name].shape)


def _check_tensor(manifest: ModelManifest, kind: str, spec: TensorSpec, ort_type: str, shape: list) -> None:
    where = f"{manifest.artifact_path}: {kind} {spec.name!r}"
    dtype = _ORT_TYPES.get(ort_type, ort_type)
    if dtype != spec.dtype:
        raise AggregatorError(f"{where} is {dtype} in the model, {spec.dtype} in the manifest")
    if len(shape) != len(spec.shape):
        raise AggregatorError(f"{where} has shape {shape} in the model, {list(spec.shape)} in the manifest")
    for axis, (model_dim, manifest_dim) in enumerate(zip(shape, spec.shape, strict=True)):
        # A model dim of str/None is symbolic: it accepts whatever the manifest fixes there.
        if isinstance(model_dim, int) and model_dim != manifest_dim:
            raise AggregatorError(f"{where}: axis {axis} is {model_dim} in the model, {manifest_dim!r} in "
                                  f"the manifest (a dynamic manifest axis needs a dynamic model axis)")
