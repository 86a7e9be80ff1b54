"""ClockGuard: which window starts are sane, judged against the site first and the box clock second."""

import pytest

from edge_runtime.clock_guard import MAX_START_NS, ClockGuard, ClockLimits
from edge_runtime.errors import AggregatorError

NOW_NS = 1_796_000_000 * 10**9  # this box's wall clock in the tests
HOUR_NS = 3600 * 10**9


def hear_site(guard, nodes=("n02", "n03", "n04"), start_ns=NOW_NS - 2 * 10**9, now_s=100.0):
    for node in nodes:
        assert guard.check(node, start_ns, NOW_NS, now_s).accepted


def test_first_messages_are_judged_by_the_box_clock():
    guard = ClockGuard()
    ahead = guard.check("n01", NOW_NS + HOUR_NS, NOW_NS, 1.0)
    assert not ahead.accepted and ahead.reason == "clock_ahead" and ahead.offset_s == pytest.approx(3600)
    behind = guard.check("n02", NOW_NS - 10 * 86_400 * 10**9, NOW_NS, 1.0)
    assert not behind.accepted and behind.reason == "clock_behind"
    assert guard.check("n03", NOW_NS - HOUR_NS, NOW_NS, 1.0).accepted  # backlog the broker kept


def test_one_node_against_the_site_is_outvoted_whatever_the_box_says():
    guard = ClockGuard()
    hear_site(guard)
    verdict = guard.check("n01", NOW_NS + HOUR_NS, NOW_NS, 100.5)
    assert not verdict.accepted and verdict.reason == "clock_skew" and "n01" in verdict.detail
    assert guard.off_nodes(100.5) == {"n01": {"offset_s": pytest.approx(3601.5), "refused": 1}}
    assert guard.check("n02", NOW_NS, NOW_NS, 101.0).accepted  # the others go on
    assert guard.check("n01", NOW_NS, NOW_NS, 101.0).accepted  # NTP came: n01 is back
    assert guard.off_nodes(101.0) == {}


def test_a_site_whose_clocks_all_disagree_with_the_box_keeps_working():
    """This box booted without a real-time clock (1970): the site agrees with itself, so its windows
    are accepted once two nodes were heard, and the box's offset is reported."""
    guard = ClockGuard()
    box_ns = 10**9  # 1970
    assert not guard.check("n01", NOW_NS, box_ns, 1.0).accepted
    assert not guard.check("n02", NOW_NS, box_ns, 1.0).accepted
    assert guard.check("n03", NOW_NS, box_ns, 1.0).accepted
    assert guard.check("n01", NOW_NS + 2 * 10**9, box_ns, 3.0).accepted
    assert guard.box_offset_s(box_ns, 3.0) > 1e9


def test_a_site_wide_pause_is_not_a_clock_error():
    """Every node quiet for 40 s (a broker outage): their next starts are 40 s later, as the time
    since they were heard says, not 40 s off."""
    guard = ClockGuard()
    hear_site(guard, nodes=("n01", "n02", "n03", "n04"), now_s=100.0)
    for node in ("n01", "n02", "n03", "n04"):
        assert guard.check(node, NOW_NS + 38 * 10**9, NOW_NS + 40 * 10**9, 140.0).accepted, node


def test_starts_no_clock_shows_are_refused_always():
    guard = ClockGuard()
    box_ns = MAX_START_NS  # even a site and a box that both say 2116 get no further
    assert guard.check("n02", MAX_START_NS, box_ns, 100.0).accepted
    assert guard.check("n03", MAX_START_NS, box_ns, 100.0).accepted
    for start in (MAX_START_NS + 1, 2**63 - 1, 0, -5):
        verdict = guard.check("n09", start, box_ns, 100.0)
        assert not verdict.accepted and verdict.reason == "clock_absurd"


def test_a_node_heard_long_ago_is_no_reference_and_spoofed_ids_are_bounded():
    guard = ClockGuard(ClockLimits(memory_s=10.0))
    hear_site(guard, now_s=0.0)
    # 20 s later nobody is recent: the box clock judges again.
    assert guard.check("n01", NOW_NS + HOUR_NS, NOW_NS, 20.0).reason == "clock_ahead"
    for i in range(5000):
        guard.check(f"x{i}", NOW_NS, NOW_NS, 30.0)
    assert len(guard._nodes) <= 4096


def test_limits_are_validated():
    for bad in (0, -1, float("inf"), float("nan"), True, "60"):
        with pytest.raises(AggregatorError, match="max_skew_s"):
            ClockLimits(max_skew_s=bad)


def test_two_wrong_clocks_at_start_do_not_outvote_the_right_ones():
    """The first two nodes heard are both wrong (refused by the box clock): they are no reference
    against the right nodes that follow, and once two right nodes are in, the site judges."""
    guard = ClockGuard()
    assert not guard.check("n01", NOW_NS + HOUR_NS, NOW_NS, 1.0).accepted
    assert not guard.check("n02", NOW_NS - 10 * 86_400 * 10**9, NOW_NS, 1.0).accepted
    assert guard.check("n03", NOW_NS - 2 * 10**9, NOW_NS, 1.0).accepted
    assert guard.check("n04", NOW_NS - 2 * 10**9, NOW_NS, 1.0).accepted
    assert guard.check("n01", NOW_NS + HOUR_NS, NOW_NS, 2.0).reason == "clock_skew"
