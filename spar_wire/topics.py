"""MQTT topic names of the contract, and parsing that refuses anything malformed.

    spar/v1/{site}/{node}/birth              retained node metadata (JSON)
    spar/v1/{site}/{node}/state              retained "online" / last-will "offline"
    spar/v1/{site}/{node}/data/{modality}    QoS 1 token messages
    spar/v1/{site}/aggregator/results        QoS 1 JSON results
    spar/v1/{site}/aggregator/state          retained aggregator health

Ids (site, node, modality) are 1-64 characters of ``[A-Za-z0-9_.-]``: no ``/``, ``+``, ``#``,
spaces or unicode, so an id always fills exactly one topic level and can be a Mosquitto client id
or ACL ``%u`` / ``%c`` substitution. ``aggregator`` and ``aggregator-results`` are reserved and
cannot be node ids: they are the aggregator's MQTT identities (and, with the default client id,
part of its client ids), which a node of the same name would share.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from spar_wire.errors import WireError

PREFIX = "spar/v1"
AGGREGATOR = "aggregator"
# The aggregator's second identity: its results publisher (spar-aggregator secure). A broker keeps one
# connection per identity (use_username_as_clientid), so the two sessions cannot share one.
AGGREGATOR_RESULTS = "aggregator-results"
RESERVED_NODE_IDS = (AGGREGATOR, AGGREGATOR_RESULTS)
NODE_KINDS = ("birth", "state", "data")
AGGREGATOR_KINDS = ("results", "state")
_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` when it is a valid id, else raise WireError naming ``what``."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise WireError("bad_id", f"{what} {value!r} must be 1-64 characters of [A-Za-z0-9_.-]")
    return value


def _check_node(node: str) -> str:
    check_id(node, "node")
    if node in RESERVED_NODE_IDS:
        raise WireError("bad_id", f"node id {node!r} is reserved")
    return node


def birth_topic(site: str, node: str) -> str:
    return f"{PREFIX}/{check_id(site, 'site')}/{_check_node(node)}/birth"


def state_topic(site: str, node: str) -> str:
    return f"{PREFIX}/{check_id(site, 'site')}/{_check_node(node)}/state"


def data_topic(site: str, node: str, modality: str) -> str:
    return f"{PREFIX}/{check_id(site, 'site')}/{_check_node(node)}/data/{check_id(modality, 'modality')}"


def aggregator_topic(site: str, kind: str) -> str:
    if kind not in AGGREGATOR_KINDS:
        raise WireError("bad_topic", f"aggregator topic kind must be one of {AGGREGATOR_KINDS}")
    return f"{PREFIX}/{check_id(site, 'site')}/{AGGREGATOR}/{kind}"


def site_filter(site: str, kind: str = "#") -> str:
    """Subscription filter for one site: ``spar/v1/{site}/+/{kind}`` (``#`` for everything)."""
    site = check_id(site, "site")
    if kind == "#":
        return f"{PREFIX}/{site}/#"
    if kind == "data":
        return f"{PREFIX}/{site}/+/data/+"
    if kind in NODE_KINDS:
        return f"{PREFIX}/{site}/+/{kind}"
    raise WireError("bad_topic", f"unknown filter kind {kind!r}")


@dataclass(frozen=True)
class Topic:
    site: str
    node: str  # "aggregator" for aggregator topics
    kind: str  # birth | state | data | results
    modality: str | None = None  # data topics only

    @property
    def is_aggregator(self) -> bool:
        return self.node == AGGREGATOR


def parse_topic(topic: object) -> Topic:
    """Parse a contract topic; WireError("bad_topic") for anything else."""
    if not isinstance(topic, str):
        raise WireError("bad_topic", f"topic must be a string, got {type(topic).__name__}")
    parts = topic.split("/")
    if len(parts) < 5 or "/".join(parts[:2]) != PREFIX:
        raise WireError("bad_topic", f"{topic[:200]!r} is not under {PREFIX}/{{site}}/...")
    try:
        site = check_id(parts[2], "site")
        node = check_id(parts[3], "node")
        for part in parts[5:]:
            check_id(part, "modality")
    except WireError as exc:
        raise WireError("bad_topic", f"{topic[:200]!r}: {exc.detail}") from None
    kind, rest = parts[4], parts[5:]
    if node == AGGREGATOR:
        if kind in AGGREGATOR_KINDS and not rest:
            return Topic(site, node, kind)
    elif kind in ("birth", "state") and not rest:
        return Topic(site, node, kind)
    elif kind == "data" and len(rest) == 1:
        return Topic(site, node, kind, modality=rest[0])
    raise WireError("bad_topic", f"{topic[:200]!r}: unknown topic shape")
