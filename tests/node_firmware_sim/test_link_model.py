"""Link-model statistics match their parameters over seeded runs (tolerances ~4 sigma)."""

import io
import json
import math

import numpy as np
import pytest

from node_firmware_sim.errors import NodeError
from node_firmware_sim.link_model import (
    BURST_LOST,
    DELIVERED,
    LOST,
    QUEUE_FULL,
    BurstLoss,
    LinkConfig,
    LinkModel,
    Outage,
    ScriptedLink,
    load_link_config,
    parse_link_config,
    read_link_log,
)

N = 20_000


def run(config, n=N, node="n1", nbytes=1000, spacing_s=0.1, seed=7):
    model = LinkModel(config, seed)
    return model, [model.transmit(node, "mic", i, nbytes, i * spacing_s) for i in range(n)]


def within(observed, expected, n):
    sigma = math.sqrt(max(expected * (1 - expected), 1e-9) / n)
    return abs(observed - expected) <= 4 * sigma + 1e-9


@pytest.mark.parametrize("p", [0.05, 0.2, 0.4])
def test_independent_loss_rate(p):
    _, events = run(LinkConfig(loss=p))
    rate = np.mean([e.outcome == LOST for e in events])
    assert within(rate, p, N)


def test_gilbert_elliott_rate_and_burst_length():
    burst = BurstLoss(p_good_to_bad=0.05, p_bad_to_good=0.25, loss_good=0.0, loss_bad=1.0)
    _, events = run(LinkConfig(burst=burst), n=50_000)
    lost = np.array([e.outcome == BURST_LOST for e in events])
    assert abs(lost.mean() - burst.mean_loss) < 0.02  # correlated samples: wider than binomial
    # With loss_bad = 1 a run of losses is a stay in the bad state: geometric, mean 1 / p_bad_to_good.
    runs, length = [], 0
    for flag in lost:
        if flag:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    assert np.mean(runs) == pytest.approx(1 / burst.p_bad_to_good, rel=0.1)
    # Bursty, not independent: P(loss | previous loss) far above the mean loss.
    conditional = lost[1:][lost[:-1]].mean()
    assert conditional > 2 * lost.mean()


def test_delay_jitter_duplication_and_reordering():
    config = LinkConfig(delay_ms=40, jitter_ms=10, duplicate=0.05, reorder=0.03, reorder_ms=500)
    model, events = run(config)
    delays = np.array([e.deliveries_s[0] - e.t_send_s for e in events if not _held_back(e, config)])
    assert delays.mean() == pytest.approx(0.040, abs=0.001)
    assert delays.std() == pytest.approx(0.010, rel=0.1)
    assert within(np.mean([len(e.deliveries_s) == 2 for e in events]), 0.05, N)
    stats = model.stats()
    assert within(stats.reordered / N, 0.03, N)
    assert stats.copies == sum(len(e.deliveries_s) for e in events)
    # A held-back message arrives after the next one sent: that is what reordering means.
    arrivals = [e.deliveries_s[0] for e in events]
    inversions = sum(a > b for a, b in zip(arrivals, arrivals[1:], strict=False))
    assert inversions >= 0.8 * stats.reordered  # a duplicate of a held message may arrive early


def _held_back(event, config):
    return event.deliveries_s[0] - event.t_send_s > config.reorder_ms / 1000 * 0.8


def test_bandwidth_cap_limits_throughput_and_drops_the_excess():
    # 80 kbit/s = 10 kB/s; offer 1000 B every 50 ms = 20 kB/s.
    config = LinkConfig(bandwidth_kbps=80, queue_limit_bytes=20_000)
    _, events = run(config, n=2000, spacing_s=0.05)
    delivered = [e for e in events if e.outcome == DELIVERED]
    span = delivered[-1].deliveries_s[0] - delivered[0].t_send_s
    assert len(delivered) * 1000 / span == pytest.approx(10_000, rel=0.02)
    assert sum(e.outcome == QUEUE_FULL for e in events) == pytest.approx(1000, rel=0.05)
    # Queueing delay never exceeds queue_limit / rate (2 s) plus one transmission time.
    assert max(e.deliveries_s[0] - e.t_send_s for e in delivered) <= 2.0 + 0.1 + 1e-9


def test_scheduled_and_random_outages():
    config = LinkConfig(outages=(Outage("n1", 10.0, 5.0), Outage("*", 100.0, 1.0)))
    model = LinkModel(config, 1)
    assert model.is_up("n1", 9.99) and not model.is_up("n1", 10.0) and not model.is_up("n1", 14.9)
    assert model.is_up("n1", 15.0) and model.is_up("n2", 12.0)
    assert not model.is_up("n2", 100.5)
    rate_h, mean_s = 60.0, 20.0  # one per minute, 20 s each -> down 20 / (60 + 20) of the time
    model = LinkModel(LinkConfig(outage_rate_per_hour=rate_h, outage_mean_s=mean_s), 3)
    grid = np.arange(0, 200_000, 5.0)
    down = np.mean([not model.is_up("n1", t) for t in grid])
    assert down == pytest.approx(mean_s / (3600 / rate_h + mean_s), abs=0.03)


def test_same_seed_same_decisions_whatever_the_interleaving():
    config = LinkConfig(loss=0.3, delay_ms=10, jitter_ms=5, duplicate=0.1)
    a, b = LinkModel(config, 5), LinkModel(config, 5)
    seq_a = [(n, i) for i in range(300) for n in ("n1", "n2")]
    seq_b = [(n, i) for n in ("n2", "n1") for i in range(300)]
    out_a = {(n, i): a.transmit(n, "m", i, 100, i * 0.1) for n, i in seq_a}
    out_b = {(n, i): b.transmit(n, "m", i, 100, i * 0.1) for n, i in seq_b}
    assert out_a == out_b
    other = LinkModel(config, 6)
    assert [other.transmit("n1", "m", i, 100, i * 0.1) for i in range(300)] != [
        out_a[("n1", i)] for i in range(300)]


def test_log_round_trip_and_scripted_replay(tmp_path):
    config = LinkConfig(loss=0.2, delay_ms=30, jitter_ms=10, duplicate=0.05)
    log = io.StringIO()
    model = LinkModel(config, 11, log=log)
    original = [model.transmit("n1", "mic", i, 500, i * 0.5) for i in range(500)]
    path = tmp_path / "link.jsonl"
    path.write_text(log.getvalue())
    events = read_link_log(path)
    assert events == original
    replay = ScriptedLink(events)
    again = [replay.transmit("n1", "mic", i, 500, i * 0.5) for i in range(500)]
    assert again == original
    assert replay.stats("n1") == model.stats("n1")
    with pytest.raises(NodeError, match="no logged decision"):
        replay.transmit("n9", "mic", 0, 500, 0.0)


def test_shipped_link_configs_load():
    lossy = load_link_config("configs/links/lossy.toml")
    assert lossy.loss == 0.2 and lossy.expected_loss == pytest.approx(0.2)
    bursty = load_link_config("configs/links/bursty.toml")
    assert bursty.burst is not None and bursty.outages[0].node == "n03"
    assert load_link_config("configs/links/perfect.toml") == LinkConfig()


@pytest.mark.parametrize("table, fragment", [
    ({"loss": 1.5}, "probability"), ({"loss": "x"}, "probability"), ({"delay_ms": -1}, "delay_ms"),
    ({"lossy": 0.1}, "unknown field 'lossy'"), ({"burst": {"p_good_to_bad": 2}}, "burst.p_good_to_bad"),
    ({"burst": {"nope": 1}}, "nope"), ({"outages": [{"node": "n1", "start_s": 1}]}, "duration_s"),
    ({"outages": [{"node": "n1", "start_s": 1, "duration_s": 0}]}, "duration_s"),
    ({"burst": {"p_good_to_bad": 0, "p_bad_to_good": 0}}, "must be > 0"),
])
def test_bad_link_configs(table, fragment):
    with pytest.raises(NodeError, match=fragment):
        parse_link_config(table, source="x.toml")


def test_log_lines_are_json(tmp_path):
    log = io.StringIO()
    LinkModel(LinkConfig(loss=0.5), 1, log=log).transmit("n1", "mic", 3, 10, 1.0)
    record = json.loads(log.getvalue())
    assert record["node"] == "n1" and record["seq"] == 3 and record["outcome"] in (DELIVERED, LOST)
