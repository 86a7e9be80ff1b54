"""Birth and state payloads (JSON), Sparkplug-style.

A node publishes a retained birth (who it is, where, what it senses, with which features) and a
retained ``online`` state; its last will is ``offline``. Both carry ``bdSeq``, the node's
connection counter, so a receiver can ignore a late will left over from an older connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from spar_wire.errors import WireError
from spar_wire.numbers import is_finite_vector
from spar_wire.topics import check_id

MAX_LIFECYCLE_BYTES = 16 * 1024
# A placement description is a sentence or two ("north-west corner, on a lamp post"). Each distinct
# one is embedded and cached (spar_wire.placement_text), so the cap also bounds what one birth costs.
MAX_DESCRIPTION_CHARS = 512
MAX_TEXT_CHARS = 4096  # other free-text fields (firmware)
STATES = ("online", "offline")


@dataclass(frozen=True)
class ModalityInfo:
    feature_hash: str
    sample_rate_hz: float
    channels: int


@dataclass(frozen=True)
class BirthMessage:
    site: str
    node: str
    bd_seq: int
    position: tuple[float, ...]
    modalities: dict[str, ModalityInfo]
    description: str = ""
    firmware: str = ""

    def to_json(self) -> bytes:
        body = {
            "site": self.site, "node": self.node, "bdSeq": self.bd_seq,
            "position": list(self.position), "description": self.description,
            "firmware": self.firmware,
            "modalities": {name: {"feature_hash": m.feature_hash, "sample_rate_hz": m.sample_rate_hz,
                                  "channels": m.channels} for name, m in self.modalities.items()},
        }
        return json.dumps(body, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class StateMessage:
    state: str  # "online" | "offline"
    bd_seq: int

    def to_json(self) -> bytes:
        return json.dumps({"state": self.state, "bdSeq": self.bd_seq}).encode("utf-8")


def parse_birth(payload: bytes) -> BirthMessage:
    """Validate a birth payload; WireError("bad_birth") naming the field otherwise.

    A description longer than MAX_DESCRIPTION_CHARS is refused like any other bad field (not
    truncated: a cut description would embed to a placement the node never described)."""
    body = _load_json(payload, "bad_birth")
    try:
        modalities = body.get("modalities")
        if not isinstance(modalities, dict) or not modalities:
            raise ValueError("modalities: expected a non-empty object")
        return BirthMessage(
            site=check_id(body.get("site"), "site"),
            node=check_id(body.get("node"), "node"),
            bd_seq=_int(body.get("bdSeq"), "bdSeq"),
            position=_position(body.get("position")),
            modalities={check_id(name, "modality"): _modality(info, name)
                        for name, info in modalities.items()},
            description=_str(body.get("description", ""), "description", MAX_DESCRIPTION_CHARS),
            firmware=_str(body.get("firmware", ""), "firmware"),
        )
    except (ValueError, WireError) as exc:
        detail = exc.detail if isinstance(exc, WireError) else str(exc)
        raise WireError("bad_birth", detail) from None


def parse_state(payload: bytes) -> StateMessage:
    """Validate a state payload; WireError("bad_state") otherwise."""
    body = _load_json(payload, "bad_state")
    state = body.get("state")
    if state not in STATES:
        raise WireError("bad_state", f"state must be one of {STATES}, got {state!r}")
    try:
        return StateMessage(state=state, bd_seq=_int(body.get("bdSeq"), "bdSeq"))
    except ValueError as exc:
        raise WireError("bad_state", str(exc)) from None


def _load_json(payload: bytes, reason: str) -> dict[str, Any]:
    if not isinstance(payload, (bytes, bytearray)):
        raise WireError(reason, f"expected bytes, got {type(payload).__name__}")
    if len(payload) > MAX_LIFECYCLE_BYTES:
        raise WireError(reason, f"{len(payload)} bytes > {MAX_LIFECYCLE_BYTES}")
    try:
        body = json.loads(bytes(payload).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # ValueError: also integers beyond Python's digit limit
        raise WireError(reason, f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise WireError(reason, "expected a JSON object")
    return body


def _int(value: Any, name: str, low: int = 0, high: int = 2**31 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: expected an integer in [{low}, {high}], got {value!r}")
    return value


def _str(value: Any, name: str, limit: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{name}: expected a string of at most {limit} characters")
    return value


def _position(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not is_finite_vector(value, (2, 3)):
        raise ValueError(f"position: expected 2 or 3 finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _modality(info: Any, name: str) -> ModalityInfo:
    if not isinstance(info, dict):
        raise ValueError(f"modalities.{name}: expected an object")
    digest = info.get("feature_hash")
    if not isinstance(digest, str) or len(digest) != 16 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"modalities.{name}.feature_hash: expected 16 lowercase hex digits")
    rate = info.get("sample_rate_hz")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0 < rate < 1e7):
        raise ValueError(f"modalities.{name}.sample_rate_hz: expected a positive number")
    return ModalityInfo(digest, float(rate), _int(info.get("channels"), f"modalities.{name}.channels", 1, 64))
