"""Reading TOML files (layouts, link configs, aggregator configs) with errors that name the file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from spar_wire.errors import WireError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def read_toml(path: str | Path, reason: str = "bad_file") -> dict[str, Any]:
    """The parsed file; WireError(reason) naming the file when it cannot be read or parsed."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WireError(reason, f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise WireError(reason, f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise WireError(reason, f"{path}: invalid TOML: {exc}") from None
