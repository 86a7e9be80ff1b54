"""Native TensorRT 10 backend: a serialized engine run with ``execute_async_v3`` on its own CUDA stream.

Device memory comes from cuda-python's runtime API (``cuda.bindings.runtime``, formerly
``cuda.cudart``). The runtime API, unlike pycuda's driver contexts, needs no per-thread context
push/pop: the aggregator may load the engine on one thread and run it on another.

``tensorrt`` and ``cuda-python`` are imported when a backend is created, so this module imports
on machines without them (the selector and the docs read the backend table everywhere).

Engines are tied to the TensorRT version and GPU they were built on, and their optimisation
profile bounds every dynamic axis (batch, nodes): both are checked with clear messages.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from edge_runtime.errors import AggregatorError
from edge_runtime.inference.backend import AUTO, BackendOptions, InferenceBackend, verify_artifact
from spar_wire.model_manifest import ModelManifest

_MIN_ALLOCATION = 512  # bytes; also keeps zero-sized tensors on a real (non-null) address


def import_tensorrt() -> ModuleType:
    """``tensorrt`` (>= 10), or AggregatorError saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise AggregatorError(f"the tensorrt Python package is not installed ({exc}); on a Jetson it comes "
                              "with JetPack, elsewhere `pip install tensorrt`") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise AggregatorError(f"TensorRT {trt.__version__} is too old: this backend needs TensorRT >= 10 "
                              "(execute_async_v3 and named I/O tensors)")
    return trt


def import_cudart() -> ModuleType:
    """cuda-python's runtime API module, or AggregatorError saying how to get it."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):  # new layout first; the old one is deprecated
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise AggregatorError("cuda-python is not installed (the TensorRT backend allocates GPU memory with "
                          "it): `pip install cuda-python` matching your CUDA major version")


def _cuda(cudart: ModuleType, result: Any, what: str) -> Any:
    """Unpack a cuda-python call result ``(err, *values)``; AggregatorError on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        raise AggregatorError(f"CUDA error during {what}: {err} "
                              f"({text.decode() if isinstance(text, bytes) else text})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass
class _DeviceBuffer:
    pointer: int = 0
    capacity: int = 0  # bytes


@dataclass(frozen=True)
class _IoTensor:
    name: str
    dtype: np.dtype  # what the engine reads/writes
    manifest_dtype: np.dtype  # what callers give/get
    # inputs: (min, max) shapes of optimisation profile 0; outputs: None
    profile: tuple[tuple[int, ...], tuple[int, ...]] | None


class TensorRTBackend(InferenceBackend):
    """A deserialized TensorRT engine with one execution context and one CUDA stream.

    ``run`` holds a lock: one execution context must not be enqueued from two threads at once.
    Device buffers are kept between calls and reallocated only when a tensor outgrows them.
    """

    name = "tensorrt"

    def __init__(self, manifest: ModelManifest, *, device: str = AUTO,
                 options: BackendOptions | None = None, verify: bool = True):
        super().__init__(manifest)  # options: nothing to tune here yet
        if manifest.artifact_format != "tensorrt":
            raise AggregatorError(f"the tensorrt backend loads TensorRT engines; {manifest.source} describes "
                                  f"a {manifest.artifact_format!r} artifact (build one with "
                                  "`spar-export engine`)")
        if device not in (AUTO, "cuda"):
            raise AggregatorError(f"the tensorrt backend runs on 'cuda', not on {device!r}")
        if verify:
            verify_artifact(manifest)
        trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        self._trt = trt
        self._lock = threading.Lock()
        self._buffers: dict[str, _DeviceBuffer] = {}
        self._stream = None
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(manifest.artifact_path.read_bytes())
        if self._engine is None:
            raise AggregatorError(f"TensorRT {trt.__version__} cannot deserialize {manifest.artifact_path}: "
                                  "an engine only loads on the TensorRT version and GPU it was built for "
                                  "(see the TensorRT log above); rebuild it with `spar-export engine`")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise AggregatorError("TensorRT could not create an execution context for "
                                  f"{manifest.artifact_path} (out of GPU memory?)")
        self._inputs, self._outputs = self._io_tensors(manifest)
        device_id = _cuda(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
        try:  # the GPU's name is for the log line only: never fail a load over it
            props = _cuda(cudart, cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
            gpu = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        except (AggregatorError, AttributeError):
            gpu = "GPU"
        self._device_text = f"cuda:{device_id} {gpu.strip(chr(0))} (TensorRT {trt.__version__})"
        self._stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")

    def device_description(self) -> str:
        return self._device_text

    # ----------------------------------------------------------------- engine I/O
    def _io_tensors(self, manifest: ModelManifest) -> tuple[list[_IoTensor], list[_IoTensor]]:
        trt, engine = self._trt, self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {n: engine.get_tensor_mode(n) for n in names}
        engine_inputs = {n for n in names if modes[n] == trt.TensorIOMode.INPUT}
        engine_outputs = {n for n in names if modes[n] == trt.TensorIOMode.OUTPUT}
        want_in = {t.name for t in manifest.inputs}
        want_out = {t.name for t in manifest.outputs}
        if engine_inputs != want_in or not want_out <= engine_outputs:
            raise AggregatorError(f"{manifest.artifact_path}: engine inputs {sorted(engine_inputs)} / "
                                  f"outputs {sorted(engine_outputs)} do not match the manifest's "
                                  f"{sorted(want_in)} / {sorted(want_out)}")
        inputs = []
        for spec in manifest.inputs:
            dtype = self._engine_dtype(spec.name)
            ok = dtype == np.dtype(spec.dtype) or (spec.dtype == "int64" and dtype == np.int32)
            if not ok:
                raise AggregatorError(f"{manifest.artifact_path}: engine input {spec.name!r} is {dtype}, the "
                                      f"manifest says {spec.dtype}")
            inputs.append(_IoTensor(spec.name, dtype, np.dtype(spec.dtype), self._profile(spec.name)))
        outputs = []
        for spec in manifest.outputs:
            dtype = self._engine_dtype(spec.name)
            # Widening (float16 -> float32, int32 -> int64) is exact; anything else would lose data.
            if not np.can_cast(dtype, np.dtype(spec.dtype), "safe"):
                raise AggregatorError(f"{manifest.artifact_path}: engine output {spec.name!r} is {dtype}, "
                                      f"the manifest says {spec.dtype}")
            outputs.append(_IoTensor(spec.name, dtype, np.dtype(spec.dtype), None))
        return inputs, outputs

    def _profile(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(min, max) shape of input ``name`` in optimisation profile 0."""
        shape = tuple(self._engine.get_tensor_shape(name))  # -1 marks a dynamic axis
        if all(d >= 0 for d in shape) or self._engine.num_optimization_profiles < 1:
            return shape, shape  # a static input: profiles say nothing about it
        low, _opt, high = self._engine.get_tensor_profile_shape(name, 0)
        return tuple(low), tuple(high)

    def _engine_dtype(self, name: str) -> np.dtype:
        trt_dtype = self._engine.get_tensor_dtype(name)
        try:
            return np.dtype(self._trt.nptype(trt_dtype))
        except (TypeError, KeyError):  # BF16/FP8/INT4 I/O have no numpy type
            raise AggregatorError(f"engine tensor {name!r} has type {trt_dtype}, which the backend cannot "
                                  "exchange with numpy") from None

    # ----------------------------------------------------------------- running
    def _infer(self, inputs: dict[str, np.ndarray], batch: int, nodes: int) -> dict[str, np.ndarray]:
        host_inputs = [(t, self._to_engine(t, inputs[t.name])) for t in self._inputs]
        with self._lock:
            try:
                results = self._enqueue(host_inputs, batch, nodes)
            except AggregatorError:
                # Drain whatever was queued before the failure, so that the next call may free or
                # reuse the buffers and the host arrays those copies read are no longer needed.
                self._cudart.cudaStreamSynchronize(self._stream)
                raise
        # host_inputs stayed referenced until after the synchronize: the copies read from them.
        del host_inputs
        return {t.name: results[t.name].astype(t.manifest_dtype, copy=False) for t in self._outputs}

    def _enqueue(self, host_inputs: list[tuple[_IoTensor, np.ndarray]], batch: int,
                 nodes: int) -> dict[str, np.ndarray]:
        """Copy in, execute, copy out and wait; returns the outputs in the engine's dtypes."""
        cudart = self._cudart
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for tensor, array in host_inputs:
            low, high = tensor.profile
            if any(not lo <= n <= hi for lo, n, hi in zip(low, array.shape, high, strict=True)):
                raise AggregatorError(f"input {tensor.name!r}: shape {array.shape} is outside the "
                                      f"engine's optimisation profile {low}..{high} (batch {batch}, "
                                      f"{nodes} nodes); rebuild the engine with a wider profile or "
                                      "send smaller batches")
            if not self._context.set_input_shape(tensor.name, array.shape):
                raise AggregatorError(f"TensorRT refused shape {array.shape} for input {tensor.name!r}")
            pointer = self._reserve(tensor.name, array.nbytes)
            _cuda(cudart, cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, to_device,
                                                 self._stream), f"copy of {tensor.name} to the GPU")
            self._context.set_tensor_address(tensor.name, pointer)
        results = {}
        for tensor in self._outputs:
            # Known only once every input shape is set: TensorRT propagates them.
            shape = tuple(self._context.get_tensor_shape(tensor.name))
            if any(d < 0 for d in shape):
                raise AggregatorError(f"TensorRT could not infer the shape of output {tensor.name!r} "
                                      f"(got {shape})")
            host = results[tensor.name] = np.empty(shape, dtype=tensor.dtype)
            self._context.set_tensor_address(tensor.name, self._reserve(tensor.name, host.nbytes))
        if not self._context.execute_async_v3(int(self._stream)):
            raise AggregatorError(f"TensorRT execution failed (batch {batch}, {nodes} nodes); "
                                  "see its log")
        for name, host in results.items():
            _cuda(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name].pointer,
                                                 host.nbytes, to_host, self._stream),
                  f"copy of {name} from the GPU")
        _cuda(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return results

    @staticmethod
    def _to_engine(tensor: _IoTensor, array: np.ndarray) -> np.ndarray:
        if array.dtype == tensor.dtype:
            return array
        # Only int64 -> int32 gets here (checked at load): refuse values that would wrap around.
        info = np.iinfo(tensor.dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise AggregatorError(f"input {tensor.name!r}: values outside {tensor.dtype} range, which this "
                                  "engine uses for it")
        return np.ascontiguousarray(array.astype(tensor.dtype))

    def _reserve(self, name: str, nbytes: int) -> int:
        """Device pointer of at least ``nbytes`` for ``name``, growing its buffer when needed."""
        buffer = self._buffers.setdefault(name, _DeviceBuffer())
        if nbytes > buffer.capacity:
            # Grow by at least half again, so a slowly rising node count does not realloc every call.
            capacity = max(nbytes, _MIN_ALLOCATION, buffer.capacity * 3 // 2)
            if buffer.pointer:
                _cuda(self._cudart, self._cudart.cudaFree(buffer.pointer), f"cudaFree ({name})")
                buffer.pointer, buffer.capacity = 0, 0
            pointer = _cuda(self._cudart, self._cudart.cudaMalloc(capacity), f"cudaMalloc ({name})")
            buffer.pointer = int(pointer)
            buffer.capacity = capacity
        return buffer.pointer

    def _release(self) -> None:
        cudart = self._cudart
        with self._lock:
            if self._stream is not None:
                cudart.cudaStreamSynchronize(self._stream)
            for buffer in self._buffers.values():
                if buffer.pointer:
                    cudart.cudaFree(buffer.pointer)
            self._buffers.clear()
            if self._stream is not None:
                cudart.cudaStreamDestroy(self._stream)
                self._stream = None
            # Context before engine before runtime: each depends on the next.
            self._context = None
            self._engine = None
            self._runtime = None
