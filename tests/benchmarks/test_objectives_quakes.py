"""spar-bench objectives --dataset quakes: the plan, the report in km against the floors, and every
job once at a toy budget (the real benchmark takes an hour)."""

from __future__ import annotations

import json

import pytest

from benchmarks.cli import main
from benchmarks.errors import BenchError
from benchmarks.objectives_quakes import (
    FLOORS,
    METHODS,
    Job,
    QuakeObjectivesConfig,
    QuakeObjectivesReport,
    check_config,
    plan,
    run_quake_objectives,
)

TINY = {"dim": 16, "heads": 2, "decoder_dim": 8, "modality_depth": 1, "joint_depth": 1, "structural_dims": 2}


@pytest.fixture(autouse=True, scope="session")
def _one_thread(one_torch_thread):
    yield


def test_the_plan_pretrains_spar_and_mae_once_per_seed_before_their_heads():
    cfg = QuakeObjectivesConfig(seeds=(0, 1))
    jobs = plan(cfg)
    assert len({j.key for j in jobs}) == len(jobs)
    for seed in (0, 1):
        mine = [j for j in jobs if j.seed == seed]
        assert [j.method for j in mine if j.kind == "pretrain"] == ["spar", "mae"]
        assert {(j.method, j.ratio) for j in mine if j.kind == "finetune"} == {(m, r) for m in METHODS
                                                                              for r in (1.0, 0.2)}
        first_head = next(i for i, j in enumerate(mine) if j.kind == "finetune")
        assert all(j.kind != "pretrain" for j in mine[first_head:])
    assert QuakeObjectivesConfig.for_budget("smoke").preset == "smoke"
    assert QuakeObjectivesConfig.for_budget("smoke", windows=200).preset == "smoke, modified"
    with pytest.raises(BenchError, match="unknown budget"):
        QuakeObjectivesConfig.for_budget("huge")
    with pytest.raises(BenchError, match="label ratios"):
        check_config(QuakeObjectivesConfig(label_ratios=(0.0,)))


def fake_results(cfg: QuakeObjectivesConfig, spar_m: float) -> dict:
    """Every method 30 km off except SPAR; floors: grid search 6 km, first arrival 18 km."""
    stats = ("mean", "median", "p90")

    def errors(value: float) -> dict[str, float]:
        return {f"{kind}_{s}": value for kind in ("hypocentre", "epicentral", "depth") for s in stats}

    out = {}
    for seed in cfg.seeds:
        for ratio in cfg.label_ratios:
            for method in METHODS:
                out[Job("finetune", method, seed, ratio).key] = {**errors(spar_m if method == "spar" else 30000.0),
                                                                "seconds": 60.0}
            floors = {"grid_search": 6000.0, "first_arrival": 18000.0, "knn": 25000.0, "mean_position": 40000.0}
            out[Job("floors", "floors", seed, ratio).key] = {
                **{f"{f}/{k}": v for f, value in floors.items() for k, v in errors(value).items()},
                "grid_search/sta_lta_threshold": 5.0}
    return out


def test_the_report_is_in_km_and_marks_rows_below_the_best_floor(tmp_path):
    cfg = QuakeObjectivesConfig(seeds=(0,), preset="smoke")
    report = QuakeObjectivesReport(cfg, fake_results(cfg, spar_m=4500.0), "test machine")
    text = report.to_markdown()
    assert report.best_floor(0.2) == ("grid_search", 6.0)
    assert "| SPAR | 4.50 |" in text and "-25 % vs grid search |" in text
    assert "+400 % vs grid search (below the floor)" in text  # 30 km against 6 km
    assert all(f"Floor: {name}" in text for name in ("STA/LTA", "first-arrival", "kNN"))
    assert "threshold 5 chosen" in text and "--budget smoke`" in text
    rows = report.table()
    assert [r["method"] for r in rows][-len(FLOORS):][0].startswith("Floor: STA/LTA")
    assert rows[METHODS.index("spar")]["hypocentre_mean_km@labels0.2"] == pytest.approx(4.5)
    report.plot(tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 10_000


def test_every_job_runs_at_a_toy_budget_and_a_rerun_resumes(tmp_path):
    cfg = QuakeObjectivesConfig(workdir=tmp_path / "work", windows=80, pretrain_epochs=1, head_steps=2,
                                supervised_steps=2, batch_size=8, label_ratios=(1.0, 0.5), seeds=(0,), model=TINY)
    report = run_quake_objectives(cfg, progress=lambda _: None)
    for method in METHODS:
        mean, _ = report.metric(method, 0.5, "hypocentre_mean")
        assert 0 < mean < 500  # km: somewhere on (or near) a 120 km network
    assert report.metric("grid_search", 1.0, "epicentral_mean")[0] < report.metric("mean_position", 1.0,
                                                                                   "epicentral_mean")[0]
    ledger = (cfg.workdir / "jobs.jsonl").read_text().splitlines()
    assert len(ledger) == len(plan(cfg))
    seen = []
    again = run_quake_objectives(cfg, progress=seen.append)
    assert seen == [] and again.results == report.results  # every job was remembered
    assert len((cfg.workdir / "jobs.jsonl").read_text().splitlines()) == len(ledger)
    changed = json.loads(ledger[-1])
    assert changed["key"].startswith("quakes/finetune/")


def test_cli_refuses_parking_only_flags(capsys):
    assert main(["objectives", "--dataset", "quakes", "--ablations", "none"]) == 2
    assert "--ablations belong to --dataset parking" in capsys.readouterr().err
