"""Shared fixtures of the export/ tests: the tiny parking-lot dataset, a tiny trained DeployModel and its
FP32 ONNX export with a manifest (session-scoped: built once, read-only for the tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data import WindowSet, temporal_split, token_statistics

REPO = Path(__file__).resolve().parents[2]

TASKS = ("classify", "localize", "detect")


@pytest.fixture(autouse=True, scope="session")
def _one_thread(one_torch_thread):
    """tiny_parking_dataset, tiny_window_set and one_torch_thread live in tests/conftest.py."""
    yield


@pytest.fixture(scope="session")
def tiny_split(tiny_window_set) -> tuple[np.ndarray, np.ndarray]:
    """(calibration / training windows, held-out windows): a temporal 36 / 12 cut on episode bounds."""
    return temporal_split(len(tiny_window_set), 0.25, align=4)


def build_deploy_model(windows: WindowSet, tasks=TASKS, *, dim: int = 16, seed: int = 0):
    """A tiny DeployModel for ``windows``: width ``dim``, one block per encoder and head."""
    from export.deploy_model import DeployModel
    from train.heads import make_head
    from train.models.config import ModalitySpec, SparConfig
    from train.models.spar import SparEncoder

    torch.manual_seed(seed)
    cfg = SparConfig(modalities=tuple(ModalitySpec(m, *shape) for m, shape in windows.token_shapes.items()),
                     max_nodes=16, position_dims=windows.position_dims, dim=dim, heads=2, modality_depth=1,
                     joint_depth=1, structural_dims=2, decoder_dim=dim)
    encoder = SparEncoder(cfg)
    encoder.set_token_statistics(token_statistics(windows))
    heads = {task: make_head(task, dim, len(windows.class_names), windows.target_dims,
                             **({"layers": 1, "n_queries": 4} if task == "detect" else {})) for task in tasks}
    return DeployModel(encoder, heads, len(windows.class_names), windows.target_dims).eval()


def train_briefly(model, windows: WindowSet, indices, steps: int = 60, seed: int = 0):
    """A few supervised Adam steps on every head (encoder included), so logits have real margins and
    activations realistic ranges; an untrained model makes quantization parity look easier than it is."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = windows.batch(rng.choice(indices, size=min(12, len(indices)), replace=False))
        features = model.encoder.forward_features(batch)
        loss = sum(head.loss(head(features.latents, features.valid), batch, features.frame)
                   for head in model.heads.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_model(tiny_window_set, tiny_split):
    """Tiny classify + localize + detect DeployModel, trained 60 steps on the first 36 windows."""
    return train_briefly(build_deploy_model(tiny_window_set), tiny_window_set, tiny_split[0])


def data_info(windows: WindowSet) -> dict:
    return {"feature_hashes": windows.feature_hashes, "class_names": list(windows.class_names)}


@dataclass(frozen=True)
class Exported:
    onnx: Path
    manifest: Path


@pytest.fixture(scope="session")
def fp32_export(trained_model, tiny_window_set, tmp_path_factory) -> Exported:
    """``trained_model`` as FP32 ``model.onnx`` with ``manifest.json`` beside it (read-only)."""
    from export.manifests import manifest_for, manifest_path_for
    from export.onnx_export import export_onnx

    path = export_onnx(trained_model, tmp_path_factory.mktemp("fp32") / "model.onnx")
    manifest = manifest_for(trained_model, data_info(tiny_window_set), path, name="tiny-parking", version="0.0.1",
                            metric={"name": "accuracy", "value": 0.0})
    manifest.write(manifest_path_for(path))
    return Exported(path, manifest_path_for(path))


@pytest.fixture(scope="session")
def untrained_deploy_model():
    """A tiny untrained encoder with classify, localize and detect heads (detect adds cross-attention
    and an unmasked query self-attention): for export tests that need every attention path, not a
    task metric. Read-only."""
    from export.deploy_model import DeployModel
    from train.heads import make_head
    from train.models.config import ModalitySpec, SparConfig
    from train.models.spar import SparEncoder

    torch.manual_seed(0)
    cfg = SparConfig(modalities=(ModalitySpec("microphone", 8, 12), ModalitySpec("geophone", 4, 6)), max_nodes=16,
                     dim=16, heads=2, modality_depth=1, joint_depth=1, structural_dims=2)
    encoder = SparEncoder(cfg)
    encoder.set_token_statistics({"microphone": (-60.0, 10.0), "geophone": (-60.0, 10.0)})
    heads = {task: make_head(task, 16, 5, 2) for task in TASKS}
    return DeployModel(encoder, heads, n_classes=5, out_dims=2).eval()
