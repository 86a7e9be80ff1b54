"""ONNX Runtime backend and backend selection, on the tiny ONNX model of testbed/tiny_onnx_model.py."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.errors import AggregatorError
from edge_runtime.inference import (
    BACKEND_NAMES,
    BACKENDS,
    PREFERENCES,
    BackendOptions,
    InferenceBackend,
    backend_table_markdown,
    load_backend,
    select_backend,
)
from edge_runtime.inference.onnxruntime_backend import (
    CPU_EP,
    CUDA_EP,
    TENSORRT_EP,
    OnnxRuntimeBackend,
    choose_providers,
)
from spar_wire.model_manifest import ARTIFACT_FORMATS, TensorSpec, load_manifest
from testbed.tiny_onnx_model import (
    build_tiny_model,
    class_names,
    make_inputs,
    reference_forward,
    tiny_weights,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(parking_lot, tmp_path_factory):
    """(manifest, weights) of a tiny model for the parking lot (two modalities, 2-D positions)."""
    manifest = build_tiny_model(parking_lot, tmp_path_factory.mktemp("tiny"), max_nodes=16)
    return manifest, tiny_weights(parking_lot)


@pytest.fixture(scope="module")
def backend(tiny):
    with load_backend(tiny[0], "onnxruntime", device="cpu") as loaded:
        yield loaded


# --------------------------------------------------------------------------- the tiny model
def test_manifest_follows_the_input_convention(tiny, parking_lot):
    manifest, _ = tiny
    names = [t.name for t in manifest.inputs]
    assert names == ["tokens_microphone", "present_microphone", "tokens_geophone", "present_geophone",
                     "positions", "node_index"]
    assert manifest.inputs[0].shape == ("batch", "nodes", 32, 128)
    assert manifest.modalities["geophone"].feature_hash == parking_lot.modalities["geophone"].features.hash
    assert [(t.name, t.kind, t.shape) for t in manifest.outputs] == [
        ("logits", "class_logits", ("batch", 5)), ("embedding", "raw", ("batch", 16))]
    assert manifest.class_names == ("none", "motorcycle", "car", "van", "truck")
    assert manifest.node_range == (1, 16)
    manifest.verify_artifact()


def test_class_names_pad_beyond_the_defaults():
    assert class_names(2) == ("none", "motorcycle")
    assert class_names(7) == ("none", "motorcycle", "car", "van", "truck", "c5", "c6")


# --------------------------------------------------------------------------- parity
def test_parity_with_the_numpy_reference_for_several_batches_and_node_counts(backend, tiny, parking_lot):
    _, weights = tiny
    for batch in (1, 4):
        for n_nodes in (1, 8, 16):  # one session: the batch and node axes are dynamic
            inputs = make_inputs(parking_lot, batch, n_nodes, seed=10 * batch + n_nodes)
            outputs = backend.run(inputs)
            expected = reference_forward(inputs, weights)
            assert list(outputs) == ["logits", "embedding"]
            for name in ("logits", "embedding"):
                assert outputs[name].shape == expected[name].shape
                assert outputs[name].dtype == np.float32
                np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{name} batch {batch} nodes {n_nodes}")


def test_every_input_matters(backend, parking_lot):
    inputs = make_inputs(parking_lot, 2, 6, seed=3)
    inputs["present_microphone"][:] = True  # so that every node's values count
    inputs["present_geophone"][:] = True
    base = backend.run(inputs)["logits"]
    for name in inputs:
        changed = {k: v.copy() for k, v in inputs.items()}
        if changed[name].dtype == bool:
            changed[name][:, 0] = False
        elif name == "node_index":
            changed[name] += 1
        else:
            changed[name] += 0.5
        assert not np.allclose(backend.run(changed)["logits"], base), f"{name} does not change the output"


def test_masked_nodes_do_not_change_the_result(backend, parking_lot):
    inputs = make_inputs(parking_lot, 3, 8, seed=5)
    inputs["present_microphone"][:, 2] = False
    inputs["present_geophone"][:, 2] = False
    inputs["present_geophone"][:, 5] = False
    base = backend.run(inputs)
    changed = {k: v.copy() for k, v in inputs.items()}
    changed["tokens_microphone"][:, 2] = 1e3
    changed["tokens_geophone"][:, [2, 5]] = -7.0
    changed["positions"][:, 2] = 99.0  # absent from every modality: its position is masked too
    after = backend.run(changed)
    for name in base:
        np.testing.assert_array_equal(after[name], base[name])


def test_a_sample_with_no_node_present_gives_finite_output(backend, parking_lot):
    inputs = make_inputs(parking_lot, 2, 4, seed=6)
    inputs["present_microphone"][0] = False
    inputs["present_geophone"][0] = False
    outputs = backend.run(inputs)
    assert np.isfinite(outputs["logits"]).all()


# --------------------------------------------------------------------------- input checks
def _bad_input_cases(parking_lot):
    good = make_inputs(parking_lot, 2, 4, seed=1)

    def edit(fn):
        inputs = {k: v.copy() for k, v in good.items()}
        fn(inputs)
        return inputs

    return {
        "renamed": (edit(lambda d: d.update(tokens_mic=d.pop("tokens_microphone"))), ["tokens_mic",
                                                                                      "tokens_microphone"]),
        "missing": (edit(lambda d: d.pop("node_index")), ["node_index"]),
        "dtype": (edit(lambda d: d.update(positions=d["positions"].astype(np.float64))),
                  ["positions", "float64"]),
        "bool as int": (edit(lambda d: d.update(present_geophone=d["present_geophone"].astype(np.int64))),
                        ["present_geophone", "bool"]),
        "token dim": (edit(lambda d: d.update(tokens_geophone=d["tokens_geophone"][..., :31].copy())),
                      ["tokens_geophone", "32"]),
        "rank": (edit(lambda d: d.update(node_index=d["node_index"][0].copy())), ["node_index"]),
        "node count disagrees": (edit(lambda d: d.update(positions=d["positions"][:, :3].copy())),
                                 ["positions", "nodes"]),
        "batch disagrees": (edit(lambda d: d.update(present_microphone=d["present_microphone"][:1].copy())),
                            ["present_microphone", "batch"]),
        "not an array": (edit(lambda d: d.update(node_index=d["node_index"].tolist())), ["node_index"]),
    }


@pytest.mark.parametrize("case", ["renamed", "missing", "dtype", "bool as int", "token dim", "rank",
                                  "node count disagrees", "batch disagrees", "not an array"])
def test_bad_inputs_are_refused_naming_the_input(backend, parking_lot, case):
    inputs, words = _bad_input_cases(parking_lot)[case]
    with pytest.raises(AggregatorError) as info:
        backend.run(inputs)
    for word in words:
        assert word in str(info.value)


def test_node_count_outside_the_manifest_range_is_refused(backend, parking_lot):
    with pytest.raises(AggregatorError, match=r"17 nodes is outside the model's node range \[1, 16\]"):
        backend.run(make_inputs(parking_lot, 1, 17))


# --------------------------------------------------------------------------- loading
def test_a_wrong_sha256_is_refused(tiny):
    manifest, _ = tiny
    bad = dataclasses.replace(manifest, sha256="0" * 64)
    with pytest.raises(AggregatorError, match="refused.*sha256"):
        load_backend(bad)
    with pytest.raises(AggregatorError, match="refused.*sha256"):
        OnnxRuntimeBackend(bad)


def test_a_missing_artifact_is_refused(tiny):
    manifest, _ = tiny
    with pytest.raises(AggregatorError, match="refused"):
        load_backend(dataclasses.replace(manifest, artifact_file="nothing.onnx"))


def test_a_manifest_that_does_not_match_the_model_is_refused(tiny):
    manifest, _ = tiny
    inputs = tuple(dataclasses.replace(t, name="where") if t.name == "positions" else t
                   for t in manifest.inputs)
    with pytest.raises(AggregatorError, match="positions.*where|where.*positions"):
        load_backend(dataclasses.replace(manifest, inputs=inputs))
    fixed_batch = tuple(dataclasses.replace(t, shape=(1, "nodes")) if t.name == "node_index" else t
                        for t in manifest.inputs)
    # the model's batch axis is symbolic, a fixed manifest batch is a narrowing the model accepts
    with load_backend(dataclasses.replace(manifest, inputs=fixed_batch)):
        pass
    wrong_dtype = tuple(dataclasses.replace(t, dtype="int32") if t.name == "node_index" else t
                        for t in manifest.inputs)
    with pytest.raises(AggregatorError, match="node_index.*int64"):
        load_backend(dataclasses.replace(manifest, inputs=wrong_dtype))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_explicit_tensorrt_without_the_package_says_so(tiny):
    manifest, _ = tiny
    with pytest.raises(AggregatorError, match="tensorrt.*not installed") as info:
        load_backend(manifest, "tensorrt")
    assert "onnx" in str(info.value)  # and why it would not fit anyway: it loads engines, not ONNX


def test_a_tensorrt_manifest_without_tensorrt_is_refused_not_rerouted(tiny, tmp_path):
    manifest, _ = tiny
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    trt_manifest = dataclasses.replace(manifest, artifact_file=engine.name, artifact_format="tensorrt",
                                       sha256=hashlib.sha256(engine.read_bytes()).hexdigest(),
                                       source=str(tmp_path / "manifest.json"))
    with pytest.raises(AggregatorError, match="onnx"):
        load_backend(trt_manifest, "onnxruntime")
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(AggregatorError, match="tensorrt.*not installed"):
            load_backend(trt_manifest)  # auto never hands an engine file to ONNX Runtime


def test_auto_picks_the_best_available_provider(tiny):
    manifest, _ = tiny
    available = ort.get_available_providers()
    with load_backend(manifest) as loaded:
        assert isinstance(loaded, OnnxRuntimeBackend)
        best = next(p for p in (TENSORRT_EP, CUDA_EP, CPU_EP) if p in available)
        assert loaded.providers[0] == best
        if CUDA_EP not in available and TENSORRT_EP not in available:  # this machine: CPU only
            assert loaded.providers == (CPU_EP,)
        assert "onnxruntime" in loaded.describe() and manifest.name in loaded.describe()


@pytest.mark.skipif(CUDA_EP in ort.get_available_providers(), reason="CUDA provider available here")
def test_explicit_gpu_device_without_a_gpu_provider_is_an_error(tiny):
    manifest, _ = tiny
    for device in ("cuda", "tensorrt"):
        with pytest.raises(AggregatorError, match=f"device '{device}' needs"):
            load_backend(manifest, "onnxruntime", device=device)


def test_provider_choice_follows_the_priority_and_never_rewrites_an_explicit_device():
    everything = [CPU_EP, CUDA_EP, TENSORRT_EP, "AzureExecutionProvider"]
    assert choose_providers("auto", everything) == [TENSORRT_EP, CUDA_EP, CPU_EP]
    assert choose_providers("auto", [CUDA_EP, CPU_EP]) == [CUDA_EP, CPU_EP]
    assert choose_providers("auto", [CPU_EP]) == [CPU_EP]
    assert choose_providers("cuda", everything) == [CUDA_EP, CPU_EP]
    assert choose_providers("cpu", everything) == [CPU_EP]
    assert choose_providers("tensorrt", everything) == [TENSORRT_EP, CUDA_EP, CPU_EP]
    with pytest.raises(AggregatorError, match="TensorrtExecutionProvider"):
        choose_providers("tensorrt", [CUDA_EP, CPU_EP])
    with pytest.raises(AggregatorError, match="CUDAExecutionProvider"):
        choose_providers("cuda", [CPU_EP])


def test_unknown_preference_or_device_lists_the_choices(tiny):
    manifest, _ = tiny
    with pytest.raises(AggregatorError, match="auto, tensorrt, onnxruntime"):
        load_backend(manifest, "openvino")
    with pytest.raises(AggregatorError, match="unknown inference device 'tpu'"):
        load_backend(manifest, device="tpu")


def test_threads_are_configurable(tiny):
    manifest, _ = tiny
    with load_backend(manifest, "onnxruntime", options=BackendOptions(intra_op_threads=1)) as loaded:
        assert loaded.intra_op_threads == 1
        assert "intra-op threads 1" in loaded.describe()
    with pytest.raises(AggregatorError, match="intra_op_threads"):
        load_backend(manifest, options=BackendOptions(intra_op_threads=0))


# --------------------------------------------------------------------------- the table
def test_the_table_lists_every_backend_load_backend_accepts(tiny):
    manifest, _ = tiny
    assert PREFERENCES == ("auto", *BACKEND_NAMES)
    assert len(set(BACKEND_NAMES)) == len(BACKEND_NAMES)
    assert {b.artifact_format for b in BACKENDS} == set(ARTIFACT_FORMATS)
    markdown = backend_table_markdown()
    for info in BACKENDS:
        assert f"`{info.name}`" in markdown
        assert issubclass(info.load_class(), InferenceBackend)  # importable without its packages
        assert info.load_class().name == info.name
        assert len(info.packages) == len(info.imports)
        # accepted as a preference: it either loads or explains why it cannot, never "unknown"
        try:
            select_backend(manifest, info.name)
        except AggregatorError as exc:
            assert "unknown" not in str(exc)
    with pytest.raises(AggregatorError, match="unknown"):
        select_backend(manifest, "nonesuch")


def test_importing_the_package_loads_no_engine():
    code = ("import sys, edge_runtime.inference, edge_runtime.inference.tensorrt_backend; "
            "bad = sorted(m for m in ('onnxruntime', 'tensorrt', 'torch', 'train') if m in sys.modules); "
            "sys.exit(f'loaded {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr + result.stdout


# --------------------------------------------------------------------------- lifecycle
def test_warmup_runs_and_checks_its_size(backend):
    assert backend.warmup(8) > 0
    assert backend.warmup(16, batch=4) > 0
    with pytest.raises(AggregatorError, match="node range"):
        backend.warmup(17)


def test_specs_and_close(tiny):
    manifest, _ = tiny
    loaded = load_backend(manifest)
    assert loaded.input_specs == manifest.inputs
    assert all(isinstance(t, TensorSpec) for t in loaded.input_specs)
    assert loaded.output_names == ("logits", "embedding")
    loaded.close()
    loaded.close()  # twice is fine
    with pytest.raises(AggregatorError, match="closed"):
        loaded.warmup(1)


def test_the_written_manifest_round_trips(tiny):
    manifest, _ = tiny
    assert load_manifest(manifest.source) == manifest


def test_denormals_are_flushed_to_zero_only_when_asked(tiny):
    """Masked attention on windows with absent nodes yields denormals, ~5x slower on a CPU: the
    aggregator's process flushes them (issue 20). ORT changes the floating-point mode of the thread
    that creates the session, so the flushing one is made in a thread of its own here."""
    import threading

    from edge_runtime.inference import BackendOptions

    entries = {}

    def load(flush):
        with load_backend(tiny[0], "onnxruntime", device="cpu", options=BackendOptions(flush_denormals=flush)) as b:
            options = b._session.get_session_options()
            entries[flush] = options.get_session_config_entry("session.set_denormal_as_zero") if flush else None
    thread = threading.Thread(target=load, args=(True,))
    thread.start()
    thread.join(30)
    assert entries[True] == "1"
    load(False)  # in this thread: without the flag, subnormals stay subnormal here
    assert np.finfo(np.float32).smallest_subnormal * np.float32(2) > 0
