"""spar-bench objectives --dataset har|csi: the plan, the missing-data evaluation, the floors and the report.

The whole benchmark takes tens of minutes; here the plan and report are checked on their own, the
missing-data scoring on one real tiny checkpoint, and every job once at a toy budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.cli import main
from benchmarks.errors import BenchError
from benchmarks.objectives_har_csi import (
    DatasetObjectivesConfig,
    DatasetObjectivesReport,
    check_config,
    dataset_job,
    missing_data_metrics,
    missing_streams,
    plan,
    run_dataset_objectives,
)

TINY = {"dim": 16, "heads": 2, "decoder_dim": 8, "modality_depth": 1, "joint_depth": 1, "structural_dims": 2}


@pytest.fixture(autouse=True, scope="session")
def _one_thread(one_torch_thread):
    yield


def toy_config(dataset: str, workdir: Path) -> DatasetObjectivesConfig:
    return DatasetObjectivesConfig(dataset=dataset, workdir=workdir, windows=80, pretrain_epochs=1, head_steps=2,
                                   end_to_end_steps=2, batch_size=8, label_ratios=(1.0, 0.5),
                                   missing_rates=(0.0, 0.15), model=TINY)


def test_every_objective_is_pretrained_once_and_every_method_fine_tuned_per_ratio():
    cfg = DatasetObjectivesConfig(dataset="csi", label_ratios=(1.0, 0.15))
    jobs = plan(cfg)
    pretrained = [j.key for j in jobs if j.kind == "pretrain"]
    assert sorted(pretrained) == sorted(f"csi/pretrain/{o}/seed0" for o in ("mae", "spar", "robusthar", "aemp"))
    finetuned = {(j.method, j.ratio) for j in jobs if j.kind == "finetune"}
    assert finetuned == {(m, r) for m in cfg.methods for r in (1.0, 0.15)}
    assert [j.key for j in jobs if j.kind == "floors"] == ["csi/floors/1/seed0", "csi/floors/0.15/seed0"]
    assert len({j.key for j in jobs}) == len(jobs)
    assert "aemp + map head, layer-wise" in cfg.methods
    assert "robusthar + fusion head" in DatasetObjectivesConfig(dataset="har").methods
    # pretraining comes before the fine-tuning that needs it
    first_finetune = next(i for i, j in enumerate(jobs) if j.kind == "finetune")
    assert all(j.kind == "finetune" for j in jobs[first_finetune:])


def test_report_tables_every_method_at_every_missing_rate():
    cfg = DatasetObjectivesConfig(dataset="har", label_ratios=(1.0,), missing_rates=(0.0, 0.1))
    results = {dataset_job("har", "finetune", m, 0, 1.0).key: {
        "missing": {"0": {"accuracy": 0.9 - i / 100, "macro_f1": 0.8}, "0.1": {"accuracy": 0.7, "macro_f1": 0.6}},
        "seconds": 1.0} for i, m in enumerate(cfg.methods)}
    results[dataset_job("har", "floors", "floors", 0, 1.0).key] = {"missing": {
        "0": {"softmax/accuracy": 0.885, "softmax/macro_f1": 0.85},
        "0.1": {"softmax/accuracy": 0.8, "softmax/macro_f1": 0.75}}}
    report = DatasetObjectivesReport(cfg, results, "test machine")
    text = report.to_markdown()
    assert "| supervised | 0.900 | 0.700 | 0.800 | +1.5 pts vs softmax |" in text
    assert "| aemp | 0.860 | 0.700 | 0.800 | -2.5 pts vs softmax (below the floor) |" in text
    assert "| Floor: softmax on band energies | 0.885 | 0.800 | 0.850 |  |" in text
    assert "| robusthar + fusion head |" in text and "10 % missing" in text
    assert "can separate the methods" in text
    assert report.table()[1]["accuracy@labels1/missing0.1"] == pytest.approx(0.7)
    assert report.table()[-1] == {"method": "Floor: softmax on band energies", "accuracy@labels1/missing0": 0.885,
                                  "macro_f1@labels1/missing0": 0.85, "accuracy@labels1/missing0.1": 0.8,
                                  "macro_f1@labels1/missing0.1": 0.75}
    results[dataset_job("har", "floors", "floors", 0, 1.0).key]["missing"]["0"]["softmax/accuracy"] = 0.99
    assert "does not separate the methods" in DatasetObjectivesReport(cfg, results, "m").to_markdown()


def test_localization_margin_is_relative_to_the_better_of_knn_and_centroid():
    cfg = DatasetObjectivesConfig(dataset="csi", label_ratios=(0.15,), missing_rates=(0.0,))
    floors = {"knn/median_distance": 2.0, "centroid/median_distance": 2.5, "mean_position/median_distance": 6.0}
    results = {dataset_job("csi", "floors", "floors", 0, 0.15).key: {"missing": {"0": floors}},
               dataset_job("csi", "finetune", "spar", 0, 0.15).key: {"missing": {"0": {"median_distance": 1.5}}},
               dataset_job("csi", "finetune", "mae", 0, 0.15).key: {"missing": {"0": {"median_distance": 2.4}}}}
    report = DatasetObjectivesReport(cfg, results, "m")
    assert report.best_floor(0.15) == ("knn", 2.0)
    assert report.margin("spar", 0.15) == "-25 % vs knn"
    assert report.margin("mae", 0.15) == "+20 % vs knn (below the floor)"


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


def test_floors_and_models_lose_the_same_streams(tiny_window_set):
    """``missing_streams`` draws what the models' old per-batch transform drew, batch for batch."""
    import torch

    from train.data import drop_nodes, iterate_batches

    indices = np.arange(10, 40)
    seen = missing_streams(tiny_window_set, indices, 0.3, batch_size=8)
    generator = torch.Generator().manual_seed(7)
    for rows in iterate_batches(indices, 8, shuffle=False, seed=0, epoch=0, drop_last=False):
        batch = drop_nodes(tiny_window_set.batch(rows), 0.3, generator, per_modality=True)
        for name in batch.modalities:
            np.testing.assert_array_equal(seen.present[name][rows - 10], batch.present[name].numpy())
            np.testing.assert_array_equal(seen.tokens[name][rows - 10], batch.tokens[name].numpy())
    lost = sum((~seen.present[n] & tiny_window_set.present[n][indices]).sum() for n in seen.modalities)
    assert lost > 0
    assert np.array_equal(missing_streams(tiny_window_set, indices, 0.0, 8).present["microphone"],
                          tiny_window_set.present["microphone"][indices])
    np.testing.assert_array_equal(missing_streams(tiny_window_set, indices, 0.3, 8).present["geophone"],
                                  seen.present["geophone"])  # the same drops every time


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["har", "csi"])
def test_toy_run_has_floor_rows_and_computed_margins(dataset, tmp_path):
    cfg = toy_config(dataset, tmp_path / "work")
    messages: list[str] = []
    report = run_dataset_objectives(cfg, progress=messages.append)
    assert sum(m.startswith("[") for m in messages) == len(plan(cfg))
    text = report.to_markdown()
    floors = {"har": ["Floor: softmax on band energies"],
              "csi": ["Floor: kNN on band energies", "Floor: energy-weighted centroid", "Guess: mean position"]}
    for ratio in cfg.label_ratios:
        for floor in floors[dataset]:
            assert f"| {floor} |" in text
        for method in cfg.methods:
            # the margin is computed from the numbers in the results, not typed
            name, value = report.best_floor(ratio)
            mine = report.metric(method, ratio, 0.0, cfg.spec.metrics[0])[0]
            if dataset == "har":
                assert value == report.metric("floors", ratio, 0.0, "softmax/accuracy")[0]
                margin = f"{(mine - value) * 100:+.1f} pts vs softmax" + (" (below the floor)" if mine < value else "")
            else:
                assert value == min(report.metric("floors", ratio, 0.0, f"{f}/median_distance")[0]
                                    for f in ("knn", "centroid"))
                margin = f"{(mine / value - 1) * 100:+.0f} % vs {name}" + (" (below the floor)" if mine > value else "")
            assert f"| {margin} |" in text
    for ratio in cfg.label_ratios:  # every floor scored at every missing rate, on the heads' own subset
        result = report.results[dataset_job(dataset, "floors", "floors", 0, ratio).key]
        assert set(result["missing"]) == {"0", "0.15"}
        finetuned = report.results[dataset_job(dataset, "finetune", "spar", 0, ratio).key]
        assert result["train_windows"] == finetuned["train_windows"]
    if dataset == "csi":  # the centroid reads the received level of the APs: it beats knowing nothing
        low = min(cfg.label_ratios)
        assert report.metric("floors", low, 0.0, "centroid/median_distance")[0] < \
            report.metric("floors", low, 0.0, "mean_position/median_distance")[0]
    assert "separate the methods" in text
    report.plot(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    again: list[str] = []
    assert run_dataset_objectives(cfg, progress=again.append).results == report.results
    assert not any(m.startswith("[") for m in again), "finished jobs ran again"
