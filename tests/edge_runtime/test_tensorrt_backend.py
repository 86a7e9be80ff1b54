"""Native TensorRT backend.

Two layers:

* ``test_real_*`` (markers ``tensorrt`` and ``gpu``) build a real engine from the tiny ONNX model with
  the TensorRT builder (optimisation profile over batch and node count) and compare the backend's
  outputs with ONNX Runtime. They skip with a reason where tensorrt, cuda-python or a GPU is absent.
* the others run everywhere: they drive the same backend code through small stand-ins for the
  ``tensorrt`` and cuda-python modules (host memory playing device memory), so the buffer
  bookkeeping, shape checks and dtype handling are tested on machines without a GPU.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.errors import AggregatorError
from edge_runtime.inference import load_backend, select_backend
from edge_runtime.inference import tensorrt_backend as trt_backend
from spar_wire.model_manifest import ModelManifest, load_manifest
from testbed.tiny_onnx_model import build_tiny_model, make_inputs, reference_forward, tiny_weights

MAX_BATCH, OPT_BATCH = 8, 4
MAX_NODES, OPT_NODES = 16, 8


@pytest.fixture(scope="module")
def tiny(parking_lot, tmp_path_factory):
    manifest = build_tiny_model(parking_lot, tmp_path_factory.mktemp("tiny_trt"), max_nodes=MAX_NODES)
    return manifest, tiny_weights(parking_lot)


def engine_manifest(onnx_manifest: ModelManifest, engine: Path) -> ModelManifest:
    """The tiny model's manifest, pointing at a TensorRT engine file instead (written next to it)."""
    path = engine.with_suffix(".json")
    dataclasses.replace(onnx_manifest, artifact_file=engine.name, artifact_format="tensorrt",
                        sha256=hashlib.sha256(engine.read_bytes()).hexdigest()).write(path)
    return load_manifest(path)


def profile_dims(shape: tuple[int | str, ...], batch: int, nodes: int) -> tuple[int, ...]:
    return tuple(batch if d == "batch" else nodes if d == "nodes" else d for d in shape)


# =========================================================================== real TensorRT
@pytest.fixture(scope="module")
def real_engine(real_trt, tiny, tmp_path_factory):
    """(engine manifest, onnx manifest) for a real engine built from the tiny model."""
    trt = real_trt
    onnx_manifest, _ = tiny
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_manifest.artifact_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        pytest.fail(f"TensorRT cannot parse the tiny model: {errors}")
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)  # keep float32 matmuls exact enough for the parity check
    profile = builder.create_optimization_profile()
    for spec in onnx_manifest.inputs:
        profile.set_shape(spec.name, profile_dims(spec.shape, 1, 1), profile_dims(spec.shape, OPT_BATCH, OPT_NODES),
                          profile_dims(spec.shape, MAX_BATCH, MAX_NODES))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        pytest.fail("TensorRT failed to build the tiny engine (see its log)")
    engine = tmp_path_factory.mktemp("engine") / "model.engine"
    engine.write_bytes(bytes(serialized))
    return engine_manifest(onnx_manifest, engine), onnx_manifest


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_engine_matches_onnxruntime(real_engine, parking_lot, tiny):
    manifest, onnx_manifest = real_engine
    _, weights = tiny
    assert select_backend(manifest).name == "tensorrt"  # auto: an engine goes to native TensorRT
    with load_backend(manifest) as trt_run, load_backend(onnx_manifest, "onnxruntime", device="cpu") as ort_run:
        assert trt_run.name == "tensorrt"
        trt_run.warmup(OPT_NODES, batch=OPT_BATCH)
        # grow, shrink, grow again: buffers are reused and reallocated as the shapes change
        for batch, nodes in ((1, 1), (4, 8), (8, 16), (2, 3), (8, 16)):
            inputs = make_inputs(parking_lot, batch, nodes, seed=batch * 100 + nodes)
            got = trt_run.run(inputs)
            want = ort_run.run(inputs)
            for name in ("logits", "embedding"):
                assert got[name].shape == want[name].shape
                np.testing.assert_allclose(got[name], want[name], atol=1e-3, err_msg=f"{name} {batch}x{nodes}")
                np.testing.assert_allclose(got[name], reference_forward(inputs, weights)[name], atol=1e-3)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_engine_refuses_shapes_outside_its_profile_and_cpu(real_engine, parking_lot):
    manifest, _ = real_engine
    with load_backend(manifest, "tensorrt") as backend:
        with pytest.raises(AggregatorError, match="optimisation profile"):
            backend.run(make_inputs(parking_lot, MAX_BATCH + 1, 4))
        assert backend.run(make_inputs(parking_lot, 1, 2))["logits"].shape == (1, 5)  # still usable
    with pytest.raises(AggregatorError, match="not on 'cpu'"):
        load_backend(manifest, "tensorrt", device="cpu")


# =========================================================================== stand-ins
class _FakeDims(tuple):
    pass


class _FakeEngine:
    """Enough of ``trt.ICudaEngine`` for the backend: named I/O, dtypes, one optimisation profile."""

    def __init__(self, spec: dict, weights):
        self.spec = spec
        self.weights = weights
        self.io = [(n, "INPUT") for n in spec["inputs"]] + [(n, "OUTPUT") for n in spec["outputs"]]
        self.num_io_tensors = len(self.io)
        self.num_optimization_profiles = 1

    def get_tensor_name(self, index: int) -> str:
        return self.io[index][0]

    def get_tensor_mode(self, name: str):
        return dict(self.io)[name]

    def get_tensor_dtype(self, name: str) -> str:
        table = self.spec["inputs"] if name in self.spec["inputs"] else self.spec["outputs"]
        return table[name]["dtype"]

    def get_tensor_shape(self, name: str):
        entry = self.spec["inputs"][name]
        return _FakeDims(lo if lo == hi else -1 for lo, hi in zip(entry["min"], entry["max"], strict=True))

    def get_tensor_profile_shape(self, name: str, profile: int):
        assert profile == 0
        entry = self.spec["inputs"][name]
        return [_FakeDims(entry[k]) for k in ("min", "opt", "max")]

    def create_execution_context(self):
        return _FakeContext(self)


class _FakeContext:
    def __init__(self, engine: _FakeEngine):
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.executions = 0

    def set_input_shape(self, name: str, shape) -> bool:
        entry = self.engine.spec["inputs"][name]
        if not all(lo <= n <= hi for lo, n, hi in zip(entry["min"], shape, entry["max"], strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, pointer: int) -> None:
        assert isinstance(pointer, int) and pointer
        self.addresses[name] = pointer

    def get_tensor_shape(self, name: str):
        if len(self.shapes) < len(self.engine.spec["inputs"]):
            return _FakeDims((-1, self.engine.spec["outputs"][name]["width"]))
        batch = next(iter(self.shapes.values()))[0]
        return _FakeDims((batch, self.engine.spec["outputs"][name]["width"]))

    def execute_async_v3(self, stream: int) -> bool:
        assert isinstance(stream, int)
        inputs = {}
        for name, entry in self.engine.spec["inputs"].items():
            dtype = np.dtype(entry["dtype"])
            shape = self.shapes[name]
            buffer = (ctypes.c_uint8 * (int(np.prod(shape)) * dtype.itemsize)).from_address(self.addresses[name])
            inputs[name] = np.frombuffer(buffer, dtype=dtype).reshape(shape).astype(
                "int64" if dtype.kind == "i" else dtype)
        for name, value in reference_forward(inputs, self.engine.weights).items():
            value = np.ascontiguousarray(value.astype(self.engine.spec["outputs"][name]["dtype"]))
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        self.executions += 1
        return True


def _fake_tensorrt(weights) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = "10.3.0"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

    class Logger:
        WARNING = "warning"

        def __init__(self, severity):
            self.severity = severity

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, blob: bytes):
            try:
                spec = json.loads(blob)
            except ValueError:
                return None  # what TensorRT does with a foreign engine: None and a log line
            return _FakeEngine(spec, weights)

    trt.Logger, trt.Runtime = Logger, Runtime
    trt.nptype = lambda dtype: np.dtype(dtype).type
    return trt


class _FakeCudart(types.ModuleType):
    """cuda-python's runtime API over host memory: every call returns ``(err, *values)``."""

    OK = "cudaSuccess"

    def __init__(self):
        super().__init__("cuda.bindings.runtime")
        self.__spec__ = importlib.machinery.ModuleSpec("cuda.bindings.runtime", None)
        self.cudaError_t = types.SimpleNamespace(cudaSuccess=self.OK)
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h")
        self.live: dict[int, np.ndarray] = {}
        self.mallocs = 0
        self.streams: set[int] = set()

    def cudaGetErrorString(self, err):
        return self.OK, b"fake error"

    def cudaGetDevice(self):
        return self.OK, 0

    def cudaGetDeviceProperties(self, device):
        return self.OK, types.SimpleNamespace(name=b"Fake GPU\x00\x00")

    def cudaStreamCreate(self):
        self.streams.add(7)
        return self.OK, 7

    def cudaStreamSynchronize(self, stream):
        assert stream in self.streams
        return (self.OK,)

    def cudaStreamDestroy(self, stream):
        self.streams.discard(stream)
        return (self.OK,)

    def cudaMalloc(self, nbytes):
        memory = np.zeros(nbytes, dtype=np.uint8)
        self.live[memory.ctypes.data] = memory
        self.mallocs += 1
        return self.OK, memory.ctypes.data

    def cudaFree(self, pointer):
        del self.live[pointer]
        return (self.OK,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        device = dst if kind == "h2d" else src
        base = max(p for p in self.live if p <= device)
        assert device + nbytes <= base + self.live[base].nbytes, "copy past the end of a device buffer"
        ctypes.memmove(dst, src, nbytes)
        return (self.OK,)


def _engine_spec(manifest: ModelManifest, *, node_index_dtype: str = "int64", max_batch: int = MAX_BATCH) -> dict:
    inputs = {}
    for spec in manifest.inputs:
        dtype = node_index_dtype if spec.name == "node_index" else spec.dtype
        inputs[spec.name] = {"dtype": dtype, "min": profile_dims(spec.shape, 1, 1),
                             "opt": profile_dims(spec.shape, OPT_BATCH, OPT_NODES),
                             "max": profile_dims(spec.shape, max_batch, MAX_NODES)}
    outputs = {t.name: {"dtype": t.dtype, "width": t.shape[1]} for t in manifest.outputs}
    return {"inputs": inputs, "outputs": outputs}


@pytest.fixture
def fakes(monkeypatch, tiny):
    """Install the stand-ins as ``tensorrt`` and ``cuda.bindings.runtime``; return the fake cudart."""
    cudart = _FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(tiny[1]))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: cudart)
    return cudart


def _fake_engine_manifest(tiny, tmp_path, **spec_changes) -> ModelManifest:
    engine = tmp_path / "model.engine"
    engine.write_text(json.dumps(_engine_spec(tiny[0], **spec_changes)))
    return engine_manifest(tiny[0], engine)


def test_runner_matches_the_reference_while_buffers_grow_and_shrink(fakes, tiny, tmp_path, parking_lot):
    manifest = _fake_engine_manifest(tiny, tmp_path)
    assert select_backend(manifest).name == "tensorrt"
    with load_backend(manifest) as backend:
        assert isinstance(backend, trt_backend.TensorRTBackend)
        assert "cuda:0 Fake GPU (TensorRT 10.3.0)" in backend.describe()
        backend.warmup(OPT_NODES, batch=OPT_BATCH)
        for batch, nodes in ((1, 1), (4, 8), (8, 16), (2, 3), (1, 16)):
            inputs = make_inputs(parking_lot, batch, nodes, seed=batch + nodes)
            got = backend.run(inputs)
            want = reference_forward(inputs, tiny[1])
            for name in ("logits", "embedding"):
                np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)
        grown = fakes.mallocs
        backend.run(make_inputs(parking_lot, 2, 5))  # smaller than before: no new allocation
        assert fakes.mallocs == grown
        assert len(fakes.live) == len(tiny[0].inputs) + len(tiny[0].outputs)
    assert not fakes.live and not fakes.streams  # close() freed everything


def test_int32_node_index_engine_converts_and_guards_the_range(fakes, tiny, tmp_path, parking_lot):
    manifest = _fake_engine_manifest(tiny, tmp_path, node_index_dtype="int32")
    with load_backend(manifest, "tensorrt", device="cuda") as backend:
        inputs = make_inputs(parking_lot, 2, 4, seed=9)
        np.testing.assert_allclose(backend.run(inputs)["logits"], reference_forward(inputs, tiny[1])["logits"],
                                   rtol=1e-6, atol=1e-7)
        inputs["node_index"][0, 0] = 2**40
        with pytest.raises(AggregatorError, match="node_index.*int32"):
            backend.run(inputs)


def test_shapes_outside_the_profile_are_refused_clearly(fakes, tiny, tmp_path, parking_lot):
    manifest = _fake_engine_manifest(tiny, tmp_path, max_batch=2)
    with load_backend(manifest) as backend:
        with pytest.raises(AggregatorError, match=r"outside the engine's optimisation profile.*batch 3"):
            backend.run(make_inputs(parking_lot, 3, 4))
        assert backend.run(make_inputs(parking_lot, 2, 4))["logits"].shape == (2, 5)


def test_engine_and_manifest_must_agree(fakes, tiny, tmp_path):
    spec = _engine_spec(tiny[0])
    spec["inputs"]["where"] = spec["inputs"].pop("positions")
    engine = tmp_path / "renamed.engine"
    engine.write_text(json.dumps(spec))
    with pytest.raises(AggregatorError, match="do not match the manifest"):
        load_backend(engine_manifest(tiny[0], engine))

    spec = _engine_spec(tiny[0])
    spec["inputs"]["positions"]["dtype"] = "float16"
    engine = tmp_path / "half.engine"
    engine.write_text(json.dumps(spec))
    with pytest.raises(AggregatorError, match="positions.*float16"):
        load_backend(engine_manifest(tiny[0], engine))


def test_a_foreign_engine_is_refused_with_a_rebuild_hint(fakes, tiny, tmp_path):
    engine = tmp_path / "foreign.engine"
    engine.write_bytes(b"\x00built elsewhere")
    with pytest.raises(AggregatorError, match="cannot deserialize.*rebuild"):
        load_backend(engine_manifest(tiny[0], engine))


def test_wrong_device_and_wrong_artifact_are_refused(fakes, tiny, tmp_path):
    manifest = _fake_engine_manifest(tiny, tmp_path)
    with pytest.raises(AggregatorError, match="runs on cuda, not on 'cpu'"):
        load_backend(manifest, "tensorrt", device="cpu")
    with pytest.raises(AggregatorError, match="loads 'tensorrt' artifacts.*'onnx'"):
        load_backend(tiny[0], "tensorrt")  # an ONNX file is not handed to the engine runner
    with pytest.raises(AggregatorError, match="TensorRT engines"):
        trt_backend.TensorRTBackend(tiny[0])


def test_module_imports_and_explains_without_the_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # None in sys.modules makes the import fail
    with pytest.raises(AggregatorError, match="tensorrt Python package is not installed"):
        trt_backend.import_tensorrt()
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(AggregatorError, match="cuda-python is not installed"):
        trt_backend.import_cudart()
