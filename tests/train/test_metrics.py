"""Hand-checked cases for train.metrics (numpy only)."""

import math

import numpy as np
import pytest

from train.metrics import (
    accuracy,
    average_precision_at_r,
    average_precision_per_class,
    hypocentre_errors,
    localization_errors,
    macro_f1,
    map_at_thresholds,
    summarize,
)

NAN = float("nan")


def test_accuracy_hand_case():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        accuracy([0, 1], [0, 1, 2])


def test_macro_f1_hand_case():
    # class 0: TP1 FP0 FN0 -> 1;  class 1: TP1 FP0 FN1 -> 2/3;  class 2: TP1 FP1 FN0 -> 2/3
    assert macro_f1([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_macro_f1_counts_a_class_that_is_only_predicted():
    # class 0: TP1 FP0 FN1 -> 2/3; class 3 never true but predicted once: F1 0
    assert macro_f1([0, 3], [0, 0]) == pytest.approx((2 / 3 + 0) / 2)
    assert macro_f1([1, 1, 1], [1, 1, 1]) == 1.0


def test_localization_errors_hand_case_skip_rows_without_target():
    pred = np.array([[0.0, 0.0], [3.0, 4.0], [100.0, 100.0]])
    truth = np.array([[0.0, 0.0], [0.0, 0.0], [NAN, NAN]])
    out = localization_errors(pred, truth)
    assert out["mse"] == pytest.approx(12.5)  # mean of squared distances 0 and 25
    assert out["mean_distance"] == pytest.approx(2.5)
    assert out["median_distance"] == pytest.approx(2.5)
    assert out["p90_distance"] == pytest.approx(4.5)  # linear interpolation between 0 and 5
    assert all(isinstance(v, float) for v in out.values())


def test_hypocentre_errors_hand_case():
    pred = np.array([[3.0, 4.0, 2.0], [0.0, 0.0, 0.0]])
    truth = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    out = hypocentre_errors(pred, truth)
    assert out["hypocentre_mean"] == pytest.approx((math.sqrt(29) + 1) / 2)
    assert out["epicentral_median"] == pytest.approx(2.5)
    assert out["epicentral_p90"] == pytest.approx(4.5)
    assert out["depth_mean"] == pytest.approx(1.5)
    assert out["depth_p90"] == pytest.approx(1.9)


def _one_window(pred, truth):
    """pred: list of (score, class, (x, y)); truth: list of (class, (x, y)) -> stacked 1-window arrays."""
    scores = np.array([[p[0] for p in pred]], dtype=float).reshape(1, len(pred))
    classes = np.array([[p[1] for p in pred]], dtype=int).reshape(1, len(pred))
    positions = np.array([[p[2] for p in pred]], dtype=float).reshape(1, len(pred), 2)
    t_classes = np.array([[t[0] for t in truth]], dtype=int).reshape(1, len(truth))
    t_positions = np.array([[t[1] for t in truth]], dtype=float).reshape(1, len(truth), 2)
    return scores, classes, positions, t_classes, t_positions


def test_perfect_predictions_give_map_one():
    args = _one_window([(0.9, 1, (0, 0)), (0.8, 2, (10, 0))], [(1, (0, 0)), (2, (10, 0))])
    assert average_precision_at_r(*args, r=2) == 1.0


def test_radius_decides_a_3m_miss():
    args = _one_window([(0.9, 1, (3, 0))], [(1, (0, 0))])
    assert average_precision_at_r(*args, r=4) == 1.0
    assert average_precision_at_r(*args, r=2) == 0.0
    assert map_at_thresholds(*args) == {2.0: 0.0, 4.0: 1.0, 6.0: 1.0, 8.0: 1.0, 10.0: 1.0}


def test_wrong_class_is_a_false_positive():
    # The class-2 guess on the class-1 object is an FP for class 2 (no class-2 truth: not in the
    # mean) and does not find the class-1 object.
    args = _one_window([(0.9, 2, (0, 0))], [(1, (0, 0))])
    assert average_precision_per_class(*args, r=4) == {1: 0.0}
    # ranked ahead of a correct class-1 guess, a wrong-class guess on a class-1 object does not hurt class 1
    args = _one_window([(0.9, 2, (0, 0)), (0.5, 1, (0, 0))], [(1, (0, 0)), (2, (20, 0))])
    assert average_precision_per_class(*args, r=4) == {1: 1.0, 2: 0.0}
    assert average_precision_at_r(*args, r=4) == 0.5


def test_duplicate_detection_is_a_false_positive():
    # Two windows. Ranked: 0.9 TP (obj A), 0.8 duplicate of A -> FP, 0.7 TP (obj B).
    # recall 1/2, 1/2, 1; precision 1, 1/2, 2/3 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    scores = [np.array([0.9, 0.8]), np.array([0.7])]
    classes = [np.array([1, 1]), np.array([1])]
    positions = [np.array([[0.0, 0.0], [0.5, 0.0]]), np.array([[5.0, 5.0]])]
    t_classes = [np.array([1, -1]), np.array([1, -1])]
    t_positions = [np.array([[0.0, 0.0], [NAN, NAN]]), np.array([[5.0, 5.0], [NAN, NAN]])]
    assert average_precision_at_r(scores, classes, positions, t_classes, t_positions, r=2) == pytest.approx(5 / 6)
    # Duplicate ranked last instead: the curve reaches recall 1 at precision 1.
    scores = [np.array([0.9, 0.6]), np.array([0.7])]
    assert average_precision_at_r(scores, classes, positions, t_classes, t_positions, r=2) == pytest.approx(1.0)


def test_ap_uses_the_precision_envelope():
    # One class-1 object per window. Ranked: TP, FP, TP, TP -> precision 1, 1/2, 2/3, 3/4 at recall
    # 1/3, 1/3, 2/3, 1. All-point interpolation takes the best precision at recall >= r:
    # AP = 1/3 * 1 + 1/3 * 3/4 + 1/3 * 3/4 = 5/6 (the raw curve would give 1/3 + 2/9 + 1/4).
    scores = [np.array([0.9]), np.array([0.8, 0.7]), np.array([0.6])]
    classes = [np.array([1]), np.array([1, 1]), np.array([1])]
    positions = [np.array([[0.0, 0.0]]), np.array([[10.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 0.0]])]
    t_classes = [np.array([1])] * 3
    t_positions = [np.array([[0.0, 0.0]])] * 3
    assert average_precision_at_r(scores, classes, positions, t_classes, t_positions, r=2) == pytest.approx(5 / 6)


def test_empty_predictions_give_zero_and_no_truth_gives_nan():
    empty = (np.zeros((2, 0)), np.zeros((2, 0), int), np.zeros((2, 0, 2)))
    truth = (np.array([[1], [-1]]), np.array([[[0.0, 0.0]], [[NAN, NAN]]]))
    assert average_precision_at_r(*empty, *truth, r=4) == 0.0
    assert math.isnan(average_precision_at_r(*empty, np.full((2, 1), -1), np.full((2, 1, 2), NAN), r=4))


def test_greedy_matching_takes_the_nearest_unmatched_object():
    # The first guess is within r = 3 of both A (2.5 m) and B (1.5 m): it must take the nearer B,
    # leaving A for the second guess (taking A would leave the second guess 4 m from B: an FP).
    args = _one_window([(0.9, 1, (2.5, 0)), (0.8, 1, (0.0, 0))], [(1, (0.0, 0)), (1, (4.0, 0))])
    assert average_precision_at_r(*args, r=3) == 1.0


def test_map_ignores_prediction_order_within_a_window():
    rng = np.random.default_rng(0)
    w, q, k = 6, 5, 3
    scores = rng.random((w, q))
    classes = rng.integers(1, 3, (w, q))
    positions = rng.normal(0, 3, (w, q, 2))
    t_classes = rng.integers(-1, 3, (w, k))
    t_positions = np.where((t_classes >= 0)[..., None], rng.normal(0, 3, (w, k, 2)), NAN)
    perm = rng.permutation(q)
    a = map_at_thresholds(scores, classes, positions, t_classes, t_positions)
    b = map_at_thresholds(scores[:, perm], classes[:, perm], positions[:, perm], t_classes, t_positions)
    assert a == b
    assert list(a.values()) == sorted(a.values())  # a larger radius never lowers mAP


def test_summarize_picks_the_task_metrics():
    truth = {"label": np.array([1, 2]), "target_class": np.array([[1], [-1]]),
             "target_position": np.array([[[0.0, 0.0, 1.0]], [[NAN, NAN, NAN]]])}
    cls = summarize("classify", {"label": np.array([1, 1])}, truth)
    assert cls == {"accuracy": 0.5, "macro_f1": pytest.approx(1 / 3)}  # F1: class 1 2/3, class 2 0
    loc = summarize("localize", {"position": np.array([[3.0, 4.0], [9.0, 9.0]])}, truth)
    assert loc["mse"] == pytest.approx(25.0) and loc["median_distance"] == pytest.approx(5.0)
    quake = summarize("quake", {"position": np.array([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])}, truth)
    assert quake["depth_median"] == pytest.approx(2.0) and quake["epicentral_median"] == 0.0
    det = summarize("detect", {"scores": np.array([[0.9], [0.1]]), "classes": np.array([[1], [1]]),
                               "positions": np.array([[[3.0, 0.0, 1.0]], [[0.0, 0.0, 0.0]]])}, truth)
    assert det == {"mAP@2": 0.0, "mAP@4": 1.0, "mAP@6": 1.0, "mAP@8": 1.0, "mAP@10": 1.0}
    with pytest.raises(ValueError, match="classify"):
        summarize("segment", {}, truth)
