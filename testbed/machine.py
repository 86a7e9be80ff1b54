"""A one-line description of the machine and date, stamped on every benchmark table."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2 ** 20
    except (OSError, ValueError, IndexError):
        pass
    return None


def describe_machine(extra: dict[str, str] | None = None) -> str:
    """E.g. ``2026-11-28 · Intel Xeon ... · 2 cores · 24 GiB · Linux 6.1 · Python 3.11.7 · torch 2.13.0``."""
    parts = [datetime.date.today().isoformat(), cpu_model(), f"{os.cpu_count()} cores"]
    mem = memory_gib()
    if mem is not None:
        parts.append(f"{mem:.0f} GiB")
    parts += [f"{platform.system()} {platform.release()}", f"Python {platform.python_version()}"]
    parts += [f"{k} {v}" for k, v in (extra or {}).items()]
    return " · ".join(parts)
