"""Which nodes the aggregator listens to, where they are, and which slot they take.

Starts from the site layout (positions, modalities) and follows the retained birth and state
messages: a birth whose feature hashes or modalities do not match the model's manifest is refused
with a reason; a birth from a node the layout does not know admits a new node (placement changes
in the field); a moved node's new position is used from its next window on. A will or state
``offline`` from an older connection (lower bdSeq) is ignored.

Slots (``node_index``, see ``edge_runtime.site_binding``): a layout node takes the trained slot of
its id in the manifest's training site, else that of the nearest trained node; a node that is not
in the layout takes the slot of the nearest trained node (the nearest layout node's when the
manifest does not record its training site), as the SPAR paper does for unseen nodes, and is
appended to the tensor after the layout nodes.

Bounds: a birth's position must lie within ``MAX_COORDINATE_M`` on every axis (so it stays finite,
and precise enough, in the float32 placement tensor) and within ``max_node_distance_m`` of the
layout's bounding box; otherwise it is refused (``position_out_of_site``) and the node keeps its
last good position (a layout node its layout place, a known node its last accepted birth's; an
unknown node does not join): one bad birth, retained by the broker, must not poison every result.

Restarts: with a :class:`~edge_runtime.node_store.NodeStore`, every joined or moved node is written
to SQLite when its birth is accepted and read back in the constructor, offline until its birth
arrives, so the backlog the broker hands over before the retained births lands with the right
positions and slots instead of being refused as ``unknown_node``.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field, replace

import numpy as np

from edge_runtime.node_store import NodeStore, StoredNode
from edge_runtime.site_binding import bind_site, nearest_trained_slot
from spar_wire.lifecycle import BirthMessage, StateMessage
from spar_wire.model_manifest import ModelManifest
from spar_wire.site_layout import NodeSpec, SiteLayout

MAX_REFUSED = 1024  # refused node ids remembered (oldest forgotten first)
# No site frame reaches this far (metres from its origin, per axis); float32 still holds it to metres,
# while 1e39 becomes inf and every result NaN.
MAX_COORDINATE_M = 1e8
DEFAULT_MAX_NODE_DISTANCE_M = 1000.0  # AggregatorConfig.max_node_distance_m's default
POSITION_OUT_OF_SITE = "position_out_of_site"  # the refusal reason (counted as refused.<reason>)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisteredNode:
    id: str
    position: tuple[float, ...]
    modalities: tuple[str, ...]  # the model's modalities this node sends
    node_index: int  # structural slot
    online: bool = False  # birth seen and no later offline
    bd_seq: int = -1
    from_layout: bool = True
    description: str = ""  # placement in words (layout, or the latest birth that gave one): SPAR+LLM input


@dataclass(frozen=True)
class RegistrySnapshot:
    """The node set of one window: order, positions, slots. Immutable, cheap to share."""

    node_ids: tuple[str, ...]
    positions: np.ndarray  # [N, d_S] float32, metres
    node_index: np.ndarray  # [N] int64
    modalities: dict[str, tuple[str, ...]]  # node id -> modalities it sends
    expected: frozenset[tuple[str, str]]  # (node, modality) pairs a complete window holds
    descriptions: tuple[str, ...] = ()  # [N] placement descriptions, node order

    def slot(self, node_id: str) -> int:
        return self.node_ids.index(node_id)


@dataclass
class Decision:
    accepted: bool
    reason: str = ""  # counter label when refused / ignored
    detail: str = ""  # human explanation for the log


@dataclass
class _State:
    nodes: dict[str, RegisteredNode] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # node id -> why
    version: int = 0


class NodeRegistry:
    """Thread-safe registry; snapshots are rebuilt only when something changed."""

    def __init__(self, layout: SiteLayout, manifest: ModelManifest, *, store: NodeStore | None = None,
                 max_node_distance_m: float = DEFAULT_MAX_NODE_DISTANCE_M):
        """``store``: where joined and moved nodes are kept across restarts (read here, before the
        first message; the registry closes it in :meth:`close`). ``max_node_distance_m``: how far
        from the layout's bounding box a birth may place a node."""
        self.layout = layout
        self.manifest = manifest
        self.model_modalities = tuple(manifest.modalities)
        self._lock = threading.Lock()
        self._state = _State()
        self._snapshot: RegistrySnapshot | None = None
        self._snapshot_version = -1
        self.counts: collections.Counter[str] = collections.Counter()
        self.max_node_distance_m = float(max_node_distance_m)
        self._store = store
        self._persisted: set[str] = set()  # ids with a row in the store
        self._layout_nodes = {node.id: node for node in layout.nodes}
        positions = layout.positions().reshape(len(layout.nodes), -1)
        # The site's extent: distances are measured to its bounding box, so a large site's corner
        # nodes are never "far" whatever the bound.
        self._site_low = positions.min(axis=0) if len(positions) else None
        self._site_high = positions.max(axis=0) if len(positions) else None
        # By id from the manifest's training site, not by layout order: another site's node i is not
        # the node whose slot i the model learned (layout order only when the manifest cannot tell).
        slots = bind_site(layout, manifest).slots
        for node in layout.nodes:
            mods = tuple(m for m in node.modalities if m in manifest.modalities)
            self._state.nodes[node.id] = RegisteredNode(node.id, node.position, mods, slots[node.id],
                                                        description=node.description)
        if store is not None:
            self._restore(store.load(layout.site_id))

    def close(self) -> None:
        """Close the node store (the registry in memory stays usable, but persists nothing more)."""
        if self._store is not None:
            self._store.close()

    # ------------------------------------------------------------------ lifecycle messages
    def on_birth(self, birth: BirthMessage) -> Decision:
        """Admit, update or refuse a node from its birth message."""
        problem = self._check_birth(birth)
        with self._lock:
            known = self._state.nodes.get(birth.node)
            if (problem and problem.reason == POSITION_OUT_OF_SITE and known is not None
                    and birth.node not in self._state.refused):
                # Only the position is wrong (a typo, a GPS glitch, a hostile publish): the node keeps
                # its last good position and its data keeps flowing. Nothing changes, so nothing is
                # written: the stored position stays the good one too.
                self.counts[f"refused.{problem.reason}"] += 1
                return problem
            if problem:
                self._state.refused[birth.node] = problem.detail
                while len(self._state.refused) > MAX_REFUSED:  # hostile births cannot grow this forever
                    del self._state.refused[next(iter(self._state.refused))]
                if known is not None and known.from_layout:
                    self._state.nodes[birth.node] = replace(known, online=False)
                elif known is not None:
                    del self._state.nodes[birth.node]
                    self._forget(birth.node)  # or the next restart would bring it back
                self._changed()
                self.counts[f"refused.{problem.reason}"] += 1
                return problem
            self._state.refused.pop(birth.node, None)
            mods = tuple(m for m in birth.modalities if m in self.manifest.modalities)
            if known is None and len(self._state.nodes) >= self.manifest.node_range[1]:
                # The model takes at most this many nodes; also bounds what spoofed births can add.
                self.counts["refused.too_many_nodes"] += 1
                return Decision(False, "too_many_nodes", f"{birth.node}: the model takes at most "
                                f"{self.manifest.node_range[1]} nodes")
            if known is None:
                node = RegisteredNode(birth.node, birth.position, mods, self._nearest_slot(birth.position),
                                      online=True, bd_seq=birth.bd_seq, from_layout=False,
                                      description=birth.description)
                self.counts["joined"] += 1
            else:
                if known.position != birth.position:
                    self.counts["moved"] += 1
                # A birth without a description keeps the one we know (a moved node is still itself).
                node = replace(known, position=birth.position, modalities=mods, online=True,
                               bd_seq=birth.bd_seq, description=birth.description or known.description)
            self._state.nodes[birth.node] = node
            self._changed()
            # Under the lock, so the store follows births in order; the ingest thread is the only
            # caller and the deadline sweep waits for it anyway, so the fsync blocks no one else.
            self._persist(node)
        self.counts["birth"] += 1
        return Decision(True)

    def on_state(self, node_id: str, state: StateMessage) -> Decision:
        """Mark a node offline/online; a state from an older connection is ignored."""
        with self._lock:
            node = self._state.nodes.get(node_id)
            if node is None:
                return Decision(False, "state_unknown_node", f"state for unknown node {node_id}")
            if state.bd_seq < node.bd_seq:
                self.counts["stale_state"] += 1
                return Decision(False, "stale_state", f"{node_id}: bdSeq {state.bd_seq} < {node.bd_seq}")
            online = state.state == "online"
            if node.online != online:
                self._state.nodes[node_id] = replace(node, online=online, bd_seq=state.bd_seq)
                self._changed()
        return Decision(True)

    # ------------------------------------------------------------------ data path
    def check_data(self, node_id: str, modality: str, feature_hash: str) -> Decision:
        """Whether a token message from ``node_id`` may enter a window."""
        with self._lock:
            if node_id in self._state.refused:
                return Decision(False, "refused_node", self._state.refused[node_id])
            node = self._state.nodes.get(node_id)
        if node is None:
            return Decision(False, "unknown_node", f"no birth and not in the site layout: {node_id}")
        requirement = self.manifest.modalities.get(modality)
        if requirement is None or modality not in node.modalities:
            return Decision(False, "unknown_modality", f"{node_id}/{modality} is not an input of the model")
        if feature_hash != requirement.feature_hash:
            return Decision(False, "feature_hash_mismatch",
                            f"{node_id}/{modality}: feature hash {feature_hash} != model's "
                            f"{requirement.feature_hash}")
        return Decision(True)

    def snapshot(self) -> RegistrySnapshot:
        """The current node set (rebuilt only after a change)."""
        with self._lock:
            if self._snapshot is None or self._snapshot_version != self._state.version:
                self._snapshot = self._build_snapshot()
                self._snapshot_version = self._state.version
            return self._snapshot

    def nodes(self) -> list[RegisteredNode]:
        with self._lock:
            return list(self._state.nodes.values())

    def refused(self) -> dict[str, str]:
        with self._lock:
            return dict(self._state.refused)

    # ------------------------------------------------------------------ internals
    def _check_birth(self, birth: BirthMessage) -> Decision | None:
        if birth.site != self.layout.site_id:
            return Decision(False, "wrong_site", f"{birth.node}: birth for site {birth.site}")
        if len(birth.position) != self.manifest.position_dim:
            return Decision(False, "position_dim", f"{birth.node}: {len(birth.position)}-D position, "
                            f"the model takes {self.manifest.position_dim}-D")
        shared = [m for m in birth.modalities if m in self.manifest.modalities]
        if not shared:
            return Decision(False, "modalities", f"{birth.node}: modalities {sorted(birth.modalities)} "
                            f"share nothing with the model's {sorted(self.manifest.modalities)}")
        for name in shared:
            want, got = self.manifest.modalities[name].feature_hash, birth.modalities[name].feature_hash
            if want != got:
                return Decision(False, "feature_hash_mismatch",
                                f"{birth.node}/{name}: feature hash {got} != model's {want}")
        where = self._position_problem(birth.position)
        if where:
            return Decision(False, POSITION_OUT_OF_SITE, f"{birth.node}: {where}")
        return None

    def _nearest_slot(self, position: tuple[float, ...]) -> int:
        trained = nearest_trained_slot(self.manifest, position)  # the slots belong to the training nodes
        if trained is not None:
            return trained
        layout_positions = self.layout.positions()
        distances = np.linalg.norm(layout_positions - np.asarray(position), axis=1)
        return int(np.argmin(distances))

    def _changed(self) -> None:
        self._state.version += 1

    def _build_snapshot(self) -> RegistrySnapshot:
        nodes = sorted(self._state.nodes.values(), key=lambda n: (not n.from_layout, n.node_index, n.id))
        any_online = any(n.online for n in nodes)
        # Before any birth has arrived (a fresh broker, or births not yet redelivered) the layout
        # says who to wait for; after that, only nodes that announced themselves are awaited.
        expected = frozenset((n.id, m) for n in nodes if n.online or not any_online for m in n.modalities)
        return RegistrySnapshot(
            node_ids=tuple(n.id for n in nodes),
            positions=np.array([n.position for n in nodes], dtype=np.float32).reshape(len(nodes), -1),
            node_index=np.array([n.node_index for n in nodes], dtype=np.int64),
            modalities={n.id: n.modalities for n in nodes},
            expected=expected,
            descriptions=tuple(n.description for n in nodes),
        )

    # ------------------------------------------------------------------ bounds and persistence
    def _position_problem(self, position: tuple[float, ...]) -> str | None:
        """Why ``position`` cannot be a node of this site (None if it can). Pure Python first: a
        value no float holds (NaN, inf, an int of 400 digits) must not reach numpy."""
        if not all(isinstance(v, (int, float)) and abs(v) <= MAX_COORDINATE_M for v in position):
            shown = [v if isinstance(v, float) else type(v).__name__ for v in position]
            return f"position {shown} is not within ±{MAX_COORDINATE_M:g} m on every axis"
        if self._site_low is None:
            return None
        values = np.asarray(position, dtype=np.float64)
        gap = np.maximum(self._site_low - values, 0.0) + np.maximum(values - self._site_high, 0.0)
        distance = float(np.linalg.norm(gap))
        if distance > self.max_node_distance_m:
            return (f"position {list(position)} is {distance:.0f} m outside the site layout's extent "
                    f"(max_node_distance_m = {self.max_node_distance_m:g})")
        return None

    def _restore(self, saved_nodes: list[StoredNode]) -> None:
        """Put back the nodes that joined or moved before the last stop, offline until their
        birth arrives (the expected set stays as after any restart), with their positions and slots
        for the backlog that comes before the retained births."""
        for saved in saved_nodes:
            self._persisted.add(saved.id)  # the row exists: a node back at its layout place deletes it
            why = self._restore_problem(saved)
            kind = "moved" if saved.from_layout else "joined"
            if why:
                self.counts["not_restored"] += 1
                log.warning("node %s (%s in the field, at %s) is not restored: %s; its birth decides", saved.id,
                            kind, list(saved.position), why)
                continue
            mods = tuple(m for m in saved.modalities if m in self.manifest.modalities)
            if saved.from_layout:
                known = self._state.nodes[saved.id]  # keeps the slot the binding gave it
                node = replace(known, position=saved.position, modalities=mods, bd_seq=saved.bd_seq,
                               description=saved.description)
            else:
                # Recomputed, not trusted: the slots belong to the model, which may have changed.
                slot = self._nearest_slot(saved.position)
                if slot != saved.node_index:
                    log.info("node %s: slot %d now (was %d): the model or the layout changed", saved.id, slot,
                             saved.node_index)
                node = RegisteredNode(saved.id, saved.position, mods, slot, online=False, bd_seq=saved.bd_seq,
                                      from_layout=False, description=saved.description)
            self._state.nodes[saved.id] = node
            self.counts["restored"] += 1
            log.info("restored node %s (%s in the field) at %s, slot %d", saved.id, kind, list(saved.position),
                     node.node_index)
        self._changed()

    def _restore_problem(self, saved: StoredNode) -> str | None:
        """Why a stored node cannot be put back as it was (None if it can)."""
        if len(saved.position) != self.manifest.position_dim:
            return f"a {len(saved.position)}-D position, the model takes {self.manifest.position_dim}-D"
        where = self._position_problem(saved.position)
        if where:
            return where
        for name, stored_hash in saved.modalities.items():
            requirement = self.manifest.modalities.get(name)
            if requirement is not None and requirement.feature_hash != stored_hash:
                return (f"{name} was accepted with feature hash {stored_hash}, the model now takes "
                        f"{requirement.feature_hash} (model upgraded)")
        if not any(name in self.manifest.modalities for name in saved.modalities):
            return f"none of its modalities {sorted(saved.modalities)} is an input of the model"
        spec = self._layout_nodes.get(saved.id)
        if saved.from_layout and spec is None:
            return "the site layout no longer lists it"
        if saved.from_layout and saved.layout_position is not None and saved.layout_position != spec.position:
            return f"the site layout has placed it at {list(spec.position)} since (the layout wins)"
        if not saved.from_layout and spec is not None:
            return "the site layout lists it now (the layout wins)"
        if not saved.from_layout and len(self._state.nodes) >= self.manifest.node_range[1]:
            return f"the model takes at most {self.manifest.node_range[1]} nodes"
        return None

    def _persist(self, node: RegisteredNode) -> None:
        """Keep a joined or moved node for the next restart; forget a layout node back in its
        layout place. Call under the lock. Never raises: a failed write is logged and counted."""
        if self._store is None:
            return
        spec = self._layout_nodes.get(node.id) if node.from_layout else None
        if spec is not None and self._as_in_layout(node, spec):
            self._forget(node.id)
            return
        hashes = {m: self.manifest.modalities[m].feature_hash for m in node.modalities}
        saved = StoredNode(node.id, node.position, hashes, node.node_index, node.description, node.bd_seq,
                           node.from_layout, spec.position if spec is not None else None)
        self._persisted.add(node.id)
        if not self._store.save(self.layout.site_id, saved):
            self.counts["node_store_failed"] += 1

    def _forget(self, node_id: str) -> None:
        """Delete a node's row, if it has one. Call under the lock. Never raises."""
        if self._store is None or node_id not in self._persisted:
            return
        if self._store.delete(self.layout.site_id, node_id):
            self._persisted.discard(node_id)
        else:
            self.counts["node_store_failed"] += 1  # kept in _persisted: the next change tries again

    def _as_in_layout(self, node: RegisteredNode, spec: NodeSpec) -> bool:
        """True when a layout node is where, and as, the layout has it: nothing to keep."""
        layout_mods = {m for m in spec.modalities if m in self.manifest.modalities}
        return (tuple(node.position) == tuple(spec.position) and node.description == spec.description
                and set(node.modalities) == layout_mods)
