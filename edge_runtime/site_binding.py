"""Model-to-site binding: which trained structural slot (``node_index``) each node of a site takes.

A model with a learnable structural table learned one vector per node of the site it was trained
on: slot i is that site's node i (``ModelManifest.training_site``). Feeding another site's nodes by
their layout order would silently give node "e01" the vector learned for "n01", wherever either
stands. So a node takes:

- the slot of the training node with the same id ("id"), or else
- the slot of the training node nearest to its position ("nearest", as the SPAR paper does for
  unseen nodes, and as the registry does for nodes that join in the field); several nodes may
  share a slot.

A manifest without ``training_site`` (written before it existed) gives today's binding, layout
order, which is only right when the site is the training site in the training order; the
aggregator says once that it cannot check this.

The verdict: the site is the training site ("exact") when every node is bound by id and stands
within ``tolerance_m`` of its trained position. Training nodes the site lacks are not a mismatch
(the model sees them as absent nodes, as when a node is down). A SPAR+LLM model (``node_text``)
has no slots: nothing to bind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edge_runtime.errors import AggregatorError
from spar_wire.model_manifest import NODE_INDEX_INPUT, ModelManifest
from spar_wire.site_layout import SiteLayout

log = logging.getLogger(__name__)

MOVED_TOLERANCE_M = 1.0  # a node by id further than this from its trained position has moved
BY_ID, BY_NEAREST, BY_LAYOUT_ORDER = "id", "nearest", "layout order"


@dataclass(frozen=True)
class SlotAssignment:
    """One layout node's slot and how it was found."""

    node_id: str
    slot: int  # node_index fed for this node
    how: str  # BY_ID | BY_NEAREST | BY_LAYOUT_ORDER
    trained_id: str | None = None  # the training node of that slot; None when the manifest has no training site
    distance_m: float | None = None  # from that training node's position; None when unknown


@dataclass(frozen=True)
class SiteBinding:
    """The slots of one site's layout nodes (layout order) and whether the site is the training site."""

    site_id: str
    training_site_id: str | None  # None: the manifest does not record its training site
    assignments: tuple[SlotAssignment, ...]
    missing: tuple[str, ...] = ()  # training node ids the site lacks (their slots go unused)
    tolerance_m: float = MOVED_TOLERANCE_M

    @property
    def known(self) -> bool:
        """True when the manifest records the training site, so the binding could be checked."""
        return self.training_site_id is not None

    @property
    def slots(self) -> dict[str, int]:
        """Node id -> slot (node_index)."""
        return {a.node_id: a.slot for a in self.assignments}

    @property
    def not_trained(self) -> tuple[SlotAssignment, ...]:
        """Nodes whose id the model was not trained on (bound by nearest trained position)."""
        return tuple(a for a in self.assignments if a.how == BY_NEAREST)

    @property
    def moved(self) -> tuple[SlotAssignment, ...]:
        """Nodes bound by id that stand further than ``tolerance_m`` from their trained position."""
        return tuple(a for a in self.assignments
                     if a.how == BY_ID and a.distance_m is not None and a.distance_m > self.tolerance_m)

    @property
    def exact(self) -> bool:
        """The site is (a subset of) the training site: every node by id, none moved."""
        return self.known and not self.not_trained and not self.moved

    def mismatches(self) -> list[str]:
        """What makes this site another than the training one, one phrase each (empty when exact)."""
        if not self.known:
            return ["the model's manifest does not record its training site (no training_site), so the "
                    "binding of nodes to trained slots (layout order) cannot be checked"]
        out = []
        if self.not_trained:
            out.append("node(s) the model was not trained on, bound to the nearest trained node's slot: "
                       + ", ".join(f"{a.node_id} -> {a.trained_id} ({a.distance_m:.1f} m)" for a in self.not_trained))
        if self.moved:
            out.append(f"node(s) more than {self.tolerance_m:g} m from their trained position: "
                       + ", ".join(f"{a.node_id} ({a.distance_m:.1f} m)" for a in self.moved))
        return out

    def describe(self) -> list[str]:
        """One log line per node: ``id -> slot k (trained id), how``."""
        lines = []
        for a in self.assignments:
            if a.how == BY_LAYOUT_ORDER:
                lines.append(f"{a.node_id} -> slot {a.slot}, by layout order (training site unknown)")
                continue
            shared = [b.node_id for b in self.assignments if b.slot == a.slot and b.node_id != a.node_id]
            how = "by id" if a.how == BY_ID else "by nearest trained position"
            lines.append(f"{a.node_id} -> slot {a.slot} ({a.trained_id}), {how}, {a.distance_m:.2f} m from the "
                         f"trained position" + (f", slot shared with {', '.join(shared)}" if shared else ""))
        return lines


def trained_positions(manifest: ModelManifest) -> np.ndarray | None:
    """[S, d_S] float64 positions of the training nodes in slot order; None without a training site."""
    if manifest.training_site is None:
        return None
    return np.array([n.position for n in manifest.training_site.nodes], dtype=np.float64)


def nearest_trained_slot(manifest: ModelManifest, position: tuple[float, ...]) -> int | None:
    """The slot of the training node nearest to ``position`` [d_S]; None without a training site."""
    trained = trained_positions(manifest)
    if trained is None:
        return None
    return int(np.argmin(np.linalg.norm(trained - np.asarray(position, dtype=np.float64), axis=1)))


def bind_site(layout: SiteLayout, manifest: ModelManifest, tolerance_m: float = MOVED_TOLERANCE_M) -> SiteBinding:
    """Bind ``layout``'s nodes to the model's trained slots (see the module docstring)."""
    training = manifest.training_site
    if training is None:
        return SiteBinding(layout.site_id, None, tuple(SlotAssignment(node.id, index, BY_LAYOUT_ORDER)
                                                       for index, node in enumerate(layout.nodes)),
                           tolerance_m=tolerance_m)
    trained = trained_positions(manifest)
    slot_of = {node_id: slot for slot, node_id in enumerate(training.node_ids)}
    assignments = []
    for node in layout.nodes:
        position = np.asarray(node.position, dtype=np.float64)
        distances = np.linalg.norm(trained - position, axis=1)  # [S] metres to every training node
        slot, how = (slot_of[node.id], BY_ID) if node.id in slot_of else (int(np.argmin(distances)), BY_NEAREST)
        assignments.append(SlotAssignment(node.id, slot, how, training.nodes[slot].id, float(distances[slot])))
    present = set(layout.node_ids)
    return SiteBinding(layout.site_id, training.site_id, tuple(assignments),
                       missing=tuple(i for i in training.node_ids if i not in present), tolerance_m=tolerance_m)


def check_site_binding(layout: SiteLayout, manifest: ModelManifest, *, strict: bool = False,
                       tolerance_m: float = MOVED_TOLERANCE_M) -> SiteBinding:
    """At aggregator start: bind, log the binding one line per node, warn when the site is not the one the
    model was trained on (or the manifest cannot tell), and with ``strict`` refuse with an AggregatorError
    naming the mismatches instead."""
    binding = bind_site(layout, manifest, tolerance_m)
    if not any(t.name == NODE_INDEX_INPUT for t in manifest.inputs):
        # SPAR+LLM: each node's structure comes from its own description, not from a trained slot.
        log.info("model %s takes no node_index: no structural slots to bind", manifest.name)
        return binding
    trained_on = f"training site {binding.training_site_id}" if binding.known else "training site unknown"
    log.info("slot binding of site %s to model %s@%s (%s):", layout.site_id, manifest.name, manifest.version,
             trained_on)
    for line in binding.describe():
        log.info("  %s", line)
    if binding.missing:
        log.info("  trained node(s) not in this site (fed as absent): %s", ", ".join(binding.missing))
    if binding.exact:
        return binding
    problems = "; ".join(binding.mismatches())
    if strict:
        raise AggregatorError(f"strict_layout: site {layout.site_id} ({layout.source}) is not the site model "
                              f"{manifest.source} was trained on: {problems}")
    if binding.known:
        log.warning("site %s is not the site model %s was trained on (%s): %s; results may be worse than the "
                    "model's metric (--strict-layout refuses to start)", layout.site_id, manifest.name,
                    binding.training_site_id, problems)
    else:
        log.warning("%s; nodes take slots in layout order (--strict-layout refuses to start)", problems)
    return binding
