"""Which nodes the aggregator listens to, where they are, and which slot they take.

Starts from the site layout (positions, modalities) and follows the retained birth and state
messages: a birth whose feature hashes or modalities do not match the model's manifest is refused
with a reason; a birth from a node the layout does not know admits a new node (placement changes
in the field); a moved node's new position is used from its next window on. A will or state
``offline`` from an older connection (lower bdSeq) is ignored.

Slots: layout nodes keep their layout order; a node that is not in the layout takes the
structural slot (``node_index``) of the nearest layout node, as the SPAR paper does for unseen
nodes, and is appended to the tensor after the layout nodes.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field, replace

import numpy as np

from spar_wire.lifecycle import BirthMessage, StateMessage
from spar_wire.model_manifest import ModelManifest
from spar_wire.site_layout import SiteLayout

MAX_REFUSED = 1024  # refused node ids remembered (oldest forgotten first)


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

    def __init__(self, layout: SiteLayout, manifest: ModelManifest):
        self.layout = layout
        self.manifest = manifest
        self.model_modalities = tuple(manifest.modalities)
        self._lock = threading.Lock()
        self._state = _State()
        self._snapshot: RegistrySnapshot | None = None
        self._snapshot_version = -1
        self.counts: collections.Counter[str] = collections.Counter()
        for index, node in enumerate(layout.nodes):
            mods = tuple(m for m in node.modalities if m in manifest.modalities)
            self._state.nodes[node.id] = RegisteredNode(node.id, node.position, mods, index,
                                                        description=node.description)

    # ------------------------------------------------------------------ lifecycle messages
    def on_birth(self, birth: BirthMessage) -> Decision:
        """Admit, update or refuse a node from its birth message."""
        problem = self._check_birth(birth)
        with self._lock:
            if problem:
                self._state.refused[birth.node] = problem.detail
                while len(self._state.refused) > MAX_REFUSED:  # hostile births cannot grow this forever
                    del self._state.refused[next(iter(self._state.refused))]
                known = self._state.nodes.get(birth.node)
                if known is not None and known.from_layout:
                    self._state.nodes[birth.node] = replace(known, online=False)
                elif known is not None:
                    del self._state.nodes[birth.node]
                self._changed()
                self.counts[f"refused.{problem.reason}"] += 1
                return problem
            self._state.refused.pop(birth.node, None)
            mods = tuple(m for m in birth.modalities if m in self.manifest.modalities)
            known = self._state.nodes.get(birth.node)
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
        return None

    def _nearest_slot(self, position: tuple[float, ...]) -> int:
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
