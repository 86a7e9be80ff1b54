"""Shared fixtures of the train/ tests: one tiny parking-lot dataset made by the node exporter."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_firmware_sim.dataset import DatasetSpec, export_dataset
from train.data import WindowSet, load_windows

REPO = Path(__file__).resolve().parents[2]

# 48 windows in 3 shards, episodes of 4 windows with at most one vehicle: every class path of the
# loaders is exercised and generation stays near 2 s on one core (one worker: spawning a pool costs more).
TINY_PARKING = DatasetSpec(site=str(REPO / "configs" / "sites" / "parking_lot.toml"), scenario="parking_lot",
                           windows=48, seed=0, codec="png", shard_size=16,
                           params={"max_vehicles": 1, "episode_windows": 4})


@pytest.fixture(scope="session")
def tiny_parking_dataset(tmp_path_factory) -> Path:
    """Folder of a 48-window parking-lot dataset (read-only: copy it before changing anything)."""
    out = tmp_path_factory.mktemp("tiny_parking") / "dataset"
    export_dataset(TINY_PARKING, out, workers=1)
    return out


@pytest.fixture(scope="session")
def tiny_window_set(tiny_parking_dataset) -> WindowSet:
    """load_windows of the tiny dataset (shared: do not modify its arrays in place)."""
    return load_windows(tiny_parking_dataset, progress=False)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine torch's default of 2 made tiny steps 10-50x
    slower (thread hand-offs dominate models this small)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
