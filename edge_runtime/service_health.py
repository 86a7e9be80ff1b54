"""What /healthz says: the aggregator's problems, each one a thing an operator can act on.

"Connected to the broker" is not health. An aggregator can be connected and still produce nothing:
the broker refused its subscriptions, the broker lost the session (and with it what it queued for
us), a thread died, the disk fails every store, or messages arrive but no window is ever stored (a
clock error that made every message late). Each is a problem here, with a sentence that says what to
do, and the gauge ``spar_health_problem{problem=...}`` (see ``service_metrics``).

``status`` is "ok" with no problem, "degraded" when only some node clocks are off (their messages are
refused, the rest of the site goes on), else "failing"; the HTTP endpoint answers 503 when "failing".
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_runtime.service import Aggregator

#: Every problem ``problems`` can report.
HEALTH_PROBLEMS = ("disconnected", "subscription_refused", "session_lost", "thread_dead", "storage_failing",
                   "stalled", "node_clocks")
SESSION_LOST_HOLD_S = 600.0  # a lost broker session is reported this long (at least stall_windows)


def problems(agg: Aggregator) -> dict[str, str]:
    """What is wrong now, problem -> explanation (empty when all is well); keys from HEALTH_PROBLEMS."""
    now = time.monotonic()
    stall_s = agg.config.stall_windows * agg.window_ns / 1e9
    found: dict[str, str] = {}
    if not agg.ingest.connected.is_set():
        found["disconnected"] = "not connected to the broker (reconnecting)"
    if agg.ingest.refused_subscriptions:
        found["subscription_refused"] = ("the broker refused " + "; ".join(agg.ingest.refused_subscriptions)
                                         + ": nothing arrives on them; fix the ACL")
    lost_s = agg.ingest.session_lost_s
    if lost_s is not None and now - lost_s < max(stall_s, SESSION_LOST_HOLD_S):
        found["session_lost"] = (f"the broker did not keep our session ({now - lost_s:.0f} s ago): what it queued "
                                 "for us while we were away is lost; is its persistence on?")
    dead = agg.dead_threads()
    if dead:
        found["thread_dead"] = "; ".join(f"{name}: {why}" for name, why in dead.items()) + ": restart the service"
    failing_since = agg.worker.storage_failing_since
    if failing_since is not None:
        found["storage_failing"] = (f"storing results has failed for {now - failing_since:.0f} s (retrying; "
                                    "nothing is acknowledged meanwhile): check the disk")
    accepted, since = agg.processor.last_accepted_s, agg.processor.accepting_since_s
    last_stored = max(agg.worker.last_stored_s or 0.0, since or 0.0)
    if accepted is not None and now - accepted < stall_s and now - last_stored > stall_s:
        found["stalled"] = (f"token messages arrive but no result was stored for {now - last_stored:.0f} s "
                            f"({agg.config.stall_windows} windows)")
    off, _ = agg.processor.clock_report(now, time.time_ns())
    if off:
        found["node_clocks"] = ("refused for their clocks: "
                                + ", ".join(f"{node} {v['offset_s']:+.0f} s" for node, v in sorted(off.items())))
    return found


def health_report(agg: Aggregator) -> dict[str, Any]:
    """The JSON object of /healthz."""
    now = time.monotonic()
    found = problems(agg)
    status = "ok" if not found else "degraded" if set(found) <= {"node_clocks"} else "failing"
    off, site_offset = agg.processor.clock_report(now, time.time_ns())
    last_stored = agg.worker.last_stored_s
    return {"status": status, "problems": found, "site": agg.site,
            "model": f"{agg.manifest.name}@{agg.manifest.version}",
            "open_windows": agg.assembler.open_windows, "queued_windows": agg.window_queue.qsize(),
            "queued_messages": agg.window_queue.weight(), "undecoded_messages": agg.message_queue.qsize(),
            "nodes": {n.id: ("online" if n.online else "offline") for n in agg.registry.nodes()},
            "refused_nodes": agg.registry.refused(), "clock_off_nodes": off,
            # The site's latest window starts minus this box's clock: about minus one window when both
            # are right; hours off means this box's clock is wrong (the site's results go on).
            "site_clock_offset_s": None if site_offset is None else round(site_offset, 3),
            "seconds_since_last_result": None if last_stored is None else round(now - last_stored, 3)}
