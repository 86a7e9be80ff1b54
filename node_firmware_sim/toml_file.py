"""Reading the simulator's TOML files (link configs, recording lists) with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from node_firmware_sim.errors import NodeError
from spar_wire.errors import WireError
from spar_wire.toml_file import read_toml as read_wire_toml


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed file; NodeError naming the file when it cannot be read or parsed."""
    try:
        return read_wire_toml(path)
    except WireError as exc:
        raise NodeError(exc.detail) from None
