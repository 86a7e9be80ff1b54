"""TensorRT engine builds (export/tensorrt_engine.py).

Three layers:

* pure Python, everywhere: profile shapes, node-range checks, the INT8-needs-Q/DQ check, paths, and the
  refusals that happen before TensorRT is imported;
* ``build_engine`` driven through a small stand-in ``tensorrt`` module that records what it is asked
  (flags, profile, memory pool, timing cache), so the build flow is checked on machines without a GPU;
  it checks this module's use of the API, not TensorRT itself;
* ``test_real_*`` (markers ``tensorrt`` and ``gpu``): real FP16 and INT8 engines from the tiny model,
  run through the aggregator's TensorRT backend and compared with ONNX Runtime. They skip with a reason
  where tensorrt, cuda-python or a GPU is missing (``scripts/gpu_check.sh`` runs them).
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import json
import os
import shutil
import stat
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.errors import AggregatorError
from export import tensorrt_engine as te
from export.errors import ExportError
from export.formats import export_format
from export.manifests import derive_manifest, manifest_path_for
from spar_wire.model_manifest import ModelManifest, TensorSpec, load_manifest
from testbed.tiny_onnx_model import build_tiny_model, make_inputs

MAX_NODES = 16


@pytest.fixture(scope="module")
def tiny(parking_lot, tmp_path_factory) -> ModelManifest:
    """The tiny float model (``model.onnx`` + ``manifest.json``), node_range [1, 16]."""
    return build_tiny_model(parking_lot, tmp_path_factory.mktemp("tiny_engine"), max_nodes=MAX_NODES)


@pytest.fixture(scope="module")
def qdq(tiny, parking_lot) -> ModelManifest:
    """The tiny model quantized as TensorRT wants it: Q/DQ, symmetric signed INT8 (ONNX Runtime's
    quantize_static), with its manifest (precision int8)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Windows(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([make_inputs(parking_lot, 2, n, seed=n) for n in (3, 8, MAX_NODES)])

        def get_next(self):
            return next(self.batches, None)

    path = tiny.artifact_path.with_name("model.int8.onnx")
    quantize_static(str(tiny.artifact_path), str(path), Windows(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    manifest = derive_manifest(tiny, path, artifact_format="onnx", precision="int8")
    manifest.write(manifest_path_for(path))
    return load_manifest(manifest_path_for(path))


def _q_dq_graph(path: Path, zero_point: np.ndarray | None) -> Path:
    """x -> QuantizeLinear -> DequantizeLinear -> y, with the given zero point (None: no zero point)."""
    inits = [numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale")]
    q_inputs = ["x", "scale"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(zero_point, "zp"))
        q_inputs.append("zp")
    nodes = [helper.make_node("QuantizeLinear", q_inputs, ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", *q_inputs[1:]], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


# =========================================================================== profile shapes
def test_profile_replaces_batch_and_nodes_and_keeps_static_dims(tiny):
    shapes = te.profile_shapes(tiny, te.EngineSpec(batch=(1, 4, 8), site_nodes=5))
    assert set(shapes) == {t.name for t in tiny.inputs}
    assert shapes["positions"] == ((1, 1, 2), (4, 5, 2), (8, MAX_NODES, 2))
    assert shapes["node_index"] == ((1, 1), (4, 5), (8, MAX_NODES))
    assert shapes["present_microphone"] == ((1, 1), (4, 5), (8, MAX_NODES))
    n_tokens, token_dim = next(t.shape[2:] for t in tiny.inputs if t.name == "tokens_microphone")
    assert shapes["tokens_microphone"] == ((1, 1, n_tokens, token_dim), (4, 5, n_tokens, token_dim),
                                           (8, MAX_NODES, n_tokens, token_dim))


def test_profile_defaults_to_the_manifest_node_range_and_keeps_fully_static_inputs(tiny):
    manifest = dataclasses.replace(tiny, inputs=(*tiny.inputs, TensorSpec("calibration", "float32", (3, 7))))
    shapes = te.profile_shapes(manifest, te.EngineSpec())
    assert shapes["node_index"] == ((1, 1), (1, MAX_NODES), (8, MAX_NODES))  # opt = top of the range
    assert shapes["calibration"] == ((3, 7), (3, 7), (3, 7))


def test_explicit_node_range_inside_the_manifest_is_used(tiny):
    shapes = te.profile_shapes(tiny, te.EngineSpec(nodes=(2, 6, 12), site_nodes=9))  # nodes wins
    assert shapes["node_index"] == ((1, 2), (1, 6), (8, 12))
    assert te.node_profile(tiny, te.EngineSpec(nodes=(2, 6, 12))) == (2, 6, 12)


@pytest.mark.parametrize("spec, message", [
    (te.EngineSpec(nodes=(1, 8, MAX_NODES + 1)), r"outside the model's node_range \[1, 16\]"),
    (te.EngineSpec(site_nodes=MAX_NODES + 4), r"20 nodes, outside the model's node_range"),
])
def test_node_ranges_outside_the_manifest_are_refused(tiny, spec, message):
    with pytest.raises(ExportError, match=message):
        te.profile_shapes(tiny, spec)


def test_refused_node_range_when_the_manifest_starts_higher(tiny):
    manifest = dataclasses.replace(tiny, node_range=(4, 16))
    with pytest.raises(ExportError, match=r"1\.\.16 is outside the model's node_range \[4, 16\]"):
        te.profile_shapes(manifest, te.EngineSpec(nodes=(1, 8, 16)))


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "int4"}, "precision must be one of"),
    ({"batch": (2, 1, 8)}, "1 <= min <= opt <= max"),
    ({"batch": (0, 1, 8)}, "1 <= min <= opt <= max"),
    ({"nodes": (1, 8)}, "three integers"),
    ({"workspace_mib": 0}, "workspace_mib"),
    ({"site_nodes": 0}, "site_nodes"),
])
def test_engine_spec_is_validated(kwargs, message):
    with pytest.raises(ExportError, match=message):
        te.EngineSpec(**kwargs)


# =========================================================================== Q/DQ check
def test_float_graph_is_not_qdq_and_int8_needs_the_quantize_step(tiny):
    report = te.qdq_report(tiny.artifact_path)
    assert (report.quantize, report.dequantize, report.is_qdq) == (0, 0, False)
    with pytest.raises(ExportError, match=r"no QuantizeLinear nodes.*spar-export quantize"):
        te.require_qdq(tiny.artifact_path)


def test_symmetric_int8_qdq_graph_passes(qdq):
    report = te.require_qdq(qdq.artifact_path)
    assert report.quantize > 0 and report.dequantize >= report.quantize and not report.problems


@pytest.mark.parametrize("zero_point, problem", [
    (np.array(128, dtype=np.uint8), "zero point type uint8"),
    (np.array(3, dtype=np.int8), "nonzero zero point"),
    (None, "no zero point"),
])
def test_qdq_graphs_tensorrt_cannot_take_are_refused(tmp_path, zero_point, problem):
    path = _q_dq_graph(tmp_path / "q.onnx", zero_point)
    assert te.qdq_report(path).is_qdq
    with pytest.raises(ExportError, match=f"{problem}.*symmetric signed INT8"):
        te.require_qdq(path)


def test_crafted_int8_zero_point_graph_passes(tmp_path):
    report = te.require_qdq(_q_dq_graph(tmp_path / "q.onnx", np.array(0, dtype=np.int8)))
    assert (report.quantize, report.dequantize) == (1, 1)


# =========================================================================== refusals before TensorRT
def test_int8_build_of_a_float_graph_is_refused_before_tensorrt(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # proves the refusal needs no TensorRT
    with pytest.raises(ExportError, match="spar-export quantize"):
        te.build_engine(tiny.artifact_path, tmp_path / "m.engine", te.EngineSpec(precision="int8"))


def test_fp16_build_of_a_qdq_graph_is_refused(qdq, tmp_path):
    with pytest.raises(ExportError, match="Q/DQ .*precision int8"):
        te.build_engine(qdq.artifact_path, tmp_path / "m.engine", te.EngineSpec(precision="fp16"))


def test_manifest_must_describe_the_onnx(tiny, tmp_path):
    other = tmp_path / "other.onnx"
    other.write_bytes(tiny.artifact_path.read_bytes() + b"\x00")
    with pytest.raises(ExportError, match="no manifest for"):
        te.build_engine(other, tmp_path / "m.engine")
    with pytest.raises(ExportError, match="does not describe"):
        te.build_engine(other, tmp_path / "m.engine", manifest=tiny)


def test_engine_files_may_not_overwrite_the_source(qdq):
    # model.int8.onnx and model.int8.engine would share model.int8.manifest.json
    with pytest.raises(ExportError, match="would overwrite"):
        te.build_engine(qdq.artifact_path, qdq.artifact_path.with_suffix(".engine"), te.EngineSpec(precision="int8"))
    with pytest.raises(ExportError, match="use .engine or .plan"):
        te.build_engine(qdq.artifact_path, qdq.artifact_path.with_name("x.onnx"), te.EngineSpec(precision="int8"))


def test_engine_and_record_names():
    assert te.default_engine_path("m/model.onnx", "fp16") == Path("m/model.fp16.trt.engine")
    assert te.default_engine_path("m/model.int8.onnx", "int8") == Path("m/model.int8.trt.engine")
    assert te.build_info_path("m/model.fp16.trt.engine") == Path("m/model.fp16.trt.build.json")
    assert manifest_path_for(Path("m/model.int8.trt.engine")) != manifest_path_for(Path("m/model.int8.onnx"))


def test_engine_summary_needs_a_record(tmp_path):
    with pytest.raises(ExportError, match="no build record"):
        te.engine_summary(tmp_path / "missing.engine")
    (tmp_path / "x.build.json").write_text("{}")
    with pytest.raises(ExportError, match="not a spar-trt-build record"):
        te.engine_summary(tmp_path / "x.build.json")


# =========================================================================== without tensorrt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_missing_tensorrt_says_how_to_install_it(tiny, tmp_path):
    with pytest.raises(ExportError, match=r"tensorrt Python package.*pip install 'tensorrt>=10,<11'"):
        te.build_engine(tiny.artifact_path, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_unimportable_tensorrt_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # None in sys.modules makes the import fail
    with pytest.raises(ExportError, match="JetPack"):
        te.import_tensorrt()


# =========================================================================== stand-in tensorrt
class _Error:
    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text


class _FakeNetwork:
    def __init__(self, flags: int):
        self.flags = flags
        self.inputs: list[types.SimpleNamespace] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int):
        return self.inputs[index]


class _FakeParser:
    errors: list[str] = []  # set by a test to make parsing fail

    def __init__(self, network: _FakeNetwork, logger):
        self.network, self.logger, self.num_errors = network, logger, 0

    def parse_from_file(self, path: str) -> bool:
        if self.errors:
            self.num_errors = len(self.errors)
            return False
        for value in onnx.load(path).graph.input:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
            self.network.inputs.append(types.SimpleNamespace(name=value.name, shape=dims))
        return True

    def get_error(self, index: int) -> _Error:
        return _Error(f"In node {index} (parse): UNSUPPORTED_NODE: {self.errors[index]}")


class _FakeProfile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, min, opt, max):  # noqa: A002 - TensorRT's keyword names
        if not all(0 <= a <= b <= c for a, b, c in zip(min, opt, max, strict=True)):
            raise ValueError("min <= opt <= max violated")
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class _FakeCache:
    def __init__(self, blob: bytes):
        self.blob = bytes(blob)

    def serialize(self) -> bytes:
        return b"timings:" + str(len(self.blob)).encode()


class _FakeConfig:
    def __init__(self):
        self.flags: set[str] = {"TF32"}  # TF32 is on by default
        self.pools: dict[str, int] = {}
        self.profiles: list[_FakeProfile] = []
        self.cache: _FakeCache | None = None

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def set_memory_pool_limit(self, pool, pool_size):
        self.pools[pool] = pool_size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob):
        return _FakeCache(blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.blob.startswith(b"foreign"):
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


def _fake_tensorrt(version: str = "10.8.0", *, fp16_flag: bool = True, fail_build: bool = False):
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version
    trt.built = []  # (network, config) of every build

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR="internal", ERROR="error", WARNING="warning",
                                         INFO="info", VERBOSE="verbose")

        def __init__(self):
            pass

    class Builder:
        def __init__(self, logger):
            assert isinstance(logger, ILogger)
            self.logger = logger

        def create_network(self, flags=0):
            return _FakeNetwork(flags)

        def create_builder_config(self):
            return _FakeConfig()

        def create_optimization_profile(self):
            return _FakeProfile()

        def build_serialized_network(self, network, config):
            trt.built.append((network, config))
            if fail_build:
                self.logger.log(ILogger.Severity.ERROR, "out of workspace")
                return None
            return json.dumps({"flags": sorted(config.flags), "profile": config.profiles[0].shapes}).encode()

    flags = {"INT8": "INT8", "TF32": "TF32"} | ({"FP16": "FP16"} if fp16_flag else {})
    trt.ILogger, trt.Builder, trt.OnnxParser = ILogger, Builder, _FakeParser
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    trt = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(_FakeParser, "errors", [])
    return trt


def test_default_build_writes_the_files_of_the_formats_table(fake_trt, tiny, tmp_path):
    """Without ``--out``, an fp16 build beside ``model.onnx`` writes exactly the ``engine-fp16`` row's
    files (export.formats); the engine keeps its temporary file's mode (0600), as it always had."""
    folder = tmp_path / "model"
    folder.mkdir()
    for path in (tiny.artifact_path, manifest_path_for(tiny.artifact_path)):
        shutil.copyfile(path, folder / path.name)
    source = folder / tiny.artifact_path.name
    out = te.build_engine(source, None, te.EngineSpec(precision="fp16"))
    row = export_format("engine-fp16")
    assert out.name == row.file
    assert sorted(os.listdir(folder)) == sorted([source.name, manifest_path_for(source).name, *row.files])
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_fp16_build_writes_engine_manifest_and_record(fake_trt, tiny, tmp_path):
    out = tmp_path / "engines" / "tiny.engine"
    cache = tmp_path / "timing.cache"
    spec = te.EngineSpec(precision="fp16", batch=(1, 4, 8), site_nodes=6, workspace_mib=64, timing_cache=cache)
    assert te.build_engine(tiny.artifact_path, out, spec) == out
    network, config = fake_trt.built[-1]
    assert network.flags == 0  # weakly typed: FP16 is a builder flag
    assert config.flags == {"FP16", "TF32"}
    assert config.pools == {"workspace": 64 << 20}
    assert config.profiles[0].shapes == te.profile_shapes(tiny, spec)
    assert cache.read_bytes() == b"timings:0"

    manifest = load_manifest(out.with_name("tiny.manifest.json"))
    manifest.verify_artifact()  # sha256 of the engine
    assert (manifest.artifact_format, manifest.precision, manifest.node_range) == ("tensorrt", "fp16", (1, 16))
    assert manifest.inputs == tiny.inputs and manifest.outputs == tiny.outputs
    summary = te.engine_summary(out)
    assert summary["engine_matches"] and summary["tensorrt_version"] == "10.8.0"
    assert summary["node_range"] == [1, 6, 16] and summary["batch_range"] == [1, 4, 8]
    assert summary["profile"]["positions"] == {"min": [1, 1, 2], "opt": [4, 6, 2], "max": [8, 16, 2]}
    assert summary["timing_cache_reused"] is False and summary["build_seconds"] >= 0
    assert te.engine_summary(te.build_info_path(out)) == summary

    te.build_engine(tiny.artifact_path, out, spec)  # the saved cache is loaded the second time
    assert fake_trt.built[-1][1].cache.blob == b"timings:0"
    assert te.engine_summary(out)["timing_cache_reused"] is True
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.build.json", "tiny.engine", "tiny.manifest.json"]


def test_int8_build_is_strongly_typed_without_precision_flags(fake_trt, qdq, tmp_path):
    out = te.build_engine(qdq.artifact_path, spec=te.EngineSpec(precision="int8", nodes=(2, 8, 12)))
    assert out == qdq.artifact_path.with_name("model.int8.trt.engine")
    network, config = fake_trt.built[-1]
    assert network.flags == 1 << 1 and config.flags == {"TF32"}
    manifest = load_manifest(manifest_path_for(out))
    assert (manifest.precision, manifest.node_range) == ("int8", (2, 12))
    assert te.engine_summary(out)["strongly_typed"] is True


def test_fp32_build_clears_tf32(fake_trt, tiny, tmp_path):
    te.build_engine(tiny.artifact_path, tmp_path / "f.engine", te.EngineSpec(precision="fp32"))
    assert fake_trt.built[-1][1].flags == set()


def test_every_parser_error_is_reported(fake_trt, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(_FakeParser, "errors", ["op A unsupported", "op B unsupported"])
    with pytest.raises(ExportError, match=r"cannot parse .*2 error") as caught:
        te.build_engine(tiny.artifact_path, tmp_path / "m.engine")
    assert str(caught.value).splitlines()[1:] == ["  In node 0 (parse): UNSUPPORTED_NODE: op A unsupported",
                                                  "  In node 1 (parse): UNSUPPORTED_NODE: op B unsupported"]
    assert not list(tmp_path.iterdir())


def test_failed_build_quotes_tensorrt_and_writes_nothing(monkeypatch, tiny, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(fail_build=True))
    with pytest.raises(ExportError, match="failed to build the fp16 engine.*out of workspace"):
        te.build_engine(tiny.artifact_path, tmp_path / "m.engine")
    assert not list(tmp_path.iterdir())


def test_foreign_timing_cache_is_replaced(fake_trt, tiny, tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"foreign gpu")
    te.build_engine(tiny.artifact_path, tmp_path / "m.engine", te.EngineSpec(timing_cache=cache))
    assert fake_trt.built[-1][1].cache.blob == b"" and cache.read_bytes() == b"timings:0"


@pytest.mark.parametrize("trt, message", [
    (_fake_tensorrt("11.0.0", fp16_flag=False), "no BuilderFlag.FP16"),
    (_fake_tensorrt("8.6.1"), "TensorRT 8.6.1 is too old"),
])
def test_tensorrt_versions_without_this_path_are_refused(monkeypatch, tiny, tmp_path, trt, message):
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(ExportError, match=message):
        te.build_engine(tiny.artifact_path, tmp_path / "m.engine")


def test_graph_and_manifest_inputs_must_agree(fake_trt, tiny, tmp_path):
    renamed = dataclasses.replace(tiny, inputs=tuple(dataclasses.replace(t, name="where") if t.name == "positions"
                                                     else t for t in tiny.inputs))
    with pytest.raises(ExportError, match="differ from the manifest"):
        te.build_engine(tiny.artifact_path, tmp_path / "m.engine", manifest=renamed)
    wider = dataclasses.replace(tiny, inputs=tuple(dataclasses.replace(t, shape=("batch", "nodes", 3))
                                                   if t.name == "positions" else t for t in tiny.inputs))
    with pytest.raises(ExportError, match="'positions' has shape"):
        te.build_engine(tiny.artifact_path, tmp_path / "m.engine", manifest=wider)


# =========================================================================== real TensorRT on a GPU
REAL_SHAPES = ((1, 1), (4, 8), (8, MAX_NODES), (2, 3))


def _compare(engine: Path, reference: ModelManifest, parking_lot, *, atol: float, rtol: float) -> float:
    """Worst |engine - ONNX Runtime| over REAL_SHAPES; asserts the tolerance per output."""
    from edge_runtime.inference import load_backend

    worst = 0.0
    with load_backend(load_manifest(manifest_path_for(engine)), "tensorrt") as trt_run, \
            load_backend(reference, "onnxruntime", device="cpu") as ort_run:
        assert trt_run.name == "tensorrt"
        for batch, nodes in REAL_SHAPES:
            inputs = make_inputs(parking_lot, batch, nodes, seed=batch * 100 + nodes)
            got, want = trt_run.run(inputs), ort_run.run(inputs)
            for name in ("logits", "embedding"):
                assert got[name].shape == want[name].shape
                np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol,
                                           err_msg=f"{engine.name} {name} batch {batch} nodes {nodes}")
                worst = max(worst, float(np.abs(got[name] - want[name]).max()))
    return worst


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_fp16_engine_matches_onnxruntime(real_trt, tiny, parking_lot, tmp_path):
    if not hasattr(real_trt.BuilderFlag, "FP16"):
        pytest.skip(f"TensorRT {real_trt.__version__} has no FP16 builder flag (strongly typed only)")
    cache = tmp_path / "timing.cache"
    engine = te.build_engine(tiny.artifact_path, tmp_path / "tiny.fp16.engine",
                             te.EngineSpec(precision="fp16", batch=(1, 4, 8), site_nodes=8, timing_cache=cache))
    summary = te.engine_summary(engine)
    assert summary["engine_matches"] and summary["gpu"] and summary["tensorrt_version"] == real_trt.__version__
    assert cache.stat().st_size > 0
    # FP16 arithmetic on O(1) outputs: 1e-2 relative plus 1e-2 absolute
    _compare(engine, tiny, parking_lot, rtol=1e-2, atol=1e-2)

    from edge_runtime.inference import load_backend

    with load_backend(load_manifest(manifest_path_for(engine))) as backend:
        with pytest.raises(AggregatorError, match="optimisation profile"):
            backend.run(make_inputs(parking_lot, 9, 4))


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_int8_engine_matches_onnxruntime(real_trt, tiny, qdq, parking_lot, tmp_path):
    engine = te.build_engine(qdq.artifact_path, tmp_path / "tiny.int8.engine",
                             te.EngineSpec(precision="int8", batch=(1, 4, 8), site_nodes=8))
    assert te.engine_summary(engine)["strongly_typed"] is True
    # Against ONNX Runtime running the same Q/DQ graph: TensorRT fuses and moves Q/DQ pairs, so values can
    # land one INT8 step apart; outputs are O(1) with scales ~1e-2, hence 0.1 absolute.
    _compare(engine, qdq, parking_lot, rtol=0.0, atol=0.1)
    # Against the float model: the quantization error itself (ONNX Runtime's Q/DQ run is ~0.06 off on CPU).
    _compare(engine, tiny, parking_lot, rtol=0.0, atol=0.15)
