"""Every console script explains itself, and bad input gives a clear error and exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"spar-node": "node_firmware_sim.cli", "spar-aggregator": "edge_runtime.cli",
           "spar-train": "train.cli", "spar-export": "export.cli", "spar-bench": "benchmarks.cli"}


def run(module, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("script, module", sorted(SCRIPTS.items()))
def test_help(script, module):
    result = run(module, "--help")
    assert result.returncode == 0
    assert f"usage: {script}" in result.stdout


@pytest.mark.parametrize("module, commands", [("train.cli", ("pretrain", "finetune", "eval")),
                                              ("export.cli", ("distill", "onnx", "quantize", "engine"))])
def test_without_a_command_the_tools_say_which_exist(module, commands):
    result = run(module)
    assert result.returncode == 2
    assert all(c in result.stderr for c in commands)


def test_codec_report(tmp_path):
    out = tmp_path / "codecs.md"
    result = run("benchmarks.cli", "codecs", "--codecs", "raw32,png,jpeg:80", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "microphone" in result.stdout and "geophone" in result.stdout
    assert "jpeg-q80" in result.stdout and "100.0%" in result.stdout
    assert "jpeg-q80" in out.read_text() and "cores" in out.read_text()  # the table, stamped with the machine


@pytest.mark.parametrize("args, fragment", [
    (["skeleton", "--site", "nowhere.toml"], "cannot read"),
    (["skeleton", "--codec", "gif"], "unknown codec"),
    (["skeleton", "--node", "n99", "--fast"], "n99"),
    (["codecs", "--codecs", "jpeg:500"], "quality"),
])
def test_bad_arguments_give_clear_errors(args, fragment):
    result = run("benchmarks.cli", *args)
    assert result.returncode == 2
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_node_cli_reports_unreachable_broker():
    from testbed.local_broker import free_loopback_port

    result = run("node_firmware_sim.cli", "skeleton", "--site", "configs/sites/parking_lot.toml",
                 "--port", str(free_loopback_port()), "--windows", "1", "--fast")
    assert result.returncode == 2 and "cannot connect" in result.stderr
