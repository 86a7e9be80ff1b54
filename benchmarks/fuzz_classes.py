"""The message classes of ``spar-bench fuzz`` and what the aggregator may answer to each.

One place for the vocabulary every fuzz module shares: the class names and their weights, the
aggregator outcomes (its counter keys) each class may end in and the one that shows its check was
reached, the message type the generator hands to the publisher, and the constants that both the
generator and the run must agree on (the broker's size limit, the valid births' bdSeq, the fixed
node clock of reproducible runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BROKER_MESSAGE_LIMIT = 2 << 20  # Mosquitto message_size_limit: above the wire limit, so both are exercised
BASE_EPOCH_NS = 1_700_000_000 * 10**9  # node clock of the valid windows: fixed, so runs are reproducible
VALID_BD_SEQ = 7  # bdSeq of the valid births; stale states use less

# The classes: "valid", and the hostile ones with their pick weights (shares of the hostile messages).
VALID = "valid"
HOSTILE_WEIGHTS: dict[str, float] = {
    "truncated": 8, "bitflip": 10, "wrong_crc": 6, "huge_shape": 6, "decompression_bomb": 5,
    "non_finite_scale": 6, "wrong_feature_hash": 6, "spoofed_node": 8, "unicode_topic": 8,
    "random_bytes": 8, "empty_payload": 4, "malformed_lifecycle": 10, "header_field": 8, "oversize": 1,
    "far_future": 4, "far_past": 4, "huge_position": 4, "description_churn": 3,
}
CLASSES = (VALID, *HOSTILE_WEIGHTS)
# Classes whose messages are valid on the wire and meant to be accepted: what they test is what
# accepting them costs (memory, disk), not that they are refused.
ACCEPTED_CLASSES = frozenset({VALID, "description_churn"})
# Birth classes after which a valid block follows: malformed births refuse their node (the valid
# births re-admit it), and after huge positions the valid data (sent before its births) shows whether
# a poisoned position reached the model.
FOLLOWED_BY_VALID = ("malformed_lifecycle", "huge_position")
ACCEPTED = frozenset({"accepted", "birth", "state"})
SHED = "shed"  # dropped unread by the aggregator's overload policy (its message queue was full)
_R = "rejected."
# Outcomes (the aggregator's counter keys) each class may end in. "refused_node": a hostile birth
# in an earlier block refused that node, so its data is refused before the check aimed at.
EXPECTED: dict[str, frozenset[str]] = {
    VALID: ACCEPTED,
    "truncated": frozenset({_R + "truncated", _R + "trailing_bytes", _R + "bad_birth", _R + "bad_state"}),
    "bitflip": frozenset({_R + r for r in ("bad_crc", "truncated", "trailing_bytes", "bad_magic", "bad_version")}),
    "wrong_crc": frozenset({_R + "bad_crc"}),
    "huge_shape": frozenset({_R + r for r in ("too_many_pixels", "bad_shape", "shape_mismatch", "refused_node")}),
    "decompression_bomb": frozenset({_R + r for r in ("too_many_pixels", "size_mismatch", "bad_payload",
                                                      "shape_mismatch", "refused_node")}),
    "non_finite_scale": frozenset({_R + "non_finite", _R + "bad_field", _R + "refused_node"}),
    "wrong_feature_hash": frozenset({_R + "feature_hash_mismatch", _R + "refused_node"}),
    "spoofed_node": frozenset({_R + r for r in ("topic_mismatch", "unknown_node", "unknown_modality", "bad_topic",
                                                "refused_node")} | {"refused.too_many_nodes",
                                                                    "ignored.state_unknown_node"}),
    "unicode_topic": frozenset({_R + "bad_topic", _R + "topic_mismatch", "ignored.aggregator"}),
    "random_bytes": frozenset({_R + r for r in ("truncated", "trailing_bytes", "bad_magic", "bad_version",
                                                "bad_crc", "bad_birth", "bad_state")}),
    "empty_payload": frozenset({_R + "truncated", _R + "bad_birth", _R + "bad_state"}),
    "malformed_lifecycle": frozenset({_R + "bad_birth", _R + "bad_state", "ignored.stale_state",
                                      "ignored.state_unknown_node", "refused.position_dim", "refused.modalities",
                                      "refused.feature_hash_mismatch", "refused.wrong_site"}),
    "header_field": frozenset({_R + r for r in ("unknown_codec", "bad_field", "bad_version", "bad_magic", "bad_id",
                                                "size_mismatch", "bad_payload", "non_finite", "refused_node")}),
    "oversize": frozenset({_R + r for r in ("oversize", "bad_payload", "bad_birth", "bad_state", "refused_node")}),
    # The clock guard compares a start with the other nodes' recent starts (clock_skew), or with
    # this box's clock when too few were heard (clock_ahead / clock_behind); clock_absurd: beyond
    # any clock (after 2116, or not positive).
    "far_future": frozenset({_R + r for r in ("clock_skew", "clock_ahead", "clock_absurd", "refused_node")}),
    "far_past": frozenset({_R + r for r in ("clock_skew", "clock_behind", "clock_absurd", "refused_node")}),
    # Not finite in float32: the wire parser may refuse it (bad_birth); else the registry's site bound.
    "huge_position": frozenset({_R + "bad_birth", "refused.position_out_of_site"}),
    "description_churn": frozenset({"birth"}),
}
# At least one of these per class shows the check the class aims at was reached.
PRIMARY: dict[str, frozenset[str]] = {
    VALID: frozenset({"accepted", "birth"}),
    "truncated": frozenset({_R + "truncated"}),
    "bitflip": frozenset({_R + "bad_crc"}),
    "wrong_crc": frozenset({_R + "bad_crc"}),
    "huge_shape": frozenset({_R + "too_many_pixels"}),
    "decompression_bomb": frozenset({_R + "bad_payload", _R + "size_mismatch"}),
    "non_finite_scale": frozenset({_R + "non_finite"}),
    "wrong_feature_hash": frozenset({_R + "feature_hash_mismatch"}),
    "spoofed_node": frozenset({_R + "topic_mismatch"}),
    "unicode_topic": frozenset({_R + "bad_topic"}),
    "random_bytes": frozenset({_R + "bad_magic"}),
    "empty_payload": frozenset({_R + "truncated"}),
    "malformed_lifecycle": frozenset({_R + "bad_birth"}),
    "header_field": frozenset({_R + "unknown_codec", _R + "bad_field"}),
    "oversize": frozenset({_R + "oversize"}),
    "far_future": frozenset({_R + "clock_skew", _R + "clock_ahead"}),
    "far_past": frozenset({_R + "clock_skew", _R + "clock_behind"}),
    "huge_position": frozenset({"refused.position_out_of_site"}),
    "description_churn": frozenset({"birth"}),
}


def is_rejection(outcome: str) -> bool:
    """True for counter keys that drop a message: ``rejected.*``, ``refused.*``, ``ignored.*``, and
    ``shed`` (dropped unread by the overload policy when the fuzzer outpaces decoding)."""
    return outcome == SHED or outcome.split(".", 1)[0] in ("rejected", "refused", "ignored")


@dataclass(frozen=True)
class FuzzMessage:
    """One message to publish, with the class and variant that made it."""

    cls: str
    variant: str
    topic: str
    payload: bytes = field(repr=False)

