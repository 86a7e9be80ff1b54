"""spar-bench bandwidth and lossy: short live series, and the knee / target logic on hand-made rows."""

import json
import math
from pathlib import Path

import pytest

from benchmarks.bandwidth_bench import BandwidthReport, run_bandwidth
from benchmarks.cli import main as bench_main
from benchmarks.errors import BenchError
from benchmarks.lossy_bench import Condition, run_lossy
from node_firmware_sim.link_model import LinkConfig
from testbed.metric_loss import relative_loss
from trials.series import SeriesRow, worst_relative_loss
from trials.trial import TrialConfig

PARAMS = {"max_vehicles": 1, "empty_fraction": 0.1}


def row(name, nbytes, accuracy, distance):
    return SeriesRow(name, {"bytes_per_window": nbytes, "token_completeness": 1.0, "metric/classify/accuracy": accuracy,
                            "metric/localize/mean_distance": distance}, Path("."))


def test_relative_loss_knows_which_way_is_better():
    assert relative_loss(0.9, 1.0, higher_is_better=True) == pytest.approx(0.1)
    assert relative_loss(11.0, 10.0, higher_is_better=False) == pytest.approx(0.1)
    assert relative_loss(9.0, 10.0, higher_is_better=False) == pytest.approx(-0.1)
    assert math.isnan(relative_loss(0.5, 0.0, higher_is_better=True))


def test_knee_is_the_cheapest_codec_within_tolerance_on_every_metric():
    rows = [row("raw32", 100_000, 0.80, 10.0), row("png", 20_000, 0.80, 10.05),
            row("webp-q50", 4_000, 0.80, 10.5),  # distance 5 % worse: out
            row("jpeg-q75", 4_500, 0.795, 10.0)]  # accuracy 0.6 % worse: in, and cheapest of those in
    metrics = ["classify/accuracy", "localize/mean_distance"]
    report = BandwidthReport(rows, metrics, "machine", "budget", tolerance=0.01)
    assert worst_relative_loss(rows[2], rows[0], metrics) == pytest.approx(0.05)
    assert report.knee().name == "jpeg-q75"
    assert report.target_met()  # 4.5 % of float32 bytes
    assert "**met**" in report.verdict() and "(knee)" in report.to_markdown()
    strict = BandwidthReport(rows, metrics, "machine", "budget", tolerance=0.006)
    assert strict.knee().name == "png" and not strict.target_met()


@pytest.mark.mosquitto
def test_bandwidth_series_measures_bytes_and_metric_per_codec(tmp_path):
    base = TrialConfig(out=tmp_path / "bw", duration_s=16.0, speed=8.0, broker="mosquitto", scenario_params=PARAMS)
    report = run_bandwidth(base, ("raw32", "png", "jpeg:50"))
    assert [r.name for r in report.rows] == ["raw32", "png", "jpeg-q50"]
    sizes = [r.headline["bytes_per_window"] for r in report.rows]
    assert sizes[0] > sizes[1] > sizes[2] > 0  # float32 > lossless PNG > JPEG q50
    assert all(r.headline["windows_stored"] == r.headline["windows_complete"] == 8 for r in report.rows)
    assert report.share(report.rows[0]) == 1.0
    assert "localize/mean_distance" in report.metrics
    # png is lossless after quantization: its metric is that of float32 up to the quantization step.
    assert worst_relative_loss(report.rows[1], report.rows[0], report.metrics) < 0.05
    report.plot(tmp_path / "bandwidth.png")
    data = json.loads(report.to_json())
    assert data["reference"] == "raw32" and len(data["rows"]) == 3
    # Finished trials with the same settings are reused; a new codec runs.
    said = []
    again = run_bandwidth(base, ("raw32", "jpeg:50", "webp:50"), progress=said.append)
    assert sum("reused" in line for line in said) == 2
    assert again.rows[1].headline == report.rows[2].headline


@pytest.mark.mosquitto
def test_lossy_series_loses_what_the_link_drops(tmp_path):
    base = TrialConfig(out=tmp_path / "lossy", duration_s=16.0, speed=8.0, broker="mosquitto", codec="png",
                       scenario_params=PARAMS)
    conditions = [Condition("loss 0 %", LinkConfig(), independent_loss=0.0),
                  Condition("loss 40 %", LinkConfig(loss=0.4), independent_loss=0.4)]
    report = run_lossy(base, conditions, close_duration_s=16.0)
    clean, lossy = (r.headline for r in report.rows)
    # Every frame of the perfect link arrives (on a loaded machine one may arrive after its window
    # closed, counted as late).
    assert clean["injected_loss"] == 0.0
    assert clean["observed_loss"] * clean["messages"] == pytest.approx(clean["late"])
    assert lossy["injected_loss"] > 0.2
    assert lossy["observed_loss"] * lossy["messages"] == pytest.approx(
        lossy["injected_loss"] * lossy["messages"] + lossy["late"])
    # The two window-close policies ran in real time on the field-like link, same seed.
    early, deadline = (r.headline for r in report.close_rows)
    assert [r.name for r in report.close_rows] == ["early close", "deadline only"]
    assert deadline["closed_early"] == 0 and early["windows_stored"] == deadline["windows_stored"] == 8
    assert "## Closing windows: early close vs deadline only" in report.to_markdown()
    assert report.close_verdict().startswith("Early close: p50")
    assert lossy["completeness"] < 0.5  # 16 frames a window at 40 % loss: hardly ever all of them
    text = report.to_markdown()
    assert "| loss 40 % | 40 % independent loss |" in text and "No 20 % loss condition" in text
    report.plot(tmp_path / "lossy.png")


def test_cli_refuses_bad_benchmark_arguments(capsys):
    assert bench_main(["bandwidth", "--codecs", "raw32"]) == 2
    assert "at least two codecs" in capsys.readouterr().err
    assert bench_main(["lossy", "--windows", "2"]) == 2
    assert "--windows must be >= 8" in capsys.readouterr().err
    with pytest.raises(BenchError):
        run_bandwidth(TrialConfig(out=Path("/nonexistent")), ("raw32", "gif"))
