"""spar-bench fuzz: the hostile-message generator, and 10 000 of its messages against a real aggregator."""

import math

import pytest

from benchmarks.fuzz_bench import (
    CLASSES,
    EXPECTED,
    PRIMARY,
    VALID,
    FuzzConfig,
    FuzzGenerator,
    broker_refuses_topic,
    is_rejection,
    parse_counts,
    run_fuzz,
)
from benchmarks.local_broker import find_mosquitto
from spar_wire.errors import WireError
from spar_wire.message import decode_message

RSS_BOUND_MIB = 50.0  # growth of the aggregator's VmRSS after the warm-up round


@pytest.fixture(scope="module")
def generated(parking_lot):
    """(generator, messages) for 2000 messages of seed 0."""
    generator = FuzzGenerator(parking_lot, seed=0)
    return generator, [m for _, m in generator.messages(2000, block_size=100)]


def test_generator_is_deterministic_for_a_seed(parking_lot, generated):
    again = [(m.cls, m.variant, m.topic, m.payload) for _, m in FuzzGenerator(parking_lot, 0).messages(2000, 100)]
    assert again == [(m.cls, m.variant, m.topic, m.payload) for m in generated[1]]
    other = [m.payload for _, m in FuzzGenerator(parking_lot, 1).messages(2000, 100)]
    assert other != [m.payload for m in generated[1]]


def test_every_class_is_generated_and_the_plan_adds_up(parking_lot, generated):
    generator, messages = generated
    assert {m.cls for m in messages} == set(CLASSES)
    assert sum(n for _, n in FuzzGenerator(parking_lot, 0).plan(10_000)) == 10_000
    assert len(messages) == 2000
    # Oversize messages are up to 2 MiB: a few per run, not a share.
    assert 1 <= sum(m.cls == "oversize" for m in messages) <= 100


def test_hostile_messages_differ_from_every_valid_seed(generated):
    generator, messages = generated
    hostile = [m for m in messages if m.cls != VALID]
    assert not [m for m in hostile if generator.is_valid_seed(m)]
    # The valid share really is valid: seed births, and frames that decode.
    for message in (m for m in messages if m.cls == VALID and "/data/" in m.topic):
        decode_message(message.payload)


@pytest.mark.parametrize(("cls", "reasons"), [
    ("wrong_crc", {"bad_crc"}),
    ("bitflip", {"bad_crc", "truncated", "trailing_bytes", "bad_magic", "bad_version"}),
    ("truncated", {"truncated", "trailing_bytes"}),
])
def test_wire_level_classes_fail_decoding_with_their_reason(generated, cls, reasons):
    messages = [m for m in generated[1] if m.cls == cls and "/data/" in m.topic]
    assert messages
    for message in messages:
        with pytest.raises(WireError) as caught:
            decode_message(message.payload, decode_image=False)
        assert caught.value.reason in reasons, message


def test_scale_and_shape_mutations_keep_a_valid_crc(generated):
    """A correct CRC forces the receiver's semantic checks: NaN scale, huge shape."""
    by_variant = {(m.cls, m.variant): m for m in generated[1]}
    for key, reason in ((("non_finite_scale", "scale_nan"), "non_finite"),
                        (("huge_shape", "max"), "too_many_pixels"), (("huge_shape", "zero_side"), "bad_shape")):
        with pytest.raises(WireError) as caught:
            decode_message(by_variant[key].payload, decode_image=False)
        assert caught.value.reason == reason


def test_metrics_parsing_and_topic_rules():
    text = ('# TYPE spar_messages_total counter\nspar_messages_total{outcome="accepted"} 3\n'
            'spar_messages_total{outcome="ignored.aggregator"} 1\n'
            'spar_messages_rejected_total{reason="bad_crc"} 2.0\nspar_results_total 1\n')
    assert parse_counts(text) == {"accepted": 3, "ignored.aggregator": 1, "rejected.bad_crc": 2}
    assert broker_refuses_topic("a/\x01") and broker_refuses_topic("a/\uffff") and broker_refuses_topic("a/\x85")
    assert not broker_refuses_topic("spar/v1/parking_lot/nö/birth")
    assert is_rejection("refused.too_many_nodes") and not is_rejection("accepted")
    assert set(EXPECTED) == set(PRIMARY) == set(CLASSES)


@pytest.mark.mosquitto
@pytest.mark.slow
def test_ten_thousand_hostile_messages_against_a_running_aggregator(tmp_path):
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or `sudo apt-get install mosquitto`")
    report = run_fuzz(FuzzConfig(messages=10_000, seed=0, budget_s=240.0, progress=False), tmp_path)
    summary = report.to_markdown()  # verdict, tables, reproducers and log errors: the failure message
    assert report.problems(RSS_BOUND_MIB) == [], summary
    assert not report.aborted, summary
    assert report.total("sent") == 10_000
    # Zero crashes: alive through every block, no traceback, nothing counted as an internal error.
    assert report.crashes == 0, summary
    assert report.log_problems == [], "\n".join(report.log_problems)
    assert report.by_reason.get("rejected.internal_error", 0) == 0, summary
    # Every delivered message counted exactly once, under a reason; the exit line agrees.
    assert report.total("delivered") > 9000
    assert report.total("delivered") == report.total("matched"), summary  # broker vs the aggregator's filters
    assert report.unaccounted == 0 and report.overcounted == 0, summary
    assert report.exit_counted == report.total("delivered"), summary
    # Every class reached the check aimed at, and ended only in its expected outcomes.
    for cls, tally in report.classes.items():
        assert PRIMARY[cls] & set(tally.outcomes), f"{cls}: {dict(tally.outcomes)}"
    assert report.unexpected() == {}, summary
    assert report.hostile_accepted() == {}, summary
    # Valid traffic: births always counted (never shed before token messages); token messages accepted,
    # or shed unread when the fuzzer outpaces decoding (a slow CI run).
    valid, sent = report.classes[VALID].outcomes, report.classes[VALID].sent
    assert set(valid) <= {"birth", "accepted", "shed"} and valid["birth"] == sent // 3, summary
    assert valid["accepted"] + valid.get("shed", 0) == 2 * sent // 3 and valid["accepted"] > 0, summary
    # Bounded memory, clean shutdown.
    growth = report.rss_growth_mib
    assert growth is not None and math.isfinite(growth) and growth < RSS_BOUND_MIB, summary
    assert report.exit_code == 0, summary
    assert report.publisher_disconnects == 0
