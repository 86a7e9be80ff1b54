"""What /healthz says: the aggregator's problems, each one a thing an operator can act on.

"Connected to the broker" is not health. An aggregator can be connected and still produce nothing:
the broker refused its subscriptions, the broker lost the session (and with it what it queued for
us), a thread died, the disk fails every store, or messages arrive but no window is ever stored (a
clock error that made every message late). Each is a problem here, with a sentence that says what to
do, and the gauge ``spar_health_problem{problem=...}`` (see ``service_metrics``).

Both read an ``AggregatorStats`` snapshot (``Aggregator.stats()``), never the service itself.

``status`` is "ok" with no problem, "degraded" when only some node clocks are off (their messages are
refused, the rest of the site goes on), else "failing"; the HTTP endpoint answers 503 when "failing".
"""

from __future__ import annotations

from typing import Any

from edge_runtime.aggregator_stats import AggregatorStats

#: Every problem ``problems`` can report.
HEALTH_PROBLEMS = ("disconnected", "subscription_refused", "session_lost", "thread_dead", "storage_failing",
                   "stalled", "node_clocks")
SESSION_LOST_HOLD_S = 600.0  # a lost broker session is reported this long (at least stall_windows)


def problems(stats: AggregatorStats) -> dict[str, str]:
    """What was wrong when ``stats`` was taken, problem -> explanation (empty when all is well); keys
    from HEALTH_PROBLEMS."""
    now = stats.taken_s
    stall_s = stats.stall_s
    found: dict[str, str] = {}
    if not stats.connected:
        found["disconnected"] = "not connected to the broker (reconnecting)"
    if stats.refused_subscriptions:
        found["subscription_refused"] = ("the broker refused " + "; ".join(stats.refused_subscriptions)
                                         + ": nothing arrives on them; fix the ACL")
    lost_s = stats.session_lost_s
    if lost_s is not None and now - lost_s < max(stall_s, SESSION_LOST_HOLD_S):
        found["session_lost"] = (f"the broker did not keep our session ({now - lost_s:.0f} s ago): what it queued "
                                 "for us while we were away is lost; is its persistence on?")
    dead = stats.dead_threads
    if dead:
        found["thread_dead"] = "; ".join(f"{name}: {why}" for name, why in dead.items()) + ": restart the service"
    failing_since = stats.storage_failing_since_s
    if failing_since is not None:
        found["storage_failing"] = (f"storing results has failed for {now - failing_since:.0f} s (retrying; "
                                    "nothing is acknowledged meanwhile): check the disk")
    accepted, since = stats.last_accepted_s, stats.accepting_since_s
    last_stored = max(stats.last_stored_s or 0.0, since or 0.0)
    if accepted is not None and now - accepted < stall_s and now - last_stored > stall_s:
        found["stalled"] = (f"token messages arrive but no result was stored for {now - last_stored:.0f} s "
                            f"({stats.stall_windows} windows)")
    off = stats.clock_off_nodes
    if off:
        found["node_clocks"] = ("refused for their clocks: "
                                + ", ".join(f"{node} {v['offset_s']:+.0f} s" for node, v in sorted(off.items())))
    return found


def health_report(stats: AggregatorStats) -> dict[str, Any]:
    """The JSON object of /healthz."""
    now = stats.taken_s
    found = problems(stats)
    status = "ok" if not found else "degraded" if set(found) <= {"node_clocks"} else "failing"
    site_offset, last_stored = stats.site_clock_offset_s, stats.last_stored_s
    return {"status": status, "problems": found, "site": stats.site, "model": stats.model,
            "open_windows": stats.open_windows, "queued_windows": stats.queued_windows,
            "queued_messages": stats.queued_window_messages, "undecoded_messages": stats.queued_messages,
            "nodes": {node: ("online" if online else "offline") for node, online in stats.nodes.items()},
            "refused_nodes": dict(stats.refused_nodes),
            "clock_off_nodes": {node: dict(v) for node, v in stats.clock_off_nodes.items()},
            # The site's latest window starts minus this box's clock: about minus one window when both
            # are right; hours off means this box's clock is wrong (the site's results go on).
            "site_clock_offset_s": None if site_offset is None else round(site_offset, 3),
            "seconds_since_last_result": None if last_stored is None else round(now - last_stored, 3)}
