"""``spar-bench`` dispatches to subcommands registered beside their benchmarks: every one is there,
in the table's order, explains itself, and the shared ledger and version helpers behave."""

import pytest

from benchmarks.cli import COMMANDS, build_parser, main
from benchmarks.experiment_ledger import finished_jobs, record_job, run_ledger, versions

NAMES = ["skeleton", "codecs", "runtime", "objectives", "model", "placement", "quant", "bandwidth", "lossy",
         "latency", "faults", "overload", "fuzz"]


def test_every_subcommand_is_registered_in_order():
    assert [name for name, _ in COMMANDS] == NAMES
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == NAMES
    assert all(callable(p.get_default("func")) for p in sub.choices.values())


@pytest.mark.parametrize("name", NAMES)
def test_every_subcommand_explains_itself(name, capsys):
    with pytest.raises(SystemExit) as stop:
        main([name, "--help"])
    assert stop.value.code == 0
    assert f"usage: spar-bench {name}" in capsys.readouterr().out


def test_without_a_command_the_tool_lists_them(capsys):
    with pytest.raises(SystemExit) as stop:
        main([])
    assert stop.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_the_ledger_reuses_only_results_with_the_same_settings(tmp_path):
    ledger = tmp_path / "jobs.jsonl"
    runs = []

    def run(job):
        runs.append(job)
        return {"value": job}

    assert run_ledger([("a", 1), ("b", 2)], "s1", ledger, run, progress=lambda text: None) == {
        "a": {"value": 1}, "b": {"value": 2}}
    assert run_ledger([("a", 1), ("b", 2)], "s1", ledger, run, progress=lambda text: None)["b"] == {"value": 2}
    assert runs == [1, 2]  # the second pass ran nothing
    run_ledger([("a", 1)], "s2", ledger, run, progress=lambda text: None)
    assert runs == [1, 2, 1]  # other settings: run again, the old result kept beside it
    record_job(ledger, "c", "s1", {"value": 3})
    assert set(finished_jobs(ledger)) == {("a", "s1"), ("b", "s1"), ("a", "s2"), ("c", "s1")}


def test_versions_name_the_libraries_asked_for():
    found = versions("torch", "onnxruntime", "SQLite")
    assert list(found) == ["torch", "onnxruntime", "SQLite"]
    assert "+" not in versions("torch", torch_build=False)["torch"]
    with pytest.raises(ValueError, match="tensorflow"):
        versions("tensorflow")
