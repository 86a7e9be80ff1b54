"""Evaluation metrics of the downstream tasks: numpy arrays in, plain floats out (no torch).

classify: accuracy, macro-F1.  localize: squared / Euclidean distance statistics.
detect:   mAP@r (a prediction counts only with the right class within r metres; SPAR Table 2).
quake:    hypocentre, epicentral and depth errors.

Positions are in metres (whatever unit the site layout uses). Invalid truth slots are class -1
and NaN positions and are ignored throughout. Percentiles use numpy's default (linear
interpolation between order statistics).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_RADII = (2.0, 4.0, 6.0, 8.0, 10.0)


def _array(x) -> np.ndarray:
    """numpy view of an array-like, including a torch tensor (duck-typed: this module stays torch-free)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def accuracy(pred, truth) -> float:
    """Fraction of equal labels. pred, truth: [B] class ids. NaN for B = 0."""
    pred, truth = _array(pred).reshape(-1), _array(truth).reshape(-1)
    if pred.shape != truth.shape:
        raise ValueError(f"pred has {pred.size} labels, truth {truth.size}")
    return float(np.mean(pred == truth)) if truth.size else float("nan")


def macro_f1(pred, truth) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN).

    Classes are those present in truth or prediction, so a class that is predicted but never true
    counts with F1 = 0 instead of being silently left out. pred, truth: [B] class ids. NaN for B = 0.
    """
    pred, truth = _array(pred).reshape(-1), _array(truth).reshape(-1)
    if pred.shape != truth.shape:
        raise ValueError(f"pred has {pred.size} labels, truth {truth.size}")
    classes = np.union1d(pred, truth)
    if classes.size == 0:
        return float("nan")
    scores = []
    for c in classes:
        tp = np.sum((pred == c) & (truth == c))
        fp = np.sum((pred == c) & (truth != c))
        fn = np.sum((pred != c) & (truth == c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def _distance_stats(dist: np.ndarray, prefix: str = "") -> dict[str, float]:
    if dist.size == 0:
        return {f"{prefix}mean": float("nan"), f"{prefix}median": float("nan"), f"{prefix}p90": float("nan")}
    return {f"{prefix}mean": float(np.mean(dist)), f"{prefix}median": float(np.median(dist)),
            f"{prefix}p90": float(np.percentile(dist, 90))}


def _finite_rows(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if pred.shape != truth.shape:
        raise ValueError(f"pred shape {pred.shape} != truth shape {truth.shape}")
    keep = np.isfinite(truth).all(axis=-1)
    return pred[keep], truth[keep]


def localization_errors(pred, truth) -> dict[str, float]:
    """Single-target localization errors.

    Args:
        pred: [B, d] predicted positions (metres).
        truth: [B, d] true positions; rows with a NaN (window without a target) are skipped.
    Returns:
        mse: mean over windows of the *squared Euclidean distance* (sum of squared coordinate
            errors), in m^2 -- not the per-coordinate mean that the training loss uses;
        mean_distance, median_distance, p90_distance: of the Euclidean distance, in metres.
        All NaN when no row has a target.
    """
    pred, truth = _finite_rows(_array(pred).astype(np.float64), _array(truth).astype(np.float64))
    sq = np.sum((pred - truth) ** 2, axis=-1)
    stats = _distance_stats(np.sqrt(sq))
    return {"mse": float(np.mean(sq)) if sq.size else float("nan"), "mean_distance": stats["mean"],
            "median_distance": stats["median"], "p90_distance": stats["p90"]}


def hypocentre_errors(pred, truth, horizontal_dims: int = 2) -> dict[str, float]:
    """Earthquake location errors.

    Args:
        pred, truth: [B, 3] (x, y, depth) in the layout's unit; truth rows with a NaN are skipped.
        horizontal_dims: how many leading dims are horizontal (the rest is depth).
    Returns:
        hypocentre_{mean,median,p90}: 3-D Euclidean distance;
        epicentral_{mean,median,p90}: horizontal distance;
        depth_{mean,median,p90}: absolute depth error;
        mse: mean squared 3-D distance.
    """
    pred, truth = _finite_rows(_array(pred).astype(np.float64), _array(truth).astype(np.float64))
    diff = pred - truth
    out = _distance_stats(np.linalg.norm(diff, axis=-1), "hypocentre_")
    out.update(_distance_stats(np.linalg.norm(diff[:, :horizontal_dims], axis=-1), "epicentral_"))
    out.update(_distance_stats(np.linalg.norm(diff[:, horizontal_dims:], axis=-1), "depth_"))
    out["mse"] = float(np.mean(np.sum(diff ** 2, axis=-1))) if diff.size else float("nan")
    return out


def _points(x, n: int) -> np.ndarray:
    """[n, d] float64 positions (n may be 0, where reshape(-1) alone could not infer d)."""
    x = _array(x).astype(np.float64)
    return x.reshape(n, -1) if n else np.zeros((0, x.shape[-1] if x.ndim else 0))


def _windows(pred_scores, pred_classes, pred_positions, true_classes, true_positions):
    """Per-window numpy arrays; accepts stacked arrays [W, Q] / [W, K] or ragged sequences of them."""
    n = len(pred_scores)
    if not (len(pred_classes) == len(pred_positions) == len(true_classes) == len(true_positions) == n):
        raise ValueError("predictions and truth must cover the same number of windows")
    for w in range(n):
        scores = _array(pred_scores[w]).reshape(-1).astype(np.float64)
        classes = _array(pred_classes[w]).reshape(-1).astype(np.int64)
        positions = _points(pred_positions[w], scores.size)
        t_classes = _array(true_classes[w]).reshape(-1).astype(np.int64)
        t_positions = _points(true_positions[w], t_classes.size)
        keep_pred = (classes >= 0) & np.isfinite(scores)
        keep_true = (t_classes >= 0) & np.isfinite(t_positions).all(axis=-1)
        yield (scores[keep_pred], classes[keep_pred], positions[keep_pred], t_classes[keep_true],
               t_positions[keep_true])


def _voc_ap(tp: np.ndarray, n_truth: int) -> float:
    """All-point interpolated AP (PASCAL VOC 2010+) of a ranked TP/FP sequence."""
    if tp.size == 0:
        return 0.0
    cum_tp = np.cumsum(tp)
    recall = cum_tp / n_truth
    precision = cum_tp / np.arange(1, tp.size + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: best precision at recall >= r
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def average_precision_per_class(pred_scores, pred_classes, pred_positions, true_classes, true_positions,
                                r: float) -> dict[int, float]:
    """AP@r of every class that has at least one true object.

    Args (over W windows; each may be a stacked array or a sequence of per-window arrays):
        pred_scores: [W, Q] confidence of each prediction (higher = more confident)
        pred_classes: [W, Q] predicted class ids (-1 = no prediction, ignored)
        pred_positions: [W, Q, d] metres
        true_classes: [W, K] class ids, -1 for an empty slot
        true_positions: [W, K, d] metres, NaN in empty slots
        r: match radius (metres)
    Per class, the predictions of all windows are ranked by score (ties keep window order); each in
    turn is a TP if its window holds an unmatched true object of that class within distance <= r
    (the nearest such object is then matched), else an FP. A wrong class, a miss by more than r
    and a duplicate of an already-matched object are all FPs. AP is the all-point interpolated
    area under the precision-recall curve; a class with truth but no prediction scores 0.
    """
    preds: dict[int, list[tuple[float, int, np.ndarray]]] = {}
    truths: list[tuple[np.ndarray, np.ndarray]] = []
    for w, (scores, classes, positions, t_classes, t_positions) in enumerate(
            _windows(pred_scores, pred_classes, pred_positions, true_classes, true_positions)):
        truths.append((t_classes, t_positions))
        for s, c, p in zip(scores, classes, positions, strict=True):
            preds.setdefault(int(c), []).append((float(s), w, p))

    result = {}
    for c in sorted({int(c) for t_classes, _ in truths for c in t_classes}):
        n_truth = sum(int(np.sum(t_classes == c)) for t_classes, _ in truths)
        ranked = sorted(preds.get(c, []), key=lambda item: -item[0])  # sorted() is stable
        matched = [np.zeros(t_classes.size, dtype=bool) for t_classes, _ in truths]
        tp = np.zeros(len(ranked))
        for i, (_, w, p) in enumerate(ranked):
            t_classes, t_positions = truths[w]
            candidates = np.flatnonzero((t_classes == c) & ~matched[w])
            if candidates.size == 0:
                continue
            dist = np.linalg.norm(t_positions[candidates] - p, axis=-1)
            best = int(np.argmin(dist))
            if dist[best] <= r:
                matched[w][candidates[best]] = True
                tp[i] = 1.0
        result[c] = _voc_ap(tp, n_truth)
    return result


def average_precision_at_r(pred_scores, pred_classes, pred_positions, true_classes, true_positions,
                           r: float) -> float:
    """mAP@r: mean of ``average_precision_per_class`` over the classes with at least one true
    object (same arguments). NaN when there is no true object at all."""
    per_class = average_precision_per_class(pred_scores, pred_classes, pred_positions, true_classes,
                                            true_positions, r)
    return float(np.mean(list(per_class.values()))) if per_class else float("nan")


def map_at_thresholds(pred_scores, pred_classes, pred_positions, true_classes, true_positions,
                      radii: Iterable[float] = DEFAULT_RADII) -> dict[float, float]:
    """{r: mAP@r} for each radius (metres)."""
    return {r: average_precision_at_r(pred_scores, pred_classes, pred_positions, true_classes, true_positions, r)
            for r in radii}


def _field(truth, name: str) -> np.ndarray:
    value = truth[name] if isinstance(truth, Mapping) else getattr(truth, name)
    return _array(value)


def summarize(task: str, predictions: Mapping[str, Sequence], batch_truth,
              radii: Iterable[float] = DEFAULT_RADII) -> dict[str, float]:
    """The metrics of ``task`` for a whole evaluation set.

    Args:
        task: "classify", "localize", "detect" or "quake".
        predictions: the head's ``predict`` output, concatenated over the set along axis 0.
        batch_truth: a ``train.batch.Batch`` or a mapping with "label", "target_class",
            "target_position" (numpy or tensors) covering the same windows.
    Returns:
        classify: accuracy, macro_f1.  localize: mse, mean/median/p90_distance (first target slot).
        detect: "mAP@<r>" per radius.  quake: ``hypocentre_errors``.
    """
    if task == "classify":
        label = _field(batch_truth, "label")
        return {"accuracy": accuracy(predictions["label"], label), "macro_f1": macro_f1(predictions["label"], label)}
    if task in ("localize", "quake"):
        pred = _array(predictions["position"])
        truth = _field(batch_truth, "target_position")[:, 0, : pred.shape[-1]]
        return localization_errors(pred, truth) if task == "localize" else hypocentre_errors(pred, truth)
    if task == "detect":
        maps = map_at_thresholds(predictions["scores"], predictions["classes"], predictions["positions"],
                                 _field(batch_truth, "target_class"), _field(batch_truth, "target_position"), radii)
        return {f"mAP@{r:g}": v for r, v in maps.items()}
    raise ValueError(f"unknown task {task!r}; known tasks: classify, detect, localize, quake")
