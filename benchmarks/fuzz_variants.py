"""Tables of hostile topics and malformed lifecycle (birth/state) JSON for ``spar-bench fuzz``.

Data, not logic: each table maps a variant name to a function that builds the topic or payload, and
the generator picks names by weight. Keeping the tables here keeps the generator readable and makes
adding a variant a one-line change.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from benchmarks.fuzz_classes import VALID_BD_SEQ

# --------------------------------------------------------------------------- topic variants
_FULLWIDTH = str.maketrans("0123456789n", "０１２３４５６７８９ｎ")
# name -> (site, node, modality) -> topic; every one matches an aggregator filter unless it says so.
TOPIC_VARIANTS: dict[str, Callable[[str, str, str], str]] = {
    "non_ascii_node": lambda s, n, m: f"spar/v1/{s}/{n}ö/data/{m}",
    "non_ascii_modality": lambda s, n, m: f"spar/v1/{s}/{n}/data/{m}é",
    "emoji_node": lambda s, n, m: f"spar/v1/{s}/\U0001f697/data/{m}",
    "fullwidth_node": lambda s, n, m: f"spar/v1/{s}/{n.translate(_FULLWIDTH)}/data/{m}",
    "zero_width_node": lambda s, n, m: f"spar/v1/{s}/{n}\u200b/data/{m}",
    "combining_node": lambda s, n, m: f"spar/v1/{s}/{n}\u0301/data/{m}",
    "rtl_override_birth": lambda s, n, m: f"spar/v1/{s}/\u202e{n}/birth",
    "arabic_digit_birth": lambda s, n, m: f"spar/v1/{s}/n0\u0661/birth",
    "empty_node": lambda s, n, m: f"spar/v1/{s}//data/{m}",
    "empty_modality": lambda s, n, m: f"spar/v1/{s}/{n}/data/",
    "empty_node_birth": lambda s, n, m: f"spar/v1/{s}//birth",
    "space_in_node": lambda s, n, m: f"spar/v1/{s}/{n} /data/{m}",
    "long_node": lambda s, n, m: f"spar/v1/{s}/{'n' * 5000}/data/{m}",
    "lookalike_id": lambda s, n, m: f"spar/v1/{s}/{n}./data/{m}",
    "aggregator_state_birth": lambda s, n, m: f"spar/v1/{s}/aggregator/state",
    "aggregator_birth": lambda s, n, m: f"spar/v1/{s}/aggregator/birth",
    # Outside the aggregator's filters: the broker delivers them to nobody.
    "extra_level": lambda s, n, m: f"spar/v1/{s}/{n}/data/{m}/extra",
    "wrong_version": lambda s, n, m: f"spar/v2/{s}/{n}/data/{m}",
    "upper_prefix": lambda s, n, m: f"SPAR/v1/{s}/{n}/data/{m}",
    "leading_slash": lambda s, n, m: f"/spar/v1/{s}/{n}/data/{m}",
    "other_site": lambda s, n, m: f"spar/v1/other_site/{n}/data/{m}",
    "unicode_site_birth": lambda s, n, m: f"spar/v1/{s}é/{n}/birth",
}
# Topics one side refuses: paho (wildcards, lone surrogates, > 65535 bytes) or Mosquitto, which drops
# the connection on control characters, NUL and Unicode noncharacters. Rare: each costs a connection.
RARE_TOPIC_VARIANTS = {
    "wildcard_plus": lambda s, n, m: f"spar/v1/{s}/+/data/{m}",
    "wildcard_hash": lambda s, n, m: f"spar/v1/{s}/{n}/#",
    "lone_surrogate": lambda s, n, m: f"spar/v1/{s}/\ud800/data/{m}",
    "too_long": lambda s, n, m: f"spar/v1/{s}/{'n' * 70000}/data/{m}",
    "control_char_birth": lambda s, n, m: f"spar/v1/{s}/{n}\x01/birth",
    "nul_birth": lambda s, n, m: f"spar/v1/{s}/{n}\x00/birth",
    "noncharacter": lambda s, n, m: f"spar/v1/{s}/{n}\uffff/data/{m}",
    "c1_control": lambda s, n, m: f"spar/v1/{s}/{n}\x85/data/{m}",
}
# Every topic variant by name: what the generator looks a picked name up in.
ALL_TOPIC_VARIANTS = {**TOPIC_VARIANTS, **RARE_TOPIC_VARIANTS}
# Pick weights of the rare variants (the common ones weigh 1 each).
RARE_TOPIC_WEIGHTS = {name: 0.15 for name in RARE_TOPIC_VARIANTS}


# --------------------------------------------------------------------------- lifecycle variants
def _dumps(body: Any) -> bytes:
    return json.dumps(body).encode()


def _with(body: dict[str, Any], path: tuple[str, ...], value: Any) -> bytes:
    """``body`` with the value at ``path`` replaced, as JSON."""
    body = json.loads(json.dumps(body))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return _dumps(body)


def _literal(body: dict[str, Any], key: str, text: str) -> bytes:
    """``body`` with ``key`` set to a JSON literal json.dumps cannot write (NaN, 1e999, huge ints)."""
    marker = "__FUZZ_LITERAL__"
    return _with(body, (key,), marker).replace(f'"{marker}"'.encode(), text.encode())


def _modality_field(body: dict[str, Any], key: str, value: Any) -> bytes:
    first = next(iter(body["modalities"]))
    return _with(body, ("modalities", first, key), value)


# name -> (a valid birth's JSON body) -> a malformed birth payload.
BIRTH_VARIANTS: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "not_json": lambda b: b"{site: parking_lot, node:",
    "invalid_utf8": lambda b: b'{"site": "\xff\xfe"}',
    "utf8_bom": lambda b: b"\xef\xbb\xbf" + _dumps(b),
    "top_level_array": lambda b: _dumps([b]),
    "top_level_null": lambda b: b"null",
    "top_level_string": lambda b: b'"birth"',
    "deep_array": lambda b: b"[" * 8000 + b"]" * 8000,
    "deep_object": lambda b: b'{"a":' * 2500 + b"1" + b"}" * 2500,
    "deep_position": lambda b: _with(b, ("position",), json.loads("[" * 900 + "]" * 900)),
    "bdseq_4000_digits": lambda b: _literal(b, "bdSeq", "9" * 4000),
    "bdseq_5000_digits": lambda b: _literal(b, "bdSeq", "9" * 5000),  # over Python's int parsing limit
    "position_huge_int": lambda b: _literal(b, "position", f"[1{'0' * 400}, 1]"),  # overflows float()
    "bdseq_huge_float": lambda b: _literal(b, "bdSeq", "1e999"),
    "bdseq_string": lambda b: _with(b, ("bdSeq",), "7"),
    "bdseq_bool": lambda b: _with(b, ("bdSeq",), True),
    "bdseq_float": lambda b: _with(b, ("bdSeq",), 7.0),
    "bdseq_negative": lambda b: _with(b, ("bdSeq",), -1),
    "bdseq_2_pow_31": lambda b: _with(b, ("bdSeq",), 2**31),
    "position_nan": lambda b: _literal(b, "position", "[NaN, 1.0]"),
    "position_inf": lambda b: _literal(b, "position", "[1e999, 1.0]"),
    "position_strings": lambda b: _with(b, ("position",), ["1", "2"]),
    "position_4d": lambda b: _with(b, ("position",), [1, 2, 3, 4]),
    "position_dict": lambda b: _with(b, ("position",), {"x": 1, "y": 2}),
    "position_3d": lambda b: _with(b, ("position",), [1.0, 2.0, 3.0]),
    "modalities_list": lambda b: _with(b, ("modalities",), ["microphone"]),
    "modalities_empty": lambda b: _with(b, ("modalities",), {}),
    "modalities_unknown_only": lambda b: _with(b, ("modalities",), {
        "lidar": {"feature_hash": "0" * 16, "sample_rate_hz": 10.0, "channels": 1}}),
    "modality_name_unicode": lambda b: _with(b, ("modalities",), {
        "micrófono": next(iter(b["modalities"].values()))}),
    "feature_hash_upper": lambda b: _modality_field(b, "feature_hash", "ABCDEF0123456789"),
    "feature_hash_short": lambda b: _modality_field(b, "feature_hash", "abc"),
    "feature_hash_other": lambda b: _modality_field(b, "feature_hash", "0123456789abcdef"),
    "channels_zero": lambda b: _modality_field(b, "channels", 0),
    "channels_huge": lambda b: _modality_field(b, "channels", 10**12),
    "sample_rate_negative": lambda b: _modality_field(b, "sample_rate_hz", -16000),
    "sample_rate_string": lambda b: _modality_field(b, "sample_rate_hz", "16k"),
    "site_number": lambda b: _with(b, ("site",), 5),
    "site_other": lambda b: _with(b, ("site",), "other_site"),
    "node_unicode": lambda b: _with(b, ("node",), "nö1"),
    "description_5000": lambda b: _with(b, ("description",), "d" * 5000),
    "firmware_object": lambda b: _with(b, ("firmware",), {"v": 1}),
    "duplicate_key": lambda b: _dumps(b)[:-1] + b', "bdSeq": "x"}',
    "missing_node": lambda b: _dumps({k: v for k, v in b.items() if k != "node"}),
}

# name -> a malformed or unexpected state payload ("state_unknown_node" goes to the topic of node n99).
STATE_VARIANTS: dict[str, Callable[[], bytes]] = {
    "state_not_json": lambda: b"online",
    "state_upper": lambda: _dumps({"state": "ONLINE", "bdSeq": VALID_BD_SEQ}),
    "state_missing_bdseq": lambda: _dumps({"state": "offline"}),
    "state_negative_bdseq": lambda: _dumps({"state": "offline", "bdSeq": -5}),
    "state_bdseq_2_pow_31": lambda: _dumps({"state": "offline", "bdSeq": 2**31}),
    "state_bdseq_4000_digits": lambda: b'{"state": "offline", "bdSeq": ' + b"9" * 4000 + b"}",
    "state_bdseq_5000_digits": lambda: b'{"state": "offline", "bdSeq": ' + b"9" * 5000 + b"}",
    "state_array": lambda: _dumps(["offline", VALID_BD_SEQ]),
    "state_deep": lambda: b'{"state":' * 3000 + b'"x"' + b"}" * 3000,
    "state_null": lambda: b"null",
    "state_stale": lambda: _dumps({"state": "offline", "bdSeq": VALID_BD_SEQ - 3}),
    "state_unknown_node": lambda: _dumps({"state": "offline", "bdSeq": 1}),
}
