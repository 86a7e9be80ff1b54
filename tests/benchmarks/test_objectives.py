"""spar-bench objectives at a toy budget: every job runs, the report is built from the results,
and a second run resumes from the ledger instead of training again."""

import json

import pytest

from benchmarks.cli import main
from benchmarks.objectives import Job, ObjectivesConfig, ObjectivesReport, plan, pretrained_by, run_objectives

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
            assert keys.index(Job("pretrain", pretrained_by(job.method), job.seed).key) < keys.index(job.key)
    # the fair MAE reuses the blind MAE's encoder: no pretraining of its own
    assert sum(j.kind == "pretrain" for j in jobs) == 2 * (2 + 6)
    assert {j.method for j in jobs if j.kind == "finetune"} >= {"mae_node", "spar", "mae", "supervised"}
    assert sum(j.kind == "floors" for j in jobs) == 2 * 2  # per seed and label ratio


@pytest.mark.slow
def test_toy_run_writes_the_tables_and_resumes(tmp_path):
    messages = []
    report = run_objectives(toy_config(tmp_path / "work"), progress=messages.append)
    assert sum(m.startswith("[") for m in messages) == len(plan(toy_config(tmp_path)))
    text = report.to_markdown()
    for row in ("| SPAR |", "| MAE (blind) |", "| MAE + node identity (fair) |", "| Supervised (from scratch) |",
                "| node drop masking |", "| Floor: softmax on band energies |", "| Floor: kNN on band energies |",
                "| Floor: energy-weighted centroid |"):
        assert row in text
    spar = report.metric("spar", "localize", 0.2, "mse")[0]
    for baseline in ("mae", "mae_node"):
        other = report.metric(baseline, "localize", 0.2, "mse")[0]
        assert f"{(1 - spar / other) * 100:+.1f} %" in text  # the headline figures are computed, not typed
    floor, value = report.best_floor("localize", 0.2)
    assert value == min(report.metric("floors", "", 0.2, f"{f}/mse")[0] for f in ("knn", "centroid"))
    assert f"{(spar / value - 1) * 100:+.0f} % MSE vs {floor}" in text
    report.plot(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    again = []
    second = run_objectives(toy_config(tmp_path / "work"), progress=again.append)
    assert not any(m.startswith("[") for m in again), "finished jobs ran again"
    assert second.results == report.results


@pytest.mark.slow
def test_cli_writes_markdown_json_and_png(tmp_path, monkeypatch):
    import benchmarks.objectives as objectives

    monkeypatch.setattr(objectives.ObjectivesConfig, "for_budget",
                        classmethod(lambda cls, name, **kw: toy_config(kw["workdir"])))
    out = tmp_path / "results"
    assert main(["objectives", "--workdir", str(tmp_path / "w"), "--out", str(out)]) == 0
    assert "SPAR vs the fair MAE" in (out / "objectives.md").read_text()
    assert "machine" in json.loads((out / "objectives.json").read_text())
    assert (out / "objectives.png").exists()


def test_cli_refuses_unknown_ablations(tmp_path, capsys):
    assert main(["objectives", "--ablations", "no_brain", "--workdir", str(tmp_path)]) == 2
    assert "no_brain" in capsys.readouterr().err


def test_report_gap_is_relative_mse_reduction():
    cfg = ObjectivesConfig(ablations=(), label_ratios=(1.0, 0.2))
    results = {Job("finetune", m, 0, "localize", 0.2).key: {"mse": v}
               for m, v in (("spar", 6.0), ("mae", 10.0), ("mae_node", 8.0))}
    assert ObjectivesReport(cfg, results, "m").gap() == pytest.approx(0.4)
    assert ObjectivesReport(cfg, results, "m").gap("mae_node") == pytest.approx(0.25)


def test_margin_flags_a_learned_row_below_the_floor():
    cfg = ObjectivesConfig(ablations=(), label_ratios=(0.2,))
    results = {Job("floors", "floors", 0, ratio=0.2).key: {"knn/mse": 50.0, "centroid/mse": 80.0,
                                                            "softmax/accuracy": 0.95},
               Job("finetune", "spar", 0, "localize", 0.2).key: {"mse": 60.0},
               Job("finetune", "spar", 0, "classify", 0.2).key: {"accuracy": 0.97}}
    report = ObjectivesReport(cfg, results, "m")
    assert report.margin("spar", "localize", 0.2) == "+20 % MSE vs knn (below the floor)"
    assert report.margin("spar", "classify", 0.2) == "+2.0 pts vs softmax"


def test_budget_presets_name_themselves_in_the_results():
    assert ObjectivesConfig.for_budget("smoke").preset == "smoke"
    assert ObjectivesConfig.for_budget("smoke").seeds == (0, 1, 2)
    assert ObjectivesConfig.for_budget("smoke", windows=99).preset == "smoke, modified"
    assert "preset `standard`" in ObjectivesConfig.for_budget("standard").budget()


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
    from benchmarks.experiment_ledger import fresh_run_dir

    run = fresh_run_dir(tmp_path / "run", "settings A")
    (run / "checkpoint.pt").write_text("interrupted run with settings A")
    assert (fresh_run_dir(tmp_path / "run", "settings A") / "checkpoint.pt").exists()  # same settings: resume
    assert not (fresh_run_dir(tmp_path / "run", "settings B") / "checkpoint.pt").exists()  # other: start over
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "checkpoint.pt").write_text("unknown settings")
    assert not (fresh_run_dir(legacy, "settings A") / "checkpoint.pt").exists()
