"""The quantization benchmark on tiny models and synthetic windows: every row, every ratio, the plot."""

import numpy as np
import pytest
import torch

from benchmarks.errors import BenchError
from benchmarks.quant_bench import (
    STUDENT_INT8,
    STUDENT_INT8_DYNAMIC,
    STUDENT_ORT,
    STUDENT_TORCH,
    TEACHER_ORT,
    TEACHER_TORCH,
    BenchEntry,
    bench_inputs,
    run_quant_benchmark,
    standard_entries,
)
from export.deploy_model import DeployModel
from export.onnx_export import export_onnx
from export.parity import onnx_runner
from export.quant_int8 import quantize_dynamic_int8, quantize_static_int8
from train.data import WindowSet
from train.heads import make_head
from train.models.config import ModalitySpec, SparConfig
from train.models.spar import SparEncoder

CLASSES = ("none", "car", "van")


@pytest.fixture(autouse=True, scope="session")
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def windows() -> WindowSet:
    """16 synthetic windows of 6 nodes, one modality of 4 x 8 dB tokens (fast: no dataset export)."""
    rng = np.random.default_rng(0)
    w, n = 16, 6
    label = rng.integers(0, len(CLASSES), w)
    target_class = np.where(label > 0, label, -1)[:, None]
    target_position = np.where(label[:, None, None] > 0, rng.uniform(0, 30, (w, 1, 2)), np.nan).astype(np.float32)
    return WindowSet(tokens={"microphone": (rng.normal(-60, 10, (w, n, 4, 8))).astype(np.float32)},
                     present={"microphone": rng.random((w, n)) > 0.1}, positions=rng.uniform(0, 30, (w, n, 2))
                     .astype(np.float32), label=label, target_class=target_class, target_position=target_position,
                     window_index=np.arange(w), class_names=CLASSES, feature_configs={}, site={})


def tiny_model(dim: int, seed: int) -> DeployModel:
    torch.manual_seed(seed)
    cfg = SparConfig(modalities=(ModalitySpec("microphone", 4, 8),), max_nodes=16, dim=dim, heads=2,
                     modality_depth=1, joint_depth=1, structural_dims=2, decoder_dim=dim)
    encoder = SparEncoder(cfg)
    encoder.set_token_statistics({"microphone": (-60.0, 10.0)})
    heads = {task: make_head(task, dim, len(CLASSES), 2) for task in ("classify", "localize")}
    return DeployModel(encoder, heads, len(CLASSES), 2).eval()


@pytest.fixture(scope="module")
def artifacts(windows, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant_bench")
    teacher, student = tiny_model(16, 0), tiny_model(8, 1)
    student_fp32 = export_onnx(student, tmp / "student.onnx")
    int8 = quantize_static_int8(student_fp32, tmp / "student.int8.onnx", windows, np.arange(12))
    dynamic = quantize_dynamic_int8(student_fp32, tmp / "student.dynamic.onnx")
    return tmp, teacher, student, student_fp32, int8, dynamic


def test_report_has_every_row_and_ratio(artifacts, windows, tmp_path):
    tmp, teacher, student, student_fp32, int8, dynamic = artifacts
    entries = standard_entries(teacher, student, student_fp32, int8, threads=1, student_int8_dynamic=dynamic,
                               workdir=tmp)
    assert (tmp / "teacher.onnx").is_file()  # exported for the ORT teacher row
    report = run_quant_benchmark(entries, windows, np.arange(12, 16), nodes=8, batches=(1, 4), repeats=3, warmup=1,
                                 threads=1)
    labels = [TEACHER_TORCH, STUDENT_TORCH, TEACHER_ORT, STUDENT_ORT, STUDENT_INT8, STUDENT_INT8_DYNAMIC]
    assert [e.label for e in report.entries] == labels
    for e in report.entries:
        assert all(len(e.latency_ms[b]) == 3 and min(e.latency_ms[b]) > 0 for b in (1, 4))
        assert {"classify/accuracy", "localize/mean_distance"} <= set(e.metrics)
    assert report.entry(TEACHER_TORCH).params > report.entry(STUDENT_TORCH).params
    assert report.entry(STUDENT_INT8).file_bytes > 0 and report.entry(STUDENT_TORCH).file_bytes is None
    assert set(report.ratios) == {"INT8 student vs FP32 teacher, both ORT", "INT8 ORT vs torch eager FP32, student",
                                  "INT8 vs FP32, student, both ORT", "FP32 student vs FP32 teacher, torch eager",
                                  "INT8 dynamic vs FP32, student, both ORT"}
    slow, fast = report.entry(TEACHER_ORT), report.entry(STUDENT_INT8)
    assert report.ratios["INT8 student vs FP32 teacher, both ORT"][4] == pytest.approx(slow.p(4, 50) / fast.p(4, 50))
    # same model, same windows: ORT FP32 scores what torch scores
    assert report.entry(STUDENT_ORT).metrics == pytest.approx(report.entry(STUDENT_TORCH).metrics, rel=1e-4)
    text = report.to_markdown()
    assert "machine: " in text and "1 thread(s) for torch and ONNX Runtime alike" in text
    for label in labels:
        assert f"| {label} |" in text
    assert "b4 p99 ms" in text and "classify/accuracy" in text and "x |" in text
    # issue 20's targets, judged from the same rows
    assert "## Targets (issue 20)" in text
    ratio = report.entry(TEACHER_ORT).p(1, 50) / report.entry(STUDENT_INT8).p(1, 50)
    row = next(line for line in text.splitlines() if line.startswith(f"| {STUDENT_INT8} | vs FP32 teacher"))
    assert f"| {ratio:.2f}x |" in row and row.endswith("| yes |" if ratio >= 3 and
                                                      report.entry(TEACHER_ORT).p(4, 50) /
                                                      report.entry(STUDENT_INT8).p(4, 50) >= 3 else "| **no** |")
    assert f"| {STUDENT_INT8_DYNAMIC} | localize/mean_distance |" in text
    png = report.plot(tmp_path / "quant.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mismatched_threads_are_refused(artifacts, windows):
    _, _, student, student_fp32, _, _ = artifacts
    entry = BenchEntry("ORT", onnx_runner(student_fp32, threads=2), 1, 1, student)
    with pytest.raises(BenchError, match="threads"):
        run_quant_benchmark([entry], windows, [0], repeats=1, threads=1)


def test_bench_inputs_cut_and_pad_real_windows(windows, artifacts):
    student = artifacts[2]
    names = student.input_names
    cut = bench_inputs(windows, [3, 4], 3, 4, names)
    assert cut["tokens_microphone"].shape == (3, 4, 4, 8)
    np.testing.assert_array_equal(cut["tokens_microphone"][2], windows.tokens["microphone"][3, :4])  # cycles
    padded = bench_inputs(windows, [3], 2, 9, names, max_nodes=16)
    assert padded["present_microphone"].shape == (2, 9) and not padded["present_microphone"][:, 6:].any()
    np.testing.assert_array_equal(padded["node_index"][0], np.arange(9))
    assert padded["positions"].dtype == np.float32 and np.isfinite(padded["positions"]).all()
    outputs = onnx_runner(artifacts[3], threads=1)(padded)
    assert outputs[0].shape == (2, 3)


def test_attention_options_get_rows_ratios_and_a_table(artifacts, windows):
    """spar-bench quant's attention comparison: FP32 and INT8 rows per mode, fused vs plain speed-ups,
    parity against torch and the fused-op evidence in the report."""
    from benchmarks.quant_bench import attention_entries, attention_label, attention_parity, attention_ratios

    tmp, _, student, *_ = artifacts
    entries, options = attention_entries(student, windows, np.arange(12), tmp, modes=("plain", "mha", "nope"))
    assert [e.label for e in entries] == [attention_label(p, m) for m in ("plain", "mha") for p in ("FP32", "INT8")]
    assert "unknown attention mode" in options[2].error
    report = run_quant_benchmark(entries, windows, np.arange(12, 16), nodes=8, batches=(1, 4), repeats=2, warmup=1,
                                 threads=1, ratios=attention_ratios(options))
    attention_parity(student, entries, options, windows, np.arange(12, 16))
    report.attention = options
    plain, mha = options[0], options[1]
    from train.models.transformer import Attention

    blocks = sum(isinstance(m, Attention) for m in student.modules())
    assert (plain.fused_nodes, plain.fused_at_load, mha.fused_nodes, mha.fused_at_load) == (0, 0, blocks, blocks)
    assert plain.fp32_error < 1e-4 and mha.fp32_error < 1e-4 and np.isfinite(mha.int8_error)
    assert mha.int8_quantized > 0
    assert set(report.ratios) == {f"mha vs plain attention, {p} student, ORT" for p in ("FP32", "INT8")}
    text = report.to_markdown()
    assert "## Attention options" in text and f"| mha | {blocks} | {blocks} |" in text
    assert "| nope | not measured" in text


def _saved_student(model: DeployModel, folder) -> str:
    """``model`` saved as a distilled checkpoint that ``export.distill.load_student`` rebuilds."""
    from export.distill import KIND, head_settings
    from train.checkpoint import save_checkpoint

    extra = {"encoder_config": model.encoder.cfg.to_dict(), "tasks": list(model.heads), "n_classes": len(CLASSES),
             "out_dims": 2, "head_kwargs": head_settings(model)}
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "checkpoint.pt", kind=KIND, model_config=model.encoder.cfg.to_dict(), model=model,
                    run_config={}, data_info={}, step=0, epoch=0, extra=extra)
    return str(folder)


def test_pareto_rows_speedups_frontier_and_floor(artifacts, windows, tmp_path):
    """--pareto: each student gets an FP32 and an INT8 row, a line with its speed-ups against the ORT
    teacher and its metric change, the frontier marks the undominated ones, the floor uses FLOPs."""
    from benchmarks.student_pareto import frontier, gemm_rate, pareto_entries

    tmp, teacher, *_ = artifacts
    teacher_fp32 = export_onnx(teacher, tmp_path / "teacher.onnx")
    small = tiny_model(8, 3)
    merged = DeployModel(SparEncoder(SparConfig(**{**small.encoder.cfg.to_dict(), "modalities": (
        ModalitySpec("microphone", 4, 8),), "token_merge": 2})), small.heads, len(CLASSES), 2).eval()
    merged.encoder.set_token_statistics({"microphone": (-60.0, 10.0)})
    paths = [_saved_student(small, tmp_path / "s-small"), _saved_student(merged, tmp_path / "s-merged")]
    entries, shapes = pareto_entries(paths, windows, np.arange(12), tmp_path, threads=1)
    assert [e.label for e in entries] == ["ORT FP32 s-small", "ORT INT8 s-small", "ORT FP32 s-merged",
                                          "ORT INT8 s-merged"]
    assert "merge 2" in shapes[1].shape and shapes[1].flops < shapes[0].flops
    base = [BenchEntry(TEACHER_ORT, onnx_runner(teacher_fp32, 1, teacher.output_names), 1, 1, teacher)]
    report = run_quant_benchmark(base + entries, windows, np.arange(12, 16), nodes=8, batches=(1, 4), repeats=3,
                                 warmup=1, threads=1)
    report.pareto, report.gemm_gflops, report.teacher_flops = shapes, gemm_rate(repeats=5), 1_000_000
    assert report.gemm_gflops > 0.1
    text = report.to_markdown()
    assert "## Student shapes" in text and "**Physical floor.**" in text
    row = next(line for line in text.splitlines() if line.startswith("| s-merged | d 8"))
    t, s = report.entry(TEACHER_ORT), report.entry("ORT INT8 s-merged")
    assert f"| {t.p(1, 50) / s.p(1, 50):.2f}x |" in row and "classify/accuracy" in text and " %)" in row
    with pytest.raises(BenchError, match="distinct names"):
        pareto_entries([paths[0], paths[0]], windows, np.arange(12), tmp_path)
    # frontier: b is slower and worse than a; c is slower but better on one metric
    assert frontier({"a": (1.0, [0.9, -2.0]), "b": (2.0, [0.8, -3.0]), "c": (3.0, [0.95, -3.0])}) == {"a", "c"}


def test_int8_settings_get_one_row_each_and_a_table(artifacts, windows):
    from benchmarks.int8_settings import INT8_SETTINGS, SHIPPED_SETTING, int8_setting_entries

    tmp, _, student, student_fp32, *_ = artifacts
    entries = int8_setting_entries(student, student_fp32, windows, np.arange(12), tmp)
    assert [e.label for e in entries] == [s.label for s in INT8_SETTINGS]
    fp32 = BenchEntry(STUDENT_ORT, onnx_runner(student_fp32, 1, student.output_names), 1, 1, student)
    report = run_quant_benchmark([fp32, *entries], windows, np.arange(12, 16), nodes=8, batches=(1,), repeats=2,
                                 warmup=1, threads=1)
    report.int8_settings = True
    text = report.to_markdown()
    assert "## INT8 settings" in text and f"| {SHIPPED_SETTING} (shipped) |" in text
    for setting in INT8_SETTINGS:
        metric = report.entry(setting.label).metrics["classify/accuracy"]
        assert 0.0 <= metric <= 1.0 and f"| {setting.name}" in text
    import onnx

    u8 = [s for s in INT8_SETTINGS if s.options.get("activations") == "u8"][0]
    graph = onnx.load(str(tmp / f"int8-setting-{INT8_SETTINGS.index(u8)}.onnx")).graph
    unsigned = [i for i in graph.initializer
                if i.name.endswith("_zero_point") and i.data_type == onnx.TensorProto.UINT8]
    assert unsigned  # u8 activations really are unsigned
