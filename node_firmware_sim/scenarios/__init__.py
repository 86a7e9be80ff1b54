"""Physics scenarios and recording replays that feed the node firmware (see base.py).

``SCENARIOS`` maps a scenario name to ``module:Class``; classes load on first use so that a
command needing one scenario does not import the others.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from node_firmware_sim.errors import NodeError
from node_firmware_sim.scenarios.base import Source
from spar_wire.site_layout import SiteLayout

SCENARIOS = {
    "parking_lot": "node_firmware_sim.scenarios.parking_lot:ParkingLotScenario",
    "earthquakes": "node_firmware_sim.scenarios.earthquakes:EarthquakeScenario",
    "body_har": "node_firmware_sim.scenarios.body_har:BodyHarScenario",
    "indoor_csi": "node_firmware_sim.scenarios.indoor_csi:IndoorCsiScenario",
    "sine": "node_firmware_sim.scenarios.sine:SineScenario",
}


def make_scenario(name: str, layout: SiteLayout, seed: int = 0, **params: Any) -> Source:
    """Build scenario ``name`` for ``layout``; NodeError for unknown names or parameters."""
    if name not in SCENARIOS:
        raise NodeError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    module_name, class_name = SCENARIOS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    try:
        return cls(layout, seed, **params)
    except TypeError as exc:
        raise NodeError(f"scenario {name}: bad parameters {sorted(params)}: {exc}") from None


def parse_scenario_params(items: list[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` from the command line -> scenario keyword arguments (JSON values;
    anything that is not JSON is a bare string). NodeError names a malformed item."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise NodeError(f"--param {item!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params
