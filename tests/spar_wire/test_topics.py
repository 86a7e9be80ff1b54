import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spar_wire.errors import WireError
from spar_wire.topics import (
    Topic,
    aggregator_topic,
    birth_topic,
    data_topic,
    parse_topic,
    site_filter,
    state_topic,
)

IDS = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True).filter(lambda s: s != "aggregator")


def test_topic_names():
    assert birth_topic("lot", "n1") == "spar/v1/lot/n1/birth"
    assert state_topic("lot", "n1") == "spar/v1/lot/n1/state"
    assert data_topic("lot", "n1", "microphone") == "spar/v1/lot/n1/data/microphone"
    assert aggregator_topic("lot", "results") == "spar/v1/lot/aggregator/results"
    assert site_filter("lot") == "spar/v1/lot/#"
    assert site_filter("lot", "data") == "spar/v1/lot/+/data/+"
    assert site_filter("lot", "birth") == "spar/v1/lot/+/birth"


@settings(max_examples=200, deadline=None)
@given(site=IDS, node=IDS, modality=IDS)
def test_build_then_parse_round_trips(site, node, modality):
    assert parse_topic(data_topic(site, node, modality)) == Topic(site, node, "data", modality)
    assert parse_topic(birth_topic(site, node)) == Topic(site, node, "birth")
    assert parse_topic(state_topic(site, node)) == Topic(site, node, "state")
    agg = parse_topic(aggregator_topic(site, "results"))
    assert agg.is_aggregator and agg.kind == "results"


@pytest.mark.parametrize("topic", [
    "", "spar", "spar/v1", "spar/v1/lot", "spar/v2/lot/n1/birth", "x/v1/lot/n1/birth",
    "spar/v1/lot/n1/bogus", "spar/v1/lot/n1/birth/extra", "spar/v1/lot/n1/data",
    "spar/v1/lot/n1/data/mic/extra", "spar/v1/lot/+/birth", "spar/v1/lot/#",
    "spar/v1/lot/n 1/birth", "spar/v1/lot/nœud/birth", "spar/v1//n1/birth",
    "spar/v1/lot/aggregator/birth", "spar/v1/lot/aggregator/data/mic", "spar/v1/lot/n1/data/",
    "spar/v1/" + "x" * 65 + "/n1/birth",
])
def test_malformed_topics_are_rejected(topic):
    with pytest.raises(WireError) as info:
        parse_topic(topic)
    assert info.value.reason == "bad_topic"


@pytest.mark.parametrize("build", [
    lambda: data_topic("lot", "a/b", "mic"), lambda: birth_topic("lot", "aggregator"),
    lambda: data_topic("lot", "n1", "#"), lambda: state_topic("", "n1"),
    lambda: aggregator_topic("lot", "birth"), lambda: site_filter("lot", "nope"),
])
def test_builders_refuse_bad_ids(build):
    with pytest.raises(WireError):
        build()


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=200), st.none(), st.integers(), st.binary(max_size=20)))
def test_anything_parses_or_raises_wire_error(topic):
    try:
        parsed = parse_topic(topic)
    except WireError:
        return
    assert parsed.kind in ("birth", "state", "data", "results")
