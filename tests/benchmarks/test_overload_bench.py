"""spar-bench overload, short form: 10x the nominal load on a site this machine cannot serve at 10x."""

import pytest

from benchmarks.errors import BenchError
from benchmarks.load_generator import StepPublish
from benchmarks.overload_bench import OverloadConfig, PhaseResult, recovery_time_s, run_overload


def test_recovery_is_the_first_window_from_which_on_latency_stays_low():
    step = StepPublish(stamps=list(range(6)), scheduled_ns=[j * 10**9 for j in range(6)], started_ns=[],
                       finished_ns=[], messages=0, acked=0)
    baseline = PhaseResult("nominal", 1.0, 6, 6, 0, p50_ms=100.0, p99_ms=120.0, max_ms=130.0, growth_ms=0.0)
    rows = [(900.0, False, {}), (200.0, False, {}), None, (240.0, False, {}), (120.0, False, {}), (110.0, False, {})]
    assert recovery_time_s(step, rows, baseline) == 3.0  # bound 250 ms; window 2 had no result
    assert recovery_time_s(step, [(900.0, False, {})] * 6, baseline) is None


def test_bad_settings_are_refused():
    with pytest.raises(BenchError):
        OverloadConfig(factor=0.5)
    with pytest.raises(BenchError):
        OverloadConfig(phase_s=(1.0, 2.0))
    with pytest.raises(BenchError):
        OverloadConfig(nominal_rate=0.0)


@pytest.mark.slow
@pytest.mark.mosquitto
def test_ten_times_the_load_sheds_the_oldest_keeps_latency_bounded_and_recovers(tmp_path):
    """64 nodes at 5 windows/s, then 50 windows/s (about twice what 2 cores serve at 64 nodes with the
    shipped student's shape: latency.md finds 20 sustained), then 5 again."""
    config = OverloadConfig(nodes=64, nominal_rate=5.0, factor=10.0, phase_s=(3.0, 2.0, 8.0))
    report = run_overload(config, tmp_path)
    nominal, overload, recovery = report.phases
    assert overload.windows == 100 and overload.served < 0.8 * overload.windows  # really overloaded
    assert report.dropped + report.dropped_messages > 0  # work was shed ...
    assert report.published_messages == report.decoded_messages + report.dropped_messages  # ... and counted
    assert report.assembled == report.results + report.dropped + report.failed
    assert report.max_queue_messages <= config.max_held_messages + report.messages_per_window
    # Shed here, not queued at the broker: the aggregator took messages in faster than it decoded
    # them. (When paho's thread decoded, nothing was shed before decoding and messages waited at the
    # broker, 1.4 s median and growing: a figure for the benchmark report, not for an assertion.)
    assert report.dropped_messages > 0
    # The first recovery windows may still meet a full queue (more of them on a busy machine); then
    # every window is served again, within twice the nominal latency (the "recovered" check).
    assert nominal.served == nominal.windows and recovery.served >= recovery.windows // 2
    # Recovered before the 8 s phase ended. At 5 windows/s the phase has 40 windows (16 at the 2 w/s
    # of the d 32 shape this test used before); one stall of this shared machine late in it moves the
    # "stays low from" moment late (6.8 s seen once in eight runs; 0.2-0.6 s usually).
    assert report.recovery_s is not None and report.recovery_s <= 7.5
    assert all(report.checks.values()), report.to_markdown()
    assert "| overload | 50 | 100 |" in report.to_markdown()
