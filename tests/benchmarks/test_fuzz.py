"""spar-bench fuzz: the hostile-message generator, and 10 000 of its messages against a real aggregator."""

import json
import math
import sqlite3

import pytest

from benchmarks.fuzz_aggregator import parse_counts
from benchmarks.fuzz_bench import FuzzConfig, run_fuzz
from benchmarks.fuzz_classes import ACCEPTED_CLASSES, BASE_EPOCH_NS, CLASSES, EXPECTED, PRIMARY, VALID, is_rejection
from benchmarks.fuzz_generator import CHURN_DESCRIPTION_CHARS, FuzzGenerator
from benchmarks.fuzz_publisher import broker_refuses_topic
from benchmarks.fuzz_report import ClassTally, FuzzReport
from benchmarks.fuzz_results import check_results
from spar_wire.errors import WireError
from spar_wire.lifecycle import MAX_DESCRIPTION_CHARS, parse_birth
from spar_wire.message import decode_message
from testbed.local_broker import find_mosquitto

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


# --------------------------------------------------------------------------- field-site classes (issue 19)
def test_clock_classes_are_valid_frames_from_a_minority_far_from_now(generated):
    generator, messages = generated
    assert 0 < len(generator.clock_nodes) < len(generator.nodes) / 2
    # Every valid window (and so every "now" the classes count from) lies in this span.
    valid_span = (BASE_EPOCH_NS, BASE_EPOCH_NS + (generator.window + 1) * generator.window_ns)
    seen = set()
    for message in (m for m in messages if m.cls in ("far_future", "far_past")):
        frame = decode_message(message.payload, decode_image=False)  # CRC and header valid
        assert frame.node in generator.clock_nodes, message
        start = frame.window_start_ns
        if message.cls == "far_future":
            assert start >= valid_span[0] + 600 * 10**9, message
        else:
            assert start <= valid_span[1] - 600 * 10**9, message
        seen.add(message.variant)
    assert {"plus_1h", "plus_10y", "int64_max", "minus_1h", "minus_10y", "epoch_zero"} <= seen


def test_huge_positions_and_description_churn(parking_lot):
    messages = [m for _, m in FuzzGenerator(parking_lot, 0).messages(10_000)]
    huge = [m for m in messages if m.cls == "huge_position"]
    assert {m.variant for m in huge} >= {"x_1e39", "y_minus_3e38", "both_1e30", "km_50"}
    for message in huge:
        try:
            birth = parse_birth(message.payload)
        except WireError as exc:  # the wire parser may refuse what float32 cannot hold
            assert exc.reason == "bad_birth"
            continue
        home = parking_lot.node(birth.node).position
        assert max(abs(a - b) for a, b in zip(birth.position, home, strict=True)) >= 35_000, message
    churn = [parse_birth(m.payload) for m in messages if m.cls == "description_churn"]
    descriptions = [b.description for b in churn]
    assert len(churn) > 100 and len(set(descriptions)) == len(churn)  # every one new
    assert {len(d) for d in descriptions} == {CHURN_DESCRIPTION_CHARS} <= set(range(MAX_DESCRIPTION_CHARS + 1))
    assert "description_churn" in ACCEPTED_CLASSES and EXPECTED["description_churn"] == {"birth"}


def test_plan_ends_valid_and_the_valid_block_after_huge_positions_sends_data_first(parking_lot):
    generator = FuzzGenerator(parking_lot, 0)
    plan = generator.plan(10_000)
    assert plan[-1][0] == VALID and sum(n for _, n in plan) == 10_000
    previous, orders = "", {}
    for cls, count in plan:
        block = generator.block(cls, count)
        if cls == VALID:
            kinds = ["birth" if m.topic.endswith("/birth") else "data" for m in block]
            orders.setdefault(previous == "huge_position", set()).add(tuple(kinds))
        previous = cls
    births_first = ("birth",) * 8 + ("data",) * 16
    assert orders[False] == {births_first} and orders[True] == {births_first[::-1]}
    starts = generator.valid_starts
    assert starts == sorted(set(starts)) and all((s - starts[0]) % generator.window_ns == 0 for s in starts)


def test_valid_windows_follow_the_clock_they_are_given(parking_lot):
    now = [1_800_000_000 * 10**9 + 123]
    generator = FuzzGenerator(parking_lot, 0, clock_ns=lambda: now[0])
    window = generator.window_ns
    assert generator.epoch_ns == now[0] // window * window
    first = generator.block(VALID, 0)
    now[0] += 60 * 10**9  # a minute of hostile traffic later
    second = generator.block(VALID, 0)
    third = generator.block(VALID, 0)  # sent at once: still a new window
    assert generator.valid_starts == [generator.epoch_ns, generator.epoch_ns + 30 * window,
                                      generator.epoch_ns + 31 * window]
    assert all(decode_message(m.payload, decode_image=False).window_start_ns == generator.valid_starts[1]
               for m in second if "/data/" in m.topic)
    assert first and third
    # Hostile token messages are stamped now too: refused for their defect, not their age.
    hashed = generator.block("wrong_feature_hash", 5)
    assert {decode_message(m.payload, decode_image=False).window_start_ns for m in hashed} == {
        generator.epoch_ns + 32 * window}


def test_the_generator_cuts_time_in_the_site_s_own_windows(parking_lot):
    # SiteLayout.window_s is the one definition of a window; the fuzzer's valid windows must agree
    # with the aggregator's, or valid traffic would straddle its windows.
    assert FuzzGenerator(parking_lot, 0).window_ns == round(parking_lot.window_s() * 1e9) > 0

def test_result_check_reads_the_store(tmp_path):
    database = tmp_path / "results.sqlite3"
    window = 2 * 10**9
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE results (id INTEGER PRIMARY KEY, window_start_ns INTEGER, payload TEXT)")
        rows = [(BASE_EPOCH_NS, json.dumps({"logits": [0.5, 1.0]})),
                (BASE_EPOCH_NS + window, '{"logits": [NaN, 1.0], "position": [0, 0]}'),
                (BASE_EPOCH_NS + 3 * window + 10, json.dumps({"position": [1.0, float("inf")]})),
                (BASE_EPOCH_NS + 3600 * 10**9, json.dumps({"logits": [0.1]}))]
        conn.executemany("INSERT INTO results (window_start_ns, payload) VALUES (?, ?)", rows)
    report = FuzzReport(0, 100, "test", {c: ClassTally() for c in CLASSES}, first_hostile_block=1)
    report.valid_windows = [{"block": b, "sent_before": 0, "window_start_ns": BASE_EPOCH_NS + i * window,
                             "stored": False} for i, b in enumerate((0, 2, 5, 9))]
    check_results(report, database, window)
    assert [w["stored"] for w in report.valid_windows] == [True, True, False, True]
    assert report.results_stored == 4 and report.results_non_finite == 2 and report.results_unmatched == 1
    assert [w["block"] for w in report.valid_missing] == [5] and len(report.valid_during_fuzz) == 3
    problems = " ".join(report.problems())
    assert "1 of 3 valid windows" in problems and "2 stored result(s) hold NaN" in problems
    check_results(report, tmp_path / "missing.sqlite3", window)
    assert "result database not readable" in " ".join(report.problems())


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
    # Valid traffic keeps producing results through the fuzz (wrong clocks, poisoned births and
    # description churn included), up to the last block, and nothing stored is NaN.
    during = report.valid_during_fuzz
    assert len(during) >= 5 and during[-1]["sent_before"] >= 9_900, summary
    assert report.valid_missing == [] and report.results_non_finite == 0, summary
    assert report.results_stored >= len(report.valid_windows), summary
    # Bounded memory, clean shutdown.
    growth = report.rss_growth_mib
    assert growth is not None and math.isfinite(growth) and growth < RSS_BOUND_MIB, summary
    assert report.exit_code == 0, summary
    assert report.publisher_disconnects == 0
