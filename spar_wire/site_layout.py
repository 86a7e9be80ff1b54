"""Site layouts: which nodes sit where and what they sense, loaded from TOML.

Example (``configs/sites/parking_lot.toml``)::

    [site]
    id = "parking_lot"
    frame = "enu"                      # positions are metres east, north[, up] of an origin
    description = "..."

    [modalities.microphone]
    preset = "parking_lot_microphone"  # a spar_wire.feature_config.PRESETS entry
    sample_rate_hz = 16000             # any FeatureConfig field may be set here
    channels = 1

    [[nodes]]
    id = "n01"
    position = [0.0, 0.0]
    modalities = ["microphone", "geophone"]
    description = "north-west corner, on a lamp post"

Feature configs are per modality and per site, not per node: every node of a modality must
produce the same tokens for one model to read them all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spar_wire.errors import WireError
from spar_wire.feature_config import FeatureConfig, feature_preset
from spar_wire.numbers import is_finite_vector
from spar_wire.toml_file import read_toml
from spar_wire.topics import RESERVED_NODE_IDS, check_id

_SITE_KEYS = {"id", "frame", "description"}
_NODE_KEYS = {"id", "position", "modalities", "description"}


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    features: FeatureConfig

    @property
    def sample_rate_hz(self) -> float:
        return self.features.sample_rate_hz

    @property
    def channels(self) -> int:
        return self.features.channels


@dataclass(frozen=True)
class NodeSpec:
    id: str
    position: tuple[float, ...]  # metres in the site frame, length 2 or 3
    modalities: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class SiteLayout:
    site_id: str
    frame: str
    description: str
    modalities: dict[str, ModalitySpec]
    nodes: tuple[NodeSpec, ...]
    source: str = field(default="<memory>", compare=False)

    @property
    def node_ids(self) -> list[str]:
        return [n.id for n in self.nodes]

    @property
    def position_dim(self) -> int:
        """d_S: 2 or 3."""
        return len(self.nodes[0].position)

    def node(self, node_id: str) -> NodeSpec:
        for candidate in self.nodes:
            if candidate.id == node_id:
                return candidate
        raise WireError("unknown_node", f"{self.source}: no node {node_id!r} in site {self.site_id!r}")

    def positions(self) -> np.ndarray:
        """[N, d_S] float64 node positions in metres, in ``nodes`` order."""
        return np.array([n.position for n in self.nodes], dtype=np.float64)

    def window_s(self, modalities: Iterable[str] | None = None) -> float:
        """The window length, in seconds, that ``modalities`` (default: all of the site's) share.

        The one definition every unit uses: a window of a site is one span of time, so the nodes,
        the aggregator, the trials and the benchmarks all cut time the same way. WireError
        ``window_length_mismatch`` when the modalities' feature configs disagree.
        """
        names = tuple(self.modalities) if modalities is None else tuple(modalities)
        unknown = sorted(set(names) - set(self.modalities))
        if unknown:
            raise WireError("unknown_modality", f"{self.source}: site {self.site_id!r} has no modality {unknown}")
        lengths = {self.modalities[name].features.window_s for name in names}
        if len(lengths) != 1:
            raise WireError("window_length_mismatch",
                            f"{self.source}: modalities {sorted(names)} have different window lengths "
                            f"{sorted(lengths)} s; a site needs one window length")
        return lengths.pop()

    def feature_hashes(self) -> dict[str, str]:
        """Modality name -> feature-config hash."""
        return {name: spec.features.hash for name, spec in self.modalities.items()}


def load_site_layout(path: str | Path) -> SiteLayout:
    """Read and validate a site layout TOML file.

    Raises:
        WireError("bad_layout"): with the file, the node and the field in the message.
    """
    return parse_site_layout(read_toml(path, "bad_layout"), source=str(path))


def parse_site_layout(data: dict[str, Any], source: str = "<memory>") -> SiteLayout:
    """Validate an already-parsed layout dict (same schema as the TOML file)."""
    ctx = _Context(source)
    ctx.require_table(data, "top level")
    ctx.reject_unknown(data, {"site", "modalities", "nodes"}, "top level")
    site = ctx.require_table(data.get("site"), "[site]")
    ctx.reject_unknown(site, _SITE_KEYS, "[site]")
    site_id = ctx.wrap(lambda: check_id(site.get("id"), "site id"), "[site]", "id")
    frame = ctx.require_str(site, "frame", "[site]")
    description = ctx.optional_str(site, "description", "[site]")
    modalities = _parse_modalities(ctx, data.get("modalities"))
    nodes = _parse_nodes(ctx, data.get("nodes"), modalities)
    return SiteLayout(site_id, frame, description, modalities, nodes, source=source)


# --------------------------------------------------------------------------- internals
class _Context:
    """Builds error messages that name the file, the place (node/modality) and the field."""

    def __init__(self, source: str):
        self.source = source

    def error(self, where: str, field_name: str | None, message: str) -> WireError:
        location = f"{where}: field '{field_name}'" if field_name else where
        return WireError("bad_layout", f"{self.source}: {location}: {message}")

    def wrap(self, fn, where: str, field_name: str):
        try:
            return fn()
        except WireError as exc:
            raise self.error(where, field_name, exc.detail) from None

    def require_table(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise self.error(where, None, f"expected a table, got {type(value).__name__}")
        return value

    def reject_unknown(self, table: dict, known: set[str], where: str) -> None:
        unknown = sorted(set(table) - known)
        if unknown:
            raise self.error(where, unknown[0], f"unknown field; known fields: {', '.join(sorted(known))}")

    def require_str(self, table: dict, key: str, where: str) -> str:
        value = table.get(key)
        if not isinstance(value, str) or not value.strip():
            raise self.error(where, key, f"expected a non-empty string, got {value!r}")
        return value

    def optional_str(self, table: dict, key: str, where: str) -> str:
        value = table.get(key, "")
        if not isinstance(value, str):
            raise self.error(where, key, f"expected a string, got {type(value).__name__}")
        return value


def _parse_modalities(ctx: _Context, raw: Any) -> dict[str, ModalitySpec]:
    table = ctx.require_table(raw, "[modalities]")
    if not table:
        raise ctx.error("[modalities]", None, "at least one modality is required")
    out = {}
    for name, section in table.items():
        where = f"modality '{name}'"
        ctx.wrap(lambda name=name: check_id(name, "modality name"), where, "name")
        section = dict(ctx.require_table(section, where))
        preset_name = section.pop("preset", None)
        base = {}
        if preset_name is not None:
            base = ctx.wrap(lambda p=preset_name: feature_preset(p), where, "preset").to_dict()
        try:
            features = FeatureConfig.from_dict({**base, **section}, where="features")
        except WireError as exc:
            raise ctx.error(where, None, exc.detail) from None
        out[name] = ModalitySpec(name, features)
    return out


def _parse_nodes(ctx: _Context, raw: Any, modalities: dict[str, ModalitySpec]) -> tuple[NodeSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ctx.error("[[nodes]]", None, "at least one [[nodes]] entry is required")
    nodes: list[NodeSpec] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(raw):
        node = _parse_node(ctx, index, entry, modalities)
        where = f"node '{node.id}' (nodes[{index}])"
        if node.id in seen:
            raise ctx.error(where, "id", f"duplicate of nodes[{seen[node.id]}]")
        seen[node.id] = index
        if nodes and len(node.position) != len(nodes[0].position):
            raise ctx.error(where, "position", f"has {len(node.position)} coordinates, nodes[0] "
                            f"has {len(nodes[0].position)}; all nodes must use the same dimension")
        nodes.append(node)
    return tuple(nodes)


def _parse_node(ctx: _Context, index: int, entry: Any, modalities: dict[str, ModalitySpec]) -> NodeSpec:
    where = f"nodes[{index}]"
    entry = ctx.require_table(entry, where)
    node_id = ctx.wrap(lambda: check_id(entry.get("id"), "node id"), where, "id")
    if node_id in RESERVED_NODE_IDS:
        raise ctx.error(where, "id", f"{node_id!r} is reserved")
    where = f"node '{node_id}' (nodes[{index}])"
    ctx.reject_unknown(entry, _NODE_KEYS, where)
    position = entry.get("position")
    if not isinstance(position, list) or not is_finite_vector(position, (2, 3)):
        raise ctx.error(where, "position", f"expected 2 or 3 finite numbers (metres), got {position!r}")
    mods = entry.get("modalities")
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
        raise ctx.error(where, "modalities", f"expected a non-empty list of names, got {mods!r}")
    for name in mods:
        if name not in modalities:
            raise ctx.error(where, "modalities", f"{name!r} is not defined under [modalities] "
                            f"(defined: {', '.join(modalities)})")
    if len(set(mods)) != len(mods):
        raise ctx.error(where, "modalities", f"lists a modality twice: {mods!r}")
    description = ctx.optional_str(entry, "description", where)
    return NodeSpec(node_id, tuple(float(v) for v in position), tuple(mods), description)
