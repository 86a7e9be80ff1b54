"""spar-node run / dataset from the command line, as users call them."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def spar_node(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "node_firmware_sim.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)


def test_run_dry_with_a_lossy_link_prints_a_summary(tmp_path):
    result = spar_node("run", "--scenario", "sine", "--duration", "6", "--fast", "--dry-run",
                       "--link", "configs/links/lossy.toml", "--summary-json", str(tmp_path / "s.json"),
                       "--link-log", str(tmp_path / "link.jsonl"))
    assert result.returncode == 0, result.stderr
    assert "total" in result.stdout and "injected loss" in result.stdout
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["total"]["messages"] == 3 * 8 * 2
    lines = (tmp_path / "link.jsonl").read_text().splitlines()
    assert len(lines) == summary["total"]["link"]["sent"]


def test_run_against_a_broker(mosquitto):
    result = spar_node("run", "--scenario", "sine", "--duration", "4", "--fast", "--port",
                       str(mosquitto.port), "--procs", "2")
    assert result.returncode == 0, result.stderr
    total = next(line for line in result.stdout.splitlines() if line.startswith("total"))
    assert total.split()[-1] == total.split()[-2] == "32"  # published == acked


def test_dataset_command(tmp_path):
    result = spar_node("dataset", "--scenario", "sine", "--windows", "5", "--shard-size", "2",
                       "--out", str(tmp_path / "ds"), "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "wrote 5 windows in 3 shard(s)" in result.stdout
    again = spar_node("dataset", "--scenario", "sine", "--windows", "5", "--out", str(tmp_path / "ds"))
    assert again.returncode == 2 and "already holds" in again.stderr


def test_clear_errors():
    cases = [
        (["run", "--scenario", "sine", "--duration", "0", "--dry-run"], "duration"),
        (["run", "--scenario", "sine", "--link", "nowhere.toml", "--dry-run"], "cannot read"),
        (["run", "--scenario", "sine", "--param", "noise", "--dry-run"], "KEY=VALUE"),
        (["run", "--scenario", "sine", "--param", "volume=3", "--dry-run", "--fast"], "bad parameters"),
        (["run", "--recordings", "r.toml", "--dry-run"], "--recordings needs --site"),
        (["dataset", "--scenario", "sine", "--windows", "2", "--out", "/tmp/x", "--codec", "gif"], "codec"),
    ]
    for args, fragment in cases:
        result = spar_node(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert fragment in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
