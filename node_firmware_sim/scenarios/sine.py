"""A trivial source: one steady tone per node and channel (see sine_source.py).

For smoke tests, the walking skeleton and link experiments where physics does not matter and
speed does.
"""

from __future__ import annotations

from typing import Any

from node_firmware_sim.scenarios.base import GroundTruth, SourceWindow, site_window_s
from node_firmware_sim.sine_source import sine_window
from spar_wire.site_layout import SiteLayout


class SineScenario:
    name = "sine"
    class_names = ("tone",)

    def __init__(self, layout: SiteLayout, seed: int = 0, *, noise: float = 0.01):
        self.layout = layout
        self.seed = seed
        self.noise = noise
        self.window_s = site_window_s(layout)

    def window(self, index: int, node_ids: tuple[str, ...] | None = None) -> SourceWindow:
        start_s = index * self.window_s
        nodes = [self.layout.node(n) for n in node_ids] if node_ids else self.layout.nodes
        signals = {(node.id, m): sine_window(self.layout.modalities[m].features, node.id, start_s,
                                             seed=self.seed, noise=self.noise)
                   for node in nodes for m in node.modalities}
        return SourceWindow(index, start_s, signals, GroundTruth(label=0))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "noise": self.noise}
