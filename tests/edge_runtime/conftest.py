"""Fixtures of the aggregator tests: the tiny untrained parking-lot model, and a disk that fails."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.tiny_onnx_model import build_tiny_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, parking_lot) -> Path:
    """Folder of the tiny ONNX model for the parking lot (``manifest.json``); read-only."""
    out = tmp_path_factory.mktemp("model")
    build_tiny_model(parking_lot, out)
    return out


@pytest.fixture
def fail_writes() -> Callable[[Path], Callable[[], None]]:
    """``fail_writes(database)`` makes every INSERT into a real result store fail, as a full or failing
    disk does (a trigger that aborts), until the function it returns is called."""
    def fail(database: Path) -> Callable[[], None]:
        conn = sqlite3.connect(database)
        conn.execute("CREATE TRIGGER fail BEFORE INSERT ON results BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
        conn.commit()

        def heal() -> None:
            conn.execute("DROP TRIGGER fail")
            conn.commit()
            conn.close()
        return heal
    return fail
