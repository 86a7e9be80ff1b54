"""spar-bench objectives at a toy budget: every job runs, the report is built from the results,
and a second run resumes from the ledger instead of training again."""

import json

import pytest

from benchmarks.cli import main
from benchmarks.objectives import Job, ObjectivesConfig, ObjectivesReport, plan, run_objectives

TINY = {"dim": 16, "heads": 2, "decoder_dim": 8, "modality_depth": 1, "joint_depth": 1, "structural_dims": 2}


@pytest.fixture(autouse=True, scope="session")
def _one_thread(one_torch_thread):
    yield


def toy_config(workdir) -> ObjectivesConfig:
    return ObjectivesConfig(workdir=workdir, windows=48, pretrain_epochs=1, head_steps=2, supervised_steps=2,
                            batch_size=8, ablations=("node_drop_masking",), model=TINY,
                            scenario_params={"max_vehicles": 1, "episode_windows": 4})


def test_plan_pretrains_before_finetuning():
    jobs = plan(ObjectivesConfig(seeds=(0, 1)))
    keys = [j.key for j in jobs]
    assert len(keys) == len(set(keys))
    for job in jobs:
        if job.kind == "finetune" and job.method != "supervised":
            assert keys.index(Job("pretrain", job.method, job.seed).key) < keys.index(job.key)
    assert sum(j.kind == "pretrain" for j in jobs) == 2 * (2 + 6)


@pytest.mark.slow
def test_toy_run_writes_the_tables_and_resumes(tmp_path):
    messages = []
    report = run_objectives(toy_config(tmp_path / "work"), progress=messages.append)
    assert sum(m.startswith("[") for m in messages) == len(plan(toy_config(tmp_path)))
    text = report.to_markdown()
    for row in ("| SPAR |", "| MAE |", "| Supervised (from scratch) |", "| node drop masking |"):
        assert row in text
    spar = report.metric("spar", "localize", 0.2, "mse")[0]
    mae = report.metric("mae", "localize", 0.2, "mse")[0]
    assert f"{(1 - spar / mae) * 100:+.1f} %" in text  # the headline figure is computed, not typed
    report.plot(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    again = []
    second = run_objectives(toy_config(tmp_path / "work"), progress=again.append)
    assert not any(m.startswith("[") for m in again), "finished jobs ran again"
    assert second.results == report.results


@pytest.mark.slow
def test_cli_writes_markdown_json_and_png(tmp_path, monkeypatch):
    import benchmarks.objectives as objectives

    monkeypatch.setattr(objectives, "ObjectivesConfig", lambda **kw: toy_config(kw["workdir"]))
    out = tmp_path / "results"
    assert main(["objectives", "--workdir", str(tmp_path / "w"), "--out", str(out)]) == 0
    assert "SPAR vs MAE" in (out / "objectives.md").read_text()
    assert "machine" in json.loads((out / "objectives.json").read_text())
    assert (out / "objectives.png").exists()


def test_cli_refuses_unknown_ablations(tmp_path, capsys):
    assert main(["objectives", "--ablations", "no_brain", "--workdir", str(tmp_path)]) == 2
    assert "no_brain" in capsys.readouterr().err


def test_report_gap_is_relative_mse_reduction():
    cfg = ObjectivesConfig(ablations=(), label_ratios=(1.0, 0.2))
    results = {Job("finetune", m, 0, "localize", 0.2).key: {"mse": v} for m, v in (("spar", 6.0), ("mae", 10.0))}
    assert ObjectivesReport(cfg, results, "m").gap() == pytest.approx(0.4)


@pytest.mark.slow
def test_a_new_head_budget_reuses_the_pretrained_encoders(tmp_path):
    from dataclasses import replace

    cfg = replace(toy_config(tmp_path / "work"), ablations=())
    run_objectives(cfg, progress=lambda _: None)
    messages = []
    run_objectives(replace(cfg, head_steps=3), progress=messages.append)
    reran = [m.split()[1] for m in messages if m.startswith("[")]
    assert reran and all(k.startswith("finetune/") and "/supervised/" not in k for k in reran), reran


def test_a_run_folder_from_other_settings_is_not_resumed(tmp_path):
    from benchmarks.objectives import fresh_run_dir

    run = fresh_run_dir(tmp_path / "run", "settings A")
    (run / "checkpoint.pt").write_text("interrupted run with settings A")
    assert (fresh_run_dir(tmp_path / "run", "settings A") / "checkpoint.pt").exists()  # same settings: resume
    assert not (fresh_run_dir(tmp_path / "run", "settings B") / "checkpoint.pt").exists()  # other: start over
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "checkpoint.pt").write_text("unknown settings")
    assert not (fresh_run_dir(legacy, "settings A") / "checkpoint.pt").exists()
