"""spar-bench model: ONNX artifacts of a model folder against the floors, targets checked from the numbers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from benchmarks.cli import main
from benchmarks.model_check import (
    ModelCheckConfig,
    check_targets,
    drop_messages,
    localization_summary,
    run_model_check,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def model_dir(tiny_window_set, tmp_path_factory):
    """A tiny classify + localize model exported like `make models` lays it out."""
    from export.deploy_model import DeployModel
    from export.manifests import manifest_for, manifest_path_for
    from export.onnx_export import export_onnx
    from train.data import token_statistics
    from train.heads import make_head
    from train.models.config import ModalitySpec, SparConfig
    from train.models.spar import SparEncoder

    w = tiny_window_set
    torch.manual_seed(0)
    cfg = SparConfig(modalities=tuple(ModalitySpec(m, *s) for m, s in w.token_shapes.items()), max_nodes=16,
                     position_dims=2, dim=16, heads=2, modality_depth=1, joint_depth=1, structural_dims=2,
                     decoder_dim=16)
    encoder = SparEncoder(cfg)
    encoder.set_token_statistics(token_statistics(w))
    heads = {t: make_head(t, 16, len(w.class_names), 2) for t in ("classify", "localize")}
    model = DeployModel(encoder, heads, len(w.class_names), 2).eval()
    root = tmp_path_factory.mktemp("model")
    path = export_onnx(model, root / "model.onnx")
    info = {"feature_hashes": w.feature_hashes, "class_names": list(w.class_names)}
    manifest_for(model, info, path, name="tiny", version="0.0.1", metric={}).write(manifest_path_for(path))
    shutil.copy(path, root / "model.int8.onnx")
    (root / "teacher").mkdir()
    shutil.copy(path, root / "teacher" / "model.onnx")
    return root


def test_report_rows_and_targets_come_from_the_numbers(model_dir, tiny_parking_dataset, tmp_path):
    cfg = ModelCheckConfig(model_dir=model_dir, test_data=tiny_parking_dataset, train_data=tiny_parking_dataset,
                           loss_rates=(0.0, 0.5), threads=1)
    report = run_model_check(cfg, progress=lambda _: None)
    for rate in (0.0, 0.5):
        assert set(report.rows[rate]) == {"INT8 student", "FP32 student", "FP32 teacher", "Floor: softmax",
                                          "Floor: kNN", "Floor: energy centroid"}
    student = report.rows[0.0]["INT8 student"]
    assert report.rows[0.0]["FP32 student"] == student  # the same file: the same numbers
    assert student["accuracy"] != report.rows[0.5]["INT8 student"]["accuracy"] or \
        student["mean_distance"] != report.rows[0.5]["INT8 student"]["mean_distance"]
    met = {what: ok for what, _, ok in report.targets}
    assert met["accuracy >= 0.99"] == (student["accuracy"] >= 0.99)
    assert met["mean error <= 5 m"] == (student["mean_distance"] <= 5.0)
    text = report.to_markdown()
    assert "## 50% of messages lost" in text and "| Floor: kNN |" in text and "tiny 0.0.1" in text


def test_localization_summary_counts_only_targets_inside_the_lot():
    box = (np.array([0.0, 0.0]), np.array([40.0, 30.0]))
    truth = np.array([[10.0, 10.0], [50.0, 10.0], [np.nan, np.nan]])
    pred = np.array([[13.0, 14.0], [50.0, 30.0], [0.0, 0.0]])
    s = localization_summary(pred, truth, box)
    assert s["mean_distance"] == pytest.approx(12.5) and s["median_inside_lot"] == pytest.approx(5.0)
    assert s["inside_lot_targets"] == 1


def test_targets_compare_against_the_floors():
    rows = {"INT8 student": {"accuracy": 0.995, "mean_distance": 4.0, "median_inside_lot": 2.0},
            "Floor: softmax": {"accuracy": 0.997}, "Floor: kNN": {"mean_distance": 8.0}}
    met = {what: ok for what, _, ok in check_targets(rows)}
    assert met == {"accuracy >= 0.99": True, "accuracy not below the softmax floor": False,
                   "mean error <= 5 m": True, "mean error >= 40% below the kNN floor": True,
                   "median error inside the lot <= 3 m": True}


def test_message_drops_are_reproducible_and_near_the_rate():
    present = {"microphone": np.ones((400, 8), bool)}
    a, b = drop_messages(present, 0.2, 3), drop_messages(present, 0.2, 3)
    assert np.array_equal(a["microphone"], b["microphone"])
    assert 0.15 < 1 - a["microphone"].mean() < 0.25


def test_cli_refuses_a_missing_recording(tmp_path, capsys):
    assert main(["model", "--model", str(tmp_path), "--test", str(tmp_path / "none"), "--train", str(tmp_path)]) == 2
    assert "not a dataset folder" in capsys.readouterr().err


def test_a_seismic_model_is_checked_in_km_against_the_quake_floors(tmp_path):
    """The shipped seismic model on a short recording of seeds it never trained on."""
    from pathlib import Path

    from node_firmware_sim.dataset import DatasetSpec, export_dataset

    repo = Path(__file__).resolve().parents[2]
    for name, seed, windows in (("test", 77, 40), ("train", 78, 80)):
        export_dataset(DatasetSpec(site=str(repo / "configs/sites/ridgecrest_like.toml"), scenario="earthquakes",
                                   windows=windows, seed=seed, codec="webp:85", shard_size=windows),
                       tmp_path / name, workers=1, overwrite=True)
    report = run_model_check(ModelCheckConfig(model_dir=repo / "models/ridgecrest_like", test_data=tmp_path / "test",
                                              train_data=tmp_path / "train", loss_rates=(0.0,), threads=1),
                             progress=lambda _: None)
    rows = report.rows[0.0]
    # 0.1.0 ships its teacher undistilled (TRAINING.md): the rows name the artifacts for what they are
    shipped = "INT8 student" if report.manifest["training"]["student"] else "INT8 model (the teacher)"
    assert {shipped, "Floor: STA/LTA + grid search", "Floor: first-arrival station",
            "Guess: mean hypocentre"} <= set(rows)
    mine, grid = rows[shipped]["hypocentre_mean"], rows["Floor: STA/LTA + grid search"]["hypocentre_mean"]
    assert report.targets[0] == ("mean hypocentre error below the STA/LTA + grid search floor",
                                 f"{mine / 1000:.2f} vs {grid / 1000:.2f} km", mine < grid)
    text = report.to_markdown()
    assert "| model | hypocentre mean km |" in text and "spar-ridgecrest" in text
    assert f"| {shipped} | {mine / 1000:.2f} |" in text


def test_a_detection_model_is_checked_in_map_against_the_detection_floors(tmp_path):
    """A tiny node-anchored detector, exported and shipped undistilled, on a busy-lot recording."""
    from dataclasses import replace
    from pathlib import Path

    from export.deploy_model import DeployModel
    from export.manifests import manifest_for, manifest_path_for
    from export.onnx_export import export_onnx
    from node_firmware_sim.dataset import DatasetSpec, export_dataset
    from train.data import load_windows, token_statistics
    from train.heads import make_head_variant
    from train.models.config import ModalitySpec, SparConfig
    from train.models.spar import SparEncoder

    repo = Path(__file__).resolve().parents[2]
    for name, seed in (("test", 77), ("train", 78)):
        export_dataset(DatasetSpec(site=str(repo / "configs/sites/parking_lot.toml"), scenario="parking_lot",
                                   windows=40, seed=seed, codec="webp:85", shard_size=40,
                                   params={"max_vehicles": 3}), tmp_path / name, workers=1, overwrite=True)
    w = load_windows(tmp_path / "train", progress=False)
    torch.manual_seed(0)
    cfg = SparConfig(modalities=tuple(ModalitySpec(m, *s) for m, s in w.token_shapes.items()), max_nodes=8,
                     position_dims=2, dim=16, heads=2, modality_depth=1, joint_depth=1, structural_dims=2)
    encoder = SparEncoder(cfg)
    encoder.set_token_statistics(token_statistics(w))
    head = make_head_variant("anchors", 16, len(w.class_names), 2, layers=1, position_dims=2)
    model = DeployModel(encoder, {"detect": head}, len(w.class_names), 2).eval()
    root = tmp_path / "model"
    path = export_onnx(model, root / "model.onnx", check_nodes=(8,))
    info = {"feature_hashes": w.feature_hashes, "class_names": list(w.class_names)}
    manifest = manifest_for(model, info, path, name="tiny-multi", version="0.0.1", metric={})
    replace(manifest, training={"student": False}).write(manifest_path_for(path))
    shutil.copy(path, root / "model.int8.onnx")
    report = run_model_check(ModelCheckConfig(model_dir=root, test_data=tmp_path / "test",
                                              train_data=tmp_path / "train", loss_rates=(0.0, 0.5), threads=1),
                             progress=lambda _: None)
    for rate in (0.0, 0.5):
        assert set(report.rows[rate]) == {"INT8 model (the teacher)", "FP32 model (the teacher)",
                                          "Floor: energy peaks", "Floor: kNN"}
    rows = report.rows[0.0]
    mine, peaks = rows["INT8 model (the teacher)"]["mAP@8"], rows["Floor: energy peaks"]["mAP@8"]
    assert 0.0 <= mine <= 1.0 and set(rows["Floor: kNN"]) == {"mAP@4", "mAP@6", "mAP@8", "mAP@10"}
    assert report.targets[0] == ("mAP@8 above the energy peaks floor", f"{mine:.3f} vs {peaks:.3f}", mine > peaks)
    assert report.targets[-1][0] == "INT8 within 0.02 mAP@8 of the FP32 model (the teacher)"
    assert report.targets[-1][2]  # the same graph twice
    text = report.to_markdown()
    assert "| model | mAP@4 | mAP@6 | mAP@8 | mAP@10 |" in text
    assert f"| INT8 model (the teacher) | {rows['INT8 model (the teacher)']['mAP@4']:.3f} |" in text
