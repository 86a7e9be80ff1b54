"""A trial with placement events against its control trial (same seed, site, model and link, no
events): each event's windows scored in both, so a change in quality is paired window by window
(``spar-trial compare``)."""

from __future__ import annotations

from pathlib import Path

from testbed.report_format import short_number
from trials.errors import TrialError
from trials.report import analyze_trial, scores_of_windows

# Settings that must match for a control trial to see the same world as the trial with events.
SAME_WORLD = ("site", "scenario", "model", "seed", "duration_s", "codec", "scenario_params", "link")


def compare_with_control(events_folder: Path, control_folder: Path) -> list[str]:
    """Markdown: each event's "after" windows scored in the trial with events and in a control trial
    (same seed, site, model and link, no events), so the change in quality is paired window by window
    rather than a comparison of different vehicles before and after."""

    with_events, control = analyze_trial(events_folder), analyze_trial(control_folder)
    differs = [k for k in SAME_WORLD if with_events.config.get(k) != control.config.get(k)]
    if differs:
        raise TrialError(f"{control_folder} is not a control of {events_folder}: {', '.join(differs)} differ")
    if control.config.get("events"):
        raise TrialError(f"{control_folder} has placement events of its own; a control trial has none")
    if not with_events.events:
        raise TrialError(f"{events_folder} has no placement events to compare")
    metrics = tuple(sorted({m for o in with_events.events for m in o.after}))
    head = "| event | windows | " + " | ".join(f"{m} with the event | {m} control" for m in metrics) + " |"
    lines = ["## Placement events against a control trial", "",
             f"Control: `{control_folder}` (same seed, site, model and link; no events). The same stored windows "
             "are scored in both trials: before = from the previous event to this one, after = from the first "
             "window using the event to the next event.", "", head, "|---|---:|" + "---:|" * (2 * len(metrics))]
    ends = [o.event_window for o in with_events.events[1:]] + [None]
    begins = [0] + [o.event_window for o in with_events.events[:-1]]
    for outcome, begin, end in zip(with_events.events, begins, ends, strict=True):
        label = f"{outcome.kind} {outcome.node}"
        spans = [("before", begin, outcome.event_window)]
        if outcome.first_window is not None:
            spans.append(("after", outcome.first_window, end))
        for name, lo, hi in spans:
            ours, theirs = scores_of_windows(with_events, lo, hi), scores_of_windows(control, lo, hi)
            cells = " | ".join(f"{short_number(ours[1].get(m))} | {short_number(theirs[1].get(m))}" for m in metrics)
            lines.append(f"| {label}, {name} | {lo}–{'end' if hi is None else hi - 1} ({ours[0]}/{theirs[0]}) | "
                         f"{cells} |")
    return [*lines, ""]
