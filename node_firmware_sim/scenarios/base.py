"""What every signal source gives the firmware: raw multi-node samples of one window + truth.

Sources have random access by window index and are deterministic for a given (seed, index): the
dataset exporter generates windows in parallel on several cores, a field trial replays exactly,
and a test can ask for window 1234 without generating the 1233 before it. Scenarios that need
continuity (a vehicle driving through the lot) group windows into episodes seeded by
(seed, episode) and render every window of an episode from the same episode state.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from node_firmware_sim.errors import NodeError
from spar_wire.errors import WireError
from spar_wire.site_layout import SiteLayout


@dataclass(frozen=True)
class Target:
    """One thing the model should find: a vehicle, a hypocentre."""

    class_id: int  # index into the scenario's class_names
    position: tuple[float, ...]  # metres in the site frame: (x, y) vehicles, (x, y, depth) quakes


@dataclass(frozen=True)
class GroundTruth:
    label: int  # window class: vehicle class of the nearest vehicle (0 = none), activity, ...
    targets: tuple[Target, ...] = ()  # every vehicle / the hypocentre, at the window centre
    extras: dict[str, float] = field(default_factory=dict)  # magnitude, speed, subject id, ...


@dataclass(frozen=True)
class SourceWindow:
    """Raw samples of all nodes for one window.

    ``signals[(node_id, modality)]`` is [C, S] float64 (C channels, S = window samples of that
    modality), physical units of the sensor. A trace the node failed to record is absent from
    ``signals`` (the node sends nothing for it).
    """

    index: int
    start_s: float  # source time of the window start (window index x window length)
    signals: dict[tuple[str, str], np.ndarray]
    truth: GroundTruth


class Source(Protocol):
    """A scenario or a recording replay."""

    name: str
    layout: SiteLayout
    class_names: tuple[str, ...]  # names of GroundTruth.label values
    window_s: float  # window length shared by all modalities of the site

    def window(self, index: int, node_ids: tuple[str, ...] | None = None) -> SourceWindow:
        """Window ``index`` (>= 0) for ``node_ids`` (default: all nodes). Deterministic."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able parameters (scenario name, seed, physics constants) for manifests."""
        ...


def site_window_s(layout: SiteLayout) -> float:
    """The window length every modality of the site shares (``SiteLayout.window_s``); NodeError when
    they differ, so a scenario's caller sees the node package's error type."""
    try:
        return layout.window_s()
    except WireError as exc:
        raise NodeError(f"a source needs one window length per site: {exc}") from None


def episode_rng(seed: int, stream: str, *indices: int) -> np.random.Generator:
    """An independent, reproducible random stream for (seed, stream name, indices...)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(stream.encode()), *indices])


def check_window_index(index: int) -> int:
    """``index`` as an int; NodeError unless it is an integer >= 0."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise NodeError(f"window index must be an integer >= 0, got {index!r}")
    return int(index)


def node_key(node_id: str) -> int:
    """A stable integer for seeding per-node streams (independent of the node's place in the layout)."""
    return zlib.crc32(node_id.encode())
