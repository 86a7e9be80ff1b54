"""Per-window detection outcomes of a trial, checked by hand."""

from __future__ import annotations

import numpy as np

from trials.detections import detection_markdown, detections_of, match_window, window_detections

NAMES = ("none", "motorcycle", "car", "van", "truck")


def logits(*classes: int) -> list[list[float]]:
    """One query per class id, sure of it (index 5 = "no object")."""
    out = np.full((len(classes), 6), -9.0)
    for q, c in enumerate(classes):
        out[q, c] = 9.0
    return out.tolist()


def test_only_confident_vehicle_queries_are_detections():
    outputs = {"detection_logits": [*logits(2, 5), [0.0, 0.0, 0.1, 0.0, 0.0, 0.0]],  # car; no object; unsure
               "detection_positions": [[1.0, 2.0], [5.0, 5.0], [9.0, 9.0]]}
    found = detections_of(outputs)
    assert [(c, p) for c, _, p in found] == [(2, [1.0, 2.0])] and found[0][1] > 0.99


def test_a_window_counts_matched_missed_and_false_detections():
    truth = [(2, [0.0, 0.0]), (4, [20.0, 0.0]), (2, [40.0, 0.0])]
    detections = [(2, 0.9, [1.0, 1.0]),  # the car at the origin, 1.4 m off
                  (4, 0.8, [27.0, 0.0]),  # the truck, but 7 m off: false, and the truck is missed
                  (3, 0.7, [40.0, 0.0])]  # a van where a car is: false, the car is missed
    w = match_window(3, truth, detections)
    assert (w.matched, w.missed, w.false) == (1, 2, 2) and w.matches == [(0, 0)]
    # the more confident of two detections takes the vehicle; the other is a duplicate, so false
    twice = match_window(0, [(2, [0.0, 0.0])], [(2, 0.6, [0.5, 0.0]), (2, 0.9, [2.0, 0.0])])
    assert twice.matches == [(1, 0)] and twice.false == 1


def test_trial_pairs_become_a_table_with_totals():
    pairs = [({"outputs": {"detection_logits": logits(2, 5), "detection_positions": [[0.0, 1.0], [0.0, 0.0]]}},
              {"window": 0, "targets": [{"class_id": 2, "position": [0.0, 0.0]}]}),
             ({"outputs": {"detection_logits": logits(5, 5), "detection_positions": [[0.0, 0.0], [0.0, 0.0]]}},
              {"window": 1, "targets": [{"class_id": 1, "position": [3.0, 3.0]}]})]
    windows = window_detections(pairs)
    assert [(w.matched, w.missed, w.false) for w in windows] == [(1, 0, 0), (0, 1, 0)]
    text = "\n".join(detection_markdown(windows, NAMES))
    assert "**1 matched, 1 missed, 0 false**" in text and "| 0 | 1 | 1 | 0 | 0 | car (0.0, 1.0) |" in text
    assert window_detections([({"outputs": {"position": [0, 0]}}, pairs[0][1])]) == []  # not a detector


def test_the_live_line_speaks_of_hypocentres_in_km_and_of_vehicle_counts():
    from trials.live_view import Detection, LiveSnapshot, status_line

    def line(detection):
        return status_line(LiveSnapshot("running", 30.0, 2, 4, 16, 16, 5.0, 2.0, 2, 0, 2, 0, 0, 12.0,
                                        (detection,)))

    quake = Detection(3, 13, 16, False, "event", "event", (12300.0, -4000.0, 8000.0), (10300.0, -4000.0, 9000.0),
                      hypocentre=True)
    assert "latest: hypocentre (12.3, -4.0) km, 8.0 km deep -> (10.3, -4.0) km, 9.0 km deep, 2.2 km off" in line(quake)
    replay = Detection(None, 5, 16, False, None, "event", None, (2300.0, 6300.0, 12100.0), hypocentre=True)
    assert line(replay).endswith("latest: hypocentre (2.3, 6.3) km, 12.1 km deep")
    busy = Detection(7, 8, 8, True, "car", None, None, None, vehicles=3, detected=2)
    assert line(busy).endswith("latest: 3 vehicle(s) -> 2 detected")
