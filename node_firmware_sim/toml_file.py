"""Reading the simulator's TOML files (link configs, recording lists) with clear errors."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from node_firmware_sim.errors import NodeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed file; NodeError naming the file when it cannot be read or parsed."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise NodeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise NodeError(f"{path}: invalid TOML: {exc}") from None
