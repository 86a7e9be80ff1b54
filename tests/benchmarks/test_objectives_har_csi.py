"""spar-bench objectives --dataset har|csi: the plan, the missing-data evaluation and the report.

The whole benchmark takes tens of minutes; here the plan and report are checked on their own, and
the missing-data scoring on one real tiny checkpoint."""

from __future__ import annotations

import pytest

from benchmarks.cli import main
from benchmarks.errors import BenchError
from benchmarks.objectives_har_csi import (
    DatasetObjectivesConfig,
    DatasetObjectivesReport,
    Job,
    check_config,
    missing_data_metrics,
    plan,
)


def test_every_objective_is_pretrained_once_and_every_method_fine_tuned_per_ratio():
    cfg = DatasetObjectivesConfig(dataset="csi", label_ratios=(1.0, 0.15))
    jobs = plan(cfg)
    pretrained = [j.key("csi") for j in jobs if j.kind == "pretrain"]
    assert sorted(pretrained) == sorted(f"csi/pretrain/{o}/seed0" for o in ("mae", "spar", "robusthar", "aemp"))
    finetuned = {(j.method, j.ratio) for j in jobs if j.kind == "finetune"}
    assert finetuned == {(m, r) for m in cfg.methods for r in (1.0, 0.15)}
    assert "aemp + map head, layer-wise" in cfg.methods
    assert "robusthar + fusion head" in DatasetObjectivesConfig(dataset="har").methods
    # pretraining comes before the fine-tuning that needs it
    first_finetune = next(i for i, j in enumerate(jobs) if j.kind == "finetune")
    assert all(j.kind == "finetune" for j in jobs[first_finetune:])


def test_report_tables_every_method_at_every_missing_rate():
    cfg = DatasetObjectivesConfig(dataset="har", label_ratios=(1.0,), missing_rates=(0.0, 0.1))
    results = {Job("finetune", m, 0, 1.0).key("har"): {
        "missing": {"0": {"accuracy": 0.9 - i / 100, "macro_f1": 0.8}, "0.1": {"accuracy": 0.7, "macro_f1": 0.6}},
        "seconds": 1.0} for i, m in enumerate(cfg.methods)}
    report = DatasetObjectivesReport(cfg, results, "test machine")
    text = report.to_markdown()
    assert "| supervised | 0.900 | 0.700 | 0.800 |" in text
    assert "| robusthar + fusion head |" in text and "10 % missing" in text
    assert report.table()[1]["accuracy@labels1/missing0.1"] == pytest.approx(0.7)


def test_bad_settings_are_refused():
    with pytest.raises(BenchError, match="unknown dataset"):
        check_config(DatasetObjectivesConfig(dataset="mnist"))
    with pytest.raises(BenchError, match="missing rates"):
        check_config(DatasetObjectivesConfig(missing_rates=(0.0, 1.5)))
    assert main(["objectives", "--dataset", "har", "--ablations", "none", "--workdir", "/nonexistent"]) == 2


def test_missing_streams_lower_the_metric_of_a_real_model(tiny_parking_dataset, tmp_path):
    from train.finetune import run_finetune
    from train.run_config import FinetuneConfig

    tuned = run_finetune(FinetuneConfig(data=str(tiny_parking_dataset), out=str(tmp_path / "m"), task="localize",
                                        epochs=3, progress=False, model={"dim": 16, "heads": 2, "decoder_dim": 8,
                                                                         "modality_depth": 1, "joint_depth": 1}))
    cfg = DatasetObjectivesConfig(dataset="csi", missing_rates=(0.0, 0.5), batch_size=8)
    metrics = missing_data_metrics(tuned.checkpoint, tiny_parking_dataset, cfg)
    assert set(metrics) == {"0", "0.5"}
    assert metrics["0"]["mean_distance"] == pytest.approx(tuned.metrics["mean_distance"], rel=1e-5)
    assert metrics["0.5"]["mean_distance"] != metrics["0"]["mean_distance"]
