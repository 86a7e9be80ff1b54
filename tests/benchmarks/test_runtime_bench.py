"""`spar-bench runtime` still runs end to end, and its result-store section measures both synchronous
modes side by side (smoke tests: the figures belong in the report, not here)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cli import main
from benchmarks.runtime_bench import STORE_HEADING, SYNC_MODES, run_store_benchmark, splice_store_section

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "configs" / "sites" / "parking_lot.toml"


@pytest.mark.slow
@pytest.mark.mosquitto
def test_runtime_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "runtime.md"
    result = subprocess.run([sys.executable, "-m", "benchmarks.cli", "runtime", "--windows", "20", "--paced-rate",
                             "10", "--store-batches", "4", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = out.read_text()
    for row in ("machine:", "bare-model throughput", "aggregator throughput", "added latency p99", "ingest capacity",
                "payload decode", STORE_HEADING, "FULL / NORMAL median", "last message arrived -> inference starts",
                "SQLite commit, p50 / p99", "arrivals spread over 30 ms", "codec webp:85"):
        assert row in report
    assert "nan" not in report.lower()


def test_store_section_measures_full_and_normal_in_one_run(tmp_path):
    report = run_store_benchmark(SITE, tmp_path / "disk", batches=5, block=2)

    # Every (mode, batch size) pair timed exactly `batches` commits, interleaved in one run.
    assert sorted((s.synchronous, s.batch_size) for s in report.stats) == sorted(
        (mode, size) for mode in SYNC_MODES for size in (1, 8))
    assert all(len(s.latencies_ms) == 5 and min(s.latencies_ms) > 0 for s in report.stats)
    for size in (1, 8):
        assert math.isfinite(report.ratio(size)) and report.ratio(size) > 0
        assert report.ratio(size) == pytest.approx(report.get("FULL", size).median_ms
                                                   / report.get("NORMAL", size).median_ms)
    # Results shaped like the aggregator's (build_result for the shipped model), not a toy dict.
    assert report.result_bytes > 500
    # The SQLite files lived on the requested disk and are gone afterwards.
    assert report.directory == str((tmp_path / "disk").resolve())
    assert list((tmp_path / "disk").iterdir()) == []

    text = report.to_markdown()
    assert text.startswith(STORE_HEADING)
    assert "machine:" in text and "SQLite" in text
    assert "| 1 |" in text and "| 8 |" in text and "x |" in text
    assert "power" in text and "--store-only" in text  # the trade-off paragraph and how to re-measure
    assert "nan" not in text.lower()


def test_store_only_replaces_its_section_and_keeps_the_others(tmp_path, capsys):
    out = tmp_path / "runtime.md"
    out.write_text("# spar-bench runtime\n\nearlier figures\n\n" + STORE_HEADING + "\n\nold store figures\n\n"
                   "## A later section\n\nkept\n")
    argv = ["runtime", "--store-only", "--store-batches", "3", "--store-dir", str(tmp_path / "disk"),
            "--site", str(SITE), "--out", str(out)]
    assert main(argv) == 0
    report = out.read_text()
    assert "earlier figures" in report and "## A later section\n\nkept" in report
    assert "old store figures" not in report
    assert report.count(STORE_HEADING) == 1 and "FULL / NORMAL median" in report
    capsys.readouterr()


def test_splice_appends_when_there_is_no_store_section():
    assert splice_store_section("# r\n\nbody\n", STORE_HEADING + "\n\nnew\n") == (
        "# r\n\nbody\n\n" + STORE_HEADING + "\n\nnew\n")
    assert splice_store_section("", "section\n") == "section\n"
