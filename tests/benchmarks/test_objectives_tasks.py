"""spar-bench objectives --dataset quakes|parking_lot_multi: the plan, the reports against the
floors (km for quakes, mAP for detection), and every job once at a toy budget (the real benchmarks
take an hour each)."""

from __future__ import annotations

import json

import pytest

from benchmarks.cli import main
from benchmarks.errors import BenchError
from benchmarks.objectives_tasks import (
    METHODS,
    SPECS,
    Job,
    TaskObjectivesConfig,
    TaskObjectivesReport,
    check_config,
    job_settings,
    plan,
    run_task_objectives,
)

TINY = {"dim": 16, "heads": 2, "decoder_dim": 8, "modality_depth": 1, "joint_depth": 1, "structural_dims": 2}


@pytest.fixture(autouse=True, scope="session")
def _one_thread(one_torch_thread):
    yield


def test_the_plan_pretrains_spar_and_mae_once_per_seed_before_their_heads():
    cfg = TaskObjectivesConfig(seeds=(0, 1))
    jobs = plan(cfg)
    assert len({j.key for j in jobs}) == len(jobs)
    for seed in (0, 1):
        mine = [j for j in jobs if j.seed == seed]
        assert [j.method for j in mine if j.kind == "pretrain"] == ["spar", "mae"]
        assert {(j.method, j.ratio) for j in mine if j.kind == "finetune"} == {(m, r) for m in METHODS
                                                                              for r in (1.0, 0.2)}
        first_head = next(i for i, j in enumerate(mine) if j.kind == "finetune")
        assert all(j.kind != "pretrain" for j in mine[first_head:])
    assert TaskObjectivesConfig.for_budget("smoke").preset == "smoke"
    assert TaskObjectivesConfig.for_budget("smoke", windows=200).preset == "smoke, modified"
    with pytest.raises(BenchError, match="unknown budget"):
        TaskObjectivesConfig.for_budget("huge")
    with pytest.raises(BenchError, match="label ratios"):
        check_config(TaskObjectivesConfig(label_ratios=(0.0,)))


def fake_results(cfg: TaskObjectivesConfig, spar_m: float) -> dict:
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
    cfg = TaskObjectivesConfig(seeds=(0,), preset="smoke")
    report = TaskObjectivesReport(cfg, fake_results(cfg, spar_m=4500.0), "test machine")
    text = report.to_markdown()
    assert report.best_floor(0.2) == ("grid_search", 6.0)
    assert "| SPAR | 4.50 |" in text and "-25 % vs grid search |" in text
    assert "+400 % vs grid search (below the floor)" in text  # 30 km against 6 km
    assert all(f"Floor: {name}" in text for name in ("STA/LTA", "first-arrival", "kNN"))
    assert "threshold 5 chosen" in text and "--budget smoke`" in text
    rows = report.table()
    assert [r["method"] for r in rows][-len(SPECS["quakes"].floors):][0].startswith("Floor: STA/LTA")
    assert rows[METHODS.index("spar")]["hypocentre_mean_km@labels0.2"] == pytest.approx(4.5)
    report.plot(tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 10_000


def test_every_job_runs_at_a_toy_budget_and_a_rerun_resumes(tmp_path):
    cfg = TaskObjectivesConfig(workdir=tmp_path / "work", windows=80, pretrain_epochs=1, head_steps=2,
                                supervised_steps=2, batch_size=8, label_ratios=(1.0, 0.5), seeds=(0,), model=TINY)
    report = run_task_objectives(cfg, progress=lambda _: None)
    for method in METHODS:
        mean, _ = report.metric(method, 0.5, "hypocentre_mean")
        assert 0 < mean < 500  # km: somewhere on (or near) a 120 km network
    assert report.metric("grid_search", 1.0, "epicentral_mean")[0] < report.metric("mean_position", 1.0,
                                                                                   "epicentral_mean")[0]
    ledger = (cfg.workdir / "jobs.jsonl").read_text().splitlines()
    assert len(ledger) == len(plan(cfg))
    seen = []
    again = run_task_objectives(cfg, progress=seen.append)
    assert seen == [] and again.results == report.results  # every job was remembered
    assert len((cfg.workdir / "jobs.jsonl").read_text().splitlines()) == len(ledger)
    changed = json.loads(ledger[-1])
    assert changed["key"].startswith("quakes/finetune/")


def test_the_detection_report_ranks_by_map_and_marks_rows_below_the_best_floor():
    cfg = TaskObjectivesConfig(dataset="parking_lot_multi", seeds=(0, 1), label_ratios=(1.0,), preset="smoke")
    results = {}
    for seed in cfg.seeds:
        for i, method in enumerate(METHODS):  # supervised 0.30, mae 0.35, mae_node 0.40, spar 0.45 at every r
            results[Job("finetune", method, seed, 1.0, cfg.dataset).key] = {
                f"mAP@{r}": 0.30 + 0.05 * i + 0.01 * seed for r in (2, 4, 6, 8, 10)}
        results[Job("floors", "floors", seed, 1.0, cfg.dataset).key] = {
            **{f"knn/mAP@{r}": 0.20 for r in (4, 6, 8, 10)}, **{f"energy_peaks/mAP@{r}": 0.38 for r in (4, 6, 8, 10)},
            "knn/k": 3, "energy_peaks/drop_db": 10.0}
    report = TaskObjectivesReport(cfg, results, "test machine")
    assert report.best_floor(1.0) == ("energy_peaks", pytest.approx(0.38))
    text = report.to_markdown()
    assert "| SPAR | 0.455 ± 0.007 |" in text and "+7.5 pts vs energy peaks |" in text
    assert "-2.5 pts vs energy peaks (below the floor)" in text  # the blind MAE, 0.355
    assert "(k 3 chosen" in text and "--dataset parking_lot_multi --budget smoke --detector anchors`" in text
    assert report.table()[METHODS.index("spar")]["mAP@8@labels1"] == pytest.approx(0.455)


def test_a_toy_detection_run_scores_every_method_and_both_floors(tmp_path):
    cfg = TaskObjectivesConfig(dataset="parking_lot_multi", workdir=tmp_path / "work", windows=80, pretrain_epochs=1,
                               head_steps=2, supervised_steps=2, batch_size=8, label_ratios=(1.0,), seeds=(0,),
                               model=TINY)
    report = run_task_objectives(cfg, progress=lambda _: None)
    for key, _ in report.rows():
        assert 0.0 <= report.metric(key, 1.0, "mAP@10")[0] <= 1.0
    assert report.metric("energy_peaks", 1.0, "mAP@10")[0] >= report.metric("energy_peaks", 1.0, "mAP@4")[0]
    report.plot(tmp_path / "multi.png")
    assert (tmp_path / "multi.png").exists()
    for method in ("spar", "supervised", "mae_node"):  # every method gets the anchored head
        run = json.loads((tmp_path / "work" / "runs" / Job("finetune", method, 0, 1.0, "parking_lot_multi").key /
                          "config.json").read_text())["run"]
        assert run["head"] == "anchors", method


def test_the_detector_is_part_of_a_detection_jobs_settings():
    """A ledger of plain-DETR results stays valid for --detector detr and is not reused for anchors."""
    job = Job("finetune", "spar", 0, 1.0, "parking_lot_multi")
    anchors = json.loads(job_settings(TaskObjectivesConfig(dataset="parking_lot_multi"), job))
    detr = json.loads(job_settings(TaskObjectivesConfig(dataset="parking_lot_multi", detector="detr"), job))
    assert anchors["detector"] == "anchors" and "detector" not in detr
    assert "detector" not in job_settings(TaskObjectivesConfig(dataset="parking_lot_multi"),
                                          Job("pretrain", "spar", 0, dataset="parking_lot_multi"))
    with pytest.raises(BenchError, match="unknown detector"):
        check_config(TaskObjectivesConfig(dataset="parking_lot_multi", detector="yolo"))


def test_cli_refuses_parking_only_flags(capsys):
    assert main(["objectives", "--dataset", "quakes", "--ablations", "none"]) == 2
    assert "--ablations belong to --dataset parking" in capsys.readouterr().err
    assert main(["objectives", "--dataset", "quakes", "--detector", "detr"]) == 2
    assert "--detector belongs to --dataset parking_lot_multi" in capsys.readouterr().err
