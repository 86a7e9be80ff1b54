"""The train/ tests run torch with one thread (fixtures: tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_thread(one_torch_thread):
    yield
