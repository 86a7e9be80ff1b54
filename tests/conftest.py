"""Shared fixtures: a real Mosquitto on an ephemeral loopback port, site layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from spar_wire.site_layout import SiteLayout, load_site_layout
from testbed.local_broker import LocalBroker, find_mosquitto

REPO = Path(__file__).resolve().parents[1]
SITES = REPO / "configs" / "sites"

# 48 windows in 3 shards, episodes of 4 windows with at most one vehicle: every class path of the
# loaders is exercised and generation stays near 2 s on one core (one worker: spawning a pool costs more).
TINY_PARKING = {"scenario": "parking_lot", "windows": 48, "seed": 0, "codec": "png", "shard_size": 16,
                "params": {"max_vehicles": 1, "episode_windows": 4}}


def pytest_collection_modifyitems(config, items):
    """Every test that uses the ``mosquitto`` fixture carries the ``mosquitto`` marker, so
    ``-m "not mosquitto"`` leaves out every test that starts a broker, marked by hand or not."""
    for item in items:
        if "mosquitto" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.mosquitto)


@pytest.fixture
def mosquitto(tmp_path) -> LocalBroker:
    """A private Mosquitto on 127.0.0.1:<free port>, stopped after the test."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or "
                    "`sudo apt-get install mosquitto`")
    broker = LocalBroker(workdir=tmp_path / "broker")
    with broker:
        yield broker


@pytest.fixture(scope="session")
def parking_lot() -> SiteLayout:
    return load_site_layout(SITES / "parking_lot.toml")


@pytest.fixture(scope="session")
def tiny_parking_dataset(tmp_path_factory) -> Path:
    """Folder of a 48-window parking-lot dataset (read-only: copy it before changing anything)."""
    from node_firmware_sim.dataset import DatasetSpec, export_dataset

    out = tmp_path_factory.mktemp("tiny_parking") / "dataset"
    export_dataset(DatasetSpec(site=str(SITES / "parking_lot.toml"), **TINY_PARKING), out, workers=1)
    return out


@pytest.fixture(scope="session")
def tiny_window_set(tiny_parking_dataset):
    """load_windows of the tiny dataset (shared: do not modify its arrays in place)."""
    from train.data import load_windows

    return load_windows(tiny_parking_dataset, progress=False)


@pytest.fixture(scope="session")
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine torch's default of 2 made tiny steps 10-50x
    slower (thread hand-offs dominate models this small). Used by the torch test folders."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_trt():
    """The ``tensorrt`` module where a real engine can be built here (TensorRT >= 10, cuda-python,
    a usable GPU); the test is skipped otherwise, naming what is missing."""
    from edge_runtime.errors import AggregatorError
    from edge_runtime.inference.tensorrt_backend import import_cudart

    trt = pytest.importorskip("tensorrt", reason="tensorrt is not installed (GPU / Jetson machines only)")
    if int(trt.__version__.split(".")[0]) < 10:
        pytest.skip(f"TensorRT {trt.__version__} < 10")
    try:
        import_cudart()  # the backend's own import: the skip follows exactly what it needs
    except AggregatorError:
        pytest.skip("cuda-python is not installed (the TensorRT backend needs it for device memory)")
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    except (RuntimeError, TypeError) as exc:
        pytest.skip(f"TensorRT could not create a builder (no usable CUDA GPU?): {exc}")
    if builder is None:
        pytest.skip("TensorRT could not create a builder (no usable CUDA GPU?)")
    return trt
