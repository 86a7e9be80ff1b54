"""The settings of one ``spar-bench fuzz`` run, and the site and model it uses by default.

A module of its own because both the run and the triage (which regenerates the run's messages)
read it, and neither should import the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SITE = REPO / "configs" / "sites" / "parking_lot.toml"
DEFAULT_MODEL = REPO / "models" / "parking_lot" / "manifest.json"


@dataclass(frozen=True)
class FuzzConfig:
    """What ``spar-bench fuzz`` runs: how many messages, which seed, site and model, and its bounds."""

    messages: int = 10_000
    seed: int = 0
    site: Path = DEFAULT_SITE
    model: Path = DEFAULT_MODEL
    block_size: int = 250  # one class per block; outcomes are read between blocks
    max_inflight: int = 100  # unacknowledged QoS 1 messages
    budget_s: float = 1800.0  # of fuzzing (after start-up); the run stops there and fails
    drain_timeout_s: float = 30.0  # a block whose messages are not all counted by then is given up
    progress: bool = True  # tqdm bar over the messages
