"""Per-window detection outcomes of a trial: which vehicles the model found, missed or invented.

mAP@r (``train.metrics``) ranks every detection by its score; a person looking at one window wants
a yes/no instead. Here a query counts as a detection when its most likely class is a vehicle with
probability >= ``SCORE_THRESHOLD``; detections are matched greedily, most confident first, to the
nearest unmatched true vehicle of the same class within ``MATCH_RADIUS_M``. Unmatched true vehicles
are missed, unmatched detections false.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCORE_THRESHOLD = 0.5
MATCH_RADIUS_M = 6.0


@dataclass
class WindowDetections:
    window: int
    truth: list[tuple[int, list[float]]]  # (class id, position)
    detections: list[tuple[int, float, list[float]]]  # (class id, score, position)
    matches: list[tuple[int, int]] = field(default_factory=list)  # (detection index, truth index)

    @property
    def matched(self) -> int:
        return len(self.matches)

    @property
    def missed(self) -> int:
        return len(self.truth) - len(self.matches)

    @property
    def false(self) -> int:
        return len(self.detections) - len(self.matches)


def detection_predictions(logits: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Raw detector outputs of W windows -> ``train.metrics.summarize("detect", ...)``'s predictions.

    logits [W, Q, C + 1] (the last class is "no object"), positions [W, Q, d] metres ->
    {"scores": [W, Q] probability of the best real class, "classes": [W, Q], "positions"}."""
    logits = np.asarray(logits, dtype=np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True))[..., :-1]
    return {"scores": probs.max(-1), "classes": probs.argmax(-1), "positions": np.asarray(positions)}


def detections_of(outputs: dict[str, Any]) -> list[tuple[int, float, list[float]]]:
    """A stored result's DETR outputs -> [(class id, probability, position)] above the threshold.

    ``detection_logits`` [Q, C + 1] (the last class is "no object"), ``detection_positions`` [Q, d].
    """
    # A real class at >= 0.5 (SCORE_THRESHOLD) is necessarily the most likely one, "no object" included.
    pred = detection_predictions(np.asarray(outputs["detection_logits"])[None],
                                 np.asarray(outputs["detection_positions"], dtype=np.float64)[None])
    scores, classes, positions = pred["scores"][0], pred["classes"][0], pred["positions"][0]
    return [(int(classes[q]), float(scores[q]), positions[q].tolist())
            for q in np.flatnonzero(scores >= SCORE_THRESHOLD)]


def match_window(window: int, truth: list[tuple[int, list[float]]],
                 detections: list[tuple[int, float, list[float]]]) -> WindowDetections:
    out = WindowDetections(window, truth, detections)
    taken: set[int] = set()
    for d in sorted(range(len(detections)), key=lambda i: -detections[i][1]):
        cls, _, pos = detections[d]
        candidates = [(float(np.linalg.norm(np.subtract(pos, t_pos[:len(pos)]))), t)
                      for t, (t_cls, t_pos) in enumerate(truth) if t_cls == cls and t not in taken]
        if candidates:
            dist, t = min(candidates)
            if dist <= MATCH_RADIUS_M:
                taken.add(t)
                out.matches.append((d, t))
    return out


def window_detections(matched: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[WindowDetections]:
    """Every (stored result, truth) pair of a trial whose model detects, in window order."""
    out = []
    for result, truth in matched:
        outputs = result.get("outputs", {})
        if "detection_logits" not in outputs:
            return []
        true = [(int(t["class_id"]), [float(v) for v in t["position"]]) for t in truth["targets"]]
        out.append(match_window(int(truth["window"]), true, detections_of(outputs)))
    return out


def detection_markdown(windows: list[WindowDetections], names: tuple[str, ...], rows: int = 20) -> list[str]:
    """The report's section: totals, then the first ``rows`` windows one by one."""
    if not windows:
        return []
    matched, missed, false = (sum(getattr(w, k) for w in windows) for k in ("matched", "missed", "false"))
    lines = ["## Detections per window", "",
             f"A detection: a query whose most likely class is a vehicle with probability >= {SCORE_THRESHOLD:g}; "
             f"it matches a true vehicle of the same class within {MATCH_RADIUS_M:g} m (most confident first). "
             f"Over {len(windows)} windows: **{matched} matched, {missed} missed, {false} false**.", "",
             "| window | vehicles | matched | missed | false | detections (class, m) |",
             "|---:|---:|---:|---:|---:|---|"]
    for w in windows[:rows]:
        found = "; ".join(f"{_name(names, c)} ({p[0]:.1f}, {p[1]:.1f})" for c, _, p in w.detections) or "-"
        lines.append(f"| {w.window} | {len(w.truth)} | {w.matched} | {w.missed} | {w.false} | {found} |")
    return [*lines, ""]


def _name(names: tuple[str, ...], class_id: int) -> str:
    return names[class_id] if 0 <= class_id < len(names) else str(class_id)
