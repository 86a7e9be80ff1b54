"""`spar-bench runtime` still runs end to end (a smoke test: the figures belong in the report, not here)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.mosquitto
def test_runtime_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "runtime.md"
    result = subprocess.run([sys.executable, "-m", "benchmarks.cli", "runtime", "--windows", "20", "--paced-rate",
                             "10", "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = out.read_text()
    for row in ("bare-model throughput", "aggregator throughput", "added latency p99", "ingest capacity",
                "payload decode"):
        assert row in report
    assert "nan" not in report.lower()
