"""spar-bench placement at a toy budget: every job runs (both layouts, every slot policy, SPAR+LLM,
MAE), the ratios are computed from the stored metrics, and a rerun resumes from the ledger."""

from __future__ import annotations

import json

import pytest

from benchmarks.cli import main
from benchmarks.errors import BenchError
from benchmarks.placement_bench import METHODS, Job, PlacementConfig, check_config, plan, run_placement

TINY = {"dim": 16, "heads": 2, "decoder_dim": 8, "modality_depth": 1, "joint_depth": 1, "structural_dims": 2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def toy_config(workdir) -> PlacementConfig:
    return PlacementConfig(workdir=workdir, windows_a=48, windows_b=40, pretrain_epochs=1, head_steps=2, batch_size=8,
                           model=TINY, scenario_params={"max_vehicles": 1, "episode_windows": 4})


def test_plan_pretrains_each_objective_on_both_layouts_before_fine_tuning():
    jobs = plan(PlacementConfig())
    keys = [j.key for j in jobs]
    assert len(keys) == len(set(keys))
    assert sum(j.kind == "pretrain" for j in jobs) == 3 * 2  # spar, spar_llm, mae x layouts A, B
    unseen = {(j.objective, j.slots) for j in jobs if j.kind == "finetune" and (j.pretrained_on, j.evaluated_on)
              == ("A", "B")}
    assert unseen == set(METHODS.values())
    for job in jobs:
        if job.kind == "finetune":
            assert keys.index(Job("pretrain", job.objective, job.pretrained_on, job.seed).key) < keys.index(job.key)


@pytest.mark.slow
def test_toy_run_reports_unseen_against_both_references_and_resumes(tmp_path):
    messages = []
    report = run_placement(toy_config(tmp_path / "work"), progress=messages.append)
    assert sum(m.startswith("[") for m in messages) == len(plan(toy_config(tmp_path)))
    rows = {r["method"]: r for r in report.rows()}
    assert set(rows) == set(METHODS)
    for method, row in rows.items():
        objective, slots = METHODS[method]
        unseen = report.results[Job("finetune", objective, "A", 0, "B", slots).key]["mean_distance"]
        reference = report.results[Job("finetune", objective, "B", 0, "B").key]["mean_distance"]
        assert row["ratio_vs_reference"] == pytest.approx(unseen / reference)
        assert row["meets_target"] == (unseen / reference <= 1.2)
    text = report.to_markdown()
    assert "| spar+llm (text) |" in text and "unseen / B-pretrained" in text
    report.plot(tmp_path / "placement.png")
    assert (tmp_path / "placement.png").stat().st_size > 10_000
    again = []
    second = run_placement(toy_config(tmp_path / "work"), progress=again.append)
    assert not any(m.startswith("[") for m in again), "finished jobs ran again"
    assert second.results == report.results


def test_unknown_methods_and_tiny_datasets_are_refused(tmp_path, capsys):
    with pytest.raises(BenchError, match="unknown method"):
        check_config(PlacementConfig(methods=("spar (telepathy)",)))
    with pytest.raises(BenchError, match=">= 40"):
        check_config(PlacementConfig(windows_b=10))
    assert main(["placement", "--methods", "nope", "--workdir", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_results_ledger_survives_a_torn_line(tmp_path):
    from benchmarks.experiment_ledger import finished_jobs

    ledger = tmp_path / "jobs.jsonl"
    ledger.write_text(json.dumps({"settings": "s", "key": "k", "result": {"x": 1}}) + "\n{\"settings\": \"s\", \"ke")
    assert finished_jobs(ledger) == {("k", "s"): {"x": 1}}
