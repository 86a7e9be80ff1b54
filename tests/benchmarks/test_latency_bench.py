"""`spar-bench latency`: a tiny real sweep through Mosquitto, and the saturation/bottleneck rules on made-up rows."""

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest

from benchmarks import latency_cli
from benchmarks.errors import BenchError
from benchmarks.latency_bench import (
    LatencyReport,
    StepResult,
    check_arguments,
    classify_step,
    ensure_model,
    run_latency_benchmark,
    step_windows,
    summary_line,
    synthetic_site,
)
from spar_wire.site_layout import load_site_layout

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "configs" / "sites" / "parking_lot.toml"


@pytest.mark.slow
@pytest.mark.mosquitto
def test_tiny_sweep_accounts_for_every_window_and_writes_its_report(mosquitto, tmp_path):
    seen = []
    report = run_latency_benchmark((4, 8), (4.0, 16.0), windows_per_step=10, min_windows_per_step=10,
                                   max_seconds_per_step=2.5, budget_s=120, workdir=tmp_path / "work", base_site=SITE,
                                   broker=mosquitto, progress=seen.append)
    assert report.model.kind == "student", report.model.note
    assert [s.nodes for s in report.sweeps] == [4, 8]
    for sweep in report.sweeps:
        assert sweep.messages_per_window == 2 * sweep.nodes
        assert sweep.bare_ms > 0 and sweep.steps, sweep.note
        for s in sweep.steps:
            assert s.windows == 10 and s.messages == 10 * sweep.messages_per_window
            assert s.results + s.dropped == s.windows and s.lost == 0, s
            assert s.achieved_rate <= s.offered_rate * 1.15, s
            assert s.generator_rate <= s.offered_rate * 1.15, s
            assert len(s.e2e_ms) == s.results
            if s.results:
                assert 0 < s.p50_ms <= s.p99_ms <= max(s.e2e_ms) + 1e-6
                for stage in (s.assembly_ms, s.queue_ms, s.inference_ms, s.transport_ms, s.delivery_ms):
                    assert math.isfinite(stage)
                assert s.inference_ms > 0 and s.assembly_ms >= 0 and s.queue_ms >= 0
                assert s.mean_batch >= 1
            assert (s.bottleneck is None) == (not s.saturated)
        if sweep.saturated_step is not None:
            assert sweep.steps[-1] is sweep.saturated_step  # a sweep stops at its first saturated step
    assert any("N=8" in line for line in seen)

    out = tmp_path / "out"
    (out / "latency.md").parent.mkdir()
    (out / "latency.md").write_text(report.to_markdown())
    (out / "latency.json").write_text(report.to_json())
    report.plot(out / "latency.png")
    markdown = (out / "latency.md").read_text()
    assert report.machine in markdown and "| 8 | 16 |" in markdown
    data = json.loads((out / "latency.json").read_text())
    assert [s["nodes"] for s in data["sweeps"]] == [4, 8]
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary_line(report).startswith("latency: N=4")
    assert LatencyReport.from_json(report.to_json()).to_markdown() == markdown
    # The exported student is cached: a second request does not export again.
    again = ensure_model(SITE, tmp_path / "work" / "models", max_nodes=64)
    assert again.cached and again.manifest == report.model.manifest


def _row(**changes) -> StepResult:
    base = StepResult(
        nodes=8, offered_rate=10.0, windows=30, messages=480, generator_rate=10.0, achieved_rate=10.0, results=30,
        partial=0, dropped=0, lost=0, p50_ms=12.0, p99_ms=20.0, growth_ms=0.5, publish_lag_ms=0.1, transport_ms=1.0,
        assembly_ms=5.0, queue_ms=0.5, inference_ms=4.0, delivery_ms=1.0, mean_batch=1.0, inference_busy=0.05,
        offered_messages_per_s=160.0, accepted_messages_per_s=160.0, ingest_lag_messages=8, late_messages=0,
        aggregator_cpu=0.3, ingest_thread_cpu=0.1, inference_thread_cpu=0.05, span_s=3.0, e2e_ms=[12.0] * 30)
    return dataclasses.replace(base, **changes)


def _tail(**stages) -> dict[str, float]:
    return {"load generator": 0.1, "ingest": 6.0, "inference": 4.5, **stages}


def test_classification_of_made_up_steps():
    baseline = _row()
    assert classify_step(baseline, None).saturated is False

    # Queue time piles up at the end of the step: the backend is the limit.
    backlog = _row(e2e_ms=[12.0] * 10 + [60.0] * 10 + [200.0] * 10, growth_ms=188.0, achieved_rate=8.0,
                   tail_stage_ms=_tail(inference=190.0), inference_busy=0.97)
    d = classify_step(backlog, baseline)
    assert d.saturated and d.bottleneck == "inference"
    assert any("results" in r for r in d.reasons) and any("grew" in r for r in d.reasons)

    # Messages wait in the broker and socket: transport + assembly grow, the queue stays empty.
    ingest = _row(e2e_ms=[12.0] * 10 + [80.0] * 10 + [160.0] * 10, growth_ms=148.0, tail_stage_ms=_tail(ingest=155.0),
                  ingest_lag_messages=300)
    d = classify_step(ingest, baseline)
    assert d.saturated and d.bottleneck == "ingest" and "ingest +149 ms" in d.evidence

    # The publisher could not keep its schedule: the measurement says nothing about the aggregator.
    slow_generator = _row(generator_rate=6.0, achieved_rate=6.0, tail_stage_ms=_tail(**{"load generator": 150.0}))
    d = classify_step(slow_generator, baseline)
    assert d.saturated and d.bottleneck == "load generator"
    assert d.reasons[0].startswith("publisher reached 6.0")

    # Drops without any latency growth: queue overflow means inference; partial windows mean ingest.
    dropped = _row(dropped=3, results=27, achieved_rate=9.5, tail_stage_ms=_tail())
    assert classify_step(dropped, baseline).bottleneck == "inference"
    partial = _row(partial=2, late_messages=4, tail_stage_ms=_tail())
    d = classify_step(partial, baseline)
    assert d.bottleneck == "ingest" and d.reasons == ("2 partial",)

    # At capacity: batching keeps the result rate up and the backlog bounded, but the backend never rests.
    busy = _row(inference_busy=0.94, tail_stage_ms=_tail(inference=150.0))
    d = classify_step(busy, baseline)
    assert d.reasons == ("backend busy 94 %",) and d.bottleneck == "inference"

    # Too few results to judge growth, but under 90 % of the offered rate: still saturated.
    few = _row(windows=6, results=6, e2e_ms=[10.0] * 6, growth_ms=30.0, achieved_rate=float("nan"))
    assert classify_step(few, baseline).saturated

    # A first step that is already saturated is judged against its own first third.
    first = _row(growth_ms=150.0, e2e_ms=[12.0] * 10 + [90.0] * 10 + [160.0] * 10,
                 head_stage_ms=_tail(), tail_stage_ms=_tail(inference=150.0))
    d = classify_step(first, None)
    assert d.bottleneck == "inference" and "its first third" in d.evidence

    # Noise: e2e growth below the thresholds is not a backlog; at 10 w/s that includes one period
    # (100 ms: less than one window of backlog, e.g. a stall the aggregator recovered from).
    noisy = _row(e2e_ms=[40.0] * 10 + [45.0] * 10 + [55.0] * 10, growth_ms=15.0)
    assert not classify_step(noisy, baseline).saturated
    stall = _row(e2e_ms=[38.0] * 10 + [250.0, 140.0] + [50.0] * 8 + [68.0] * 10, growth_ms=30.0)
    assert not classify_step(stall, baseline).saturated
    assert classify_step(dataclasses.replace(stall, offered_rate=50.0, achieved_rate=50.0), baseline).saturated


def test_synthetic_site_keeps_the_features_and_spreads_the_nodes(tmp_path):
    base = load_site_layout(SITE)
    path = synthetic_site(SITE, 20, tmp_path, seed=1)
    layout = load_site_layout(path)
    assert len(layout.nodes) == 20 and layout.site_id == "parking_lot_n20"
    assert layout.feature_hashes() == base.feature_hashes()
    assert all(node.modalities == ("microphone", "geophone") for node in layout.nodes)
    positions = layout.positions()
    assert len({tuple(p) for p in positions}) == 20
    extent = positions.max(axis=0) - positions.min(axis=0)
    assert extent[0] > 40 and extent[1] > 30  # 20 nodes spread over more than the 8-node lot


def test_bad_arguments_are_refused_and_steps_are_bounded(tmp_path):
    with pytest.raises(BenchError, match="node counts"):
        check_arguments((0, 8), (1.0,), 40, 6, 4.0, 60.0)
    with pytest.raises(BenchError, match="rates"):
        check_arguments((8,), (1.0, -2.0), 40, 6, 4.0, 60.0)
    with pytest.raises(BenchError, match="min_windows_per_step"):
        check_arguments((8,), (1.0,), 5, 6, 4.0, 60.0)
    with pytest.raises(BenchError, match="codec"):
        check_arguments((8,), (1.0,), 40, 6, 4.0, 60.0, codec="gif")
    assert check_arguments((16, 8, 8), (5, 1), 40, 6, 4.0, 60.0) == ((8, 16), (1.0, 5.0))
    assert [step_windows(r, 40, 6, 4.0) for r in (0.5, 1, 5, 100)] == [6, 6, 20, 40]


def test_the_parser_registers_latency_with_its_flags():
    parser = argparse.ArgumentParser()
    latency_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["latency", "--nodes", "8,16", "--rates", "1,2.5", "--windows-per-step", "20"])
    assert (args.nodes, args.rates, args.windows_per_step) == ("8,16", "1,2.5", 20)
    assert args.out == Path("benchmarks/results") and args.workdir == Path("benchmarks/.work/latency")
    assert args.backend == "auto" and callable(args.func)
    with pytest.raises(BenchError, match="--nodes"):
        args.func(parser.parse_args(["latency", "--nodes", "eight"]))


def test_the_load_benchmarks_model_has_the_shipped_students_shape():
    """The random-weight model of latency and overload must stay the shipped student's shape: the
    distill command recorded in models/parking_lot/TRAINING.md names it."""
    import re

    from benchmarks.load_sites import SHIPPED_STUDENT

    training = (Path(__file__).resolve().parents[2] / "models" / "parking_lot" / "TRAINING.md").read_text()
    distill = [line for line in training.splitlines() if "spar-export distill" in line and "--dim" in line][-1]
    flags = dict(re.findall(r"--(dim|heads|modality-depth|joint-depth|token-merge|mlp-ratio) (\S+)", distill))
    assert flags, distill
    for flag, value in flags.items():
        assert SHIPPED_STUDENT[flag.replace("-", "_")] == type(SHIPPED_STUDENT[flag.replace("-", "_")])(value), flag
