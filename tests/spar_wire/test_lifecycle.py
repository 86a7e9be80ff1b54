import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spar_wire.errors import WireError
from spar_wire.lifecycle import (
    MAX_DESCRIPTION_CHARS,
    BirthMessage,
    ModalityInfo,
    StateMessage,
    parse_birth,
    parse_state,
)

BIRTH = BirthMessage(site="lot", node="n1", bd_seq=3, position=(1.0, 2.5),
                     modalities={"microphone": ModalityInfo("dace08dddfa4ecdf", 16000.0, 1)},
                     description="on a lamp post", firmware="0.1.0")


def test_birth_and_state_round_trip():
    assert parse_birth(BIRTH.to_json()) == BIRTH
    assert parse_state(StateMessage("offline", 3).to_json()) == StateMessage("offline", 3)


@pytest.mark.parametrize("change", [
    {"site": "a/b"}, {"bdSeq": -1}, {"bdSeq": True}, {"position": [1.0]},
    {"position": [1.0, float("nan")]}, {"modalities": {}}, {"modalities": {"m": {}}},
    {"modalities": {"m": {"feature_hash": "XYZ", "sample_rate_hz": 1, "channels": 1}}},
    {"modalities": {"m": {"feature_hash": "0" * 16, "sample_rate_hz": -1, "channels": 1}}},
    {"modalities": {"m": {"feature_hash": "0" * 16, "sample_rate_hz": 1, "channels": 0}}},
    {"description": 5}, {"description": "d" * 513}, {"description": "d" * 4096},
    {"position": [10**400, 1.0]},  # an int JSON allows but no float holds (found by the fuzzer)
])
def test_bad_birth_fields(change):
    body = json.loads(BIRTH.to_json())
    body.update(change)
    with pytest.raises(WireError) as info:
        parse_birth(json.dumps(body).encode())
    assert info.value.reason == "bad_birth"


def test_description_cap_is_512_characters():
    body = json.loads(BIRTH.to_json())
    body["description"] = "é" * MAX_DESCRIPTION_CHARS  # characters, not bytes
    assert parse_birth(json.dumps(body).encode()).description == "é" * 512
    body["description"] += "x"
    with pytest.raises(WireError, match="description: expected a string of at most 512 characters"):
        parse_birth(json.dumps(body).encode())
    body["description"], body["firmware"] = "", "f" * 4096  # other text fields keep their 4096
    assert parse_birth(json.dumps(body).encode()).firmware == "f" * 4096


@pytest.mark.parametrize("payload", [b"online", b"{}", b'{"state":"gone","bdSeq":1}', b"[1]",
                                     b'{"state":"online"}', b"\xff\xfe", b"{" * 10000,
                                     b'{"state":"offline","bdSeq":' + b"9" * 5000 + b"}"])
def test_bad_state_payloads(payload):
    with pytest.raises(WireError):
        parse_state(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_payloads_raise_only_wire_error(data):
    for parse in (parse_birth, parse_state):
        try:
            parse(data)
        except WireError:
            pass


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                       lambda inner: (st.lists(inner, max_size=4)
                                      | st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["site", "node", "bdSeq", "position", "modalities",
                                        "description", "firmware", "state"]), JSONISH))
def test_random_json_objects_raise_only_wire_error(body):
    payload = json.dumps(body).encode()
    for parse in (parse_birth, parse_state):
        try:
            parse(payload)
        except WireError:
            pass
