"""Floors for multi-vehicle detection (mAP@r), on the same band features as ``train.floors``.

* ``KnnDetectionFloor``: the vehicles of the k training windows that sound most alike (standardised
  band energies), each with the inverse-distance weight of its window as its score;
* ``EnergyPeakFloor``: a physics estimate. Every node whose level is the highest among itself and
  its nearest neighbours, and within ``drop_db`` of the window's loudest node, is a vehicle; its
  position is the energy-weighted centroid of that node and its neighbours, its score the node's
  linear level, and its class the one a softmax regression on that node's own band energies
  predicts (trained on nodes whose nearest vehicle is within ``CLASS_RADIUS_M``).

Each floor tunes one setting on the last fifth of its training windows (``train.floors``'s rule),
scored by mean mAP over ``RADII``. Predictions are ragged per window: (scores, classes, positions).
"""

from __future__ import annotations

import numpy as np

from train.floors import BANDS, KnnFloor, SoftmaxFloor, best_on_tuning, tune_split, window_features
from train.metrics import map_at_thresholds

RADII = (4.0, 6.0, 8.0, 10.0)
KNN_K = (1, 3, 5, 10)
DROP_DB = (3.0, 6.0, 10.0, 20.0, 30.0)
NEIGHBOURS = 2  # a peak is louder than its two nearest nodes
CLASS_RADIUS_M = 6.0

Predictions = tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]  # scores, classes, positions


def mean_map(pred: Predictions, true_class: np.ndarray, true_position: np.ndarray) -> float:
    maps = map_at_thresholds(*pred, true_class, true_position, RADII)
    values = [v for v in maps.values() if np.isfinite(v)]
    return float(np.mean(values)) if values else 0.0


class KnnDetectionFloor:
    """The vehicles of the nearest training windows (by standardised band features)."""

    def __init__(self):
        self.k = 1
        self.knn = KnnFloor()

    def fit(self, x, mask, true_class, true_position) -> KnnDetectionFloor:
        """x, mask [W, F]; true_class [W, K]; true_position [W, K, d]."""
        fit_idx, tune_idx = tune_split(len(x))

        def tune_map(k: int) -> float:
            self.k = k
            self._fit(x[fit_idx], mask[fit_idx], true_class[fit_idx], true_position[fit_idx])
            return mean_map(self.predict(x[tune_idx], mask[tune_idx]), true_class[tune_idx], true_position[tune_idx])

        self.k = best_on_tuning((k for k in KNN_K if k <= len(fit_idx)), tune_map, higher_is_better=True) or 1
        return self._fit(x, mask, true_class, true_position)

    def _fit(self, x, mask, true_class, true_position) -> KnnDetectionFloor:
        self.knn.k = self.k
        self.knn._fit(x, mask, np.zeros((len(x), 1)))
        self.classes, self.positions = true_class, true_position
        return self

    def predict(self, x, mask) -> Predictions:
        nearest, weights = self.knn.neighbours(x, mask)
        scores, classes, positions = [], [], []
        for row, w in zip(nearest, weights, strict=True):
            keep = self.classes[row] >= 0  # [k, K]
            scores.append(np.repeat(w, keep.sum(axis=1)))
            classes.append(self.classes[row][keep])
            positions.append(self.positions[row][keep])
        return scores, classes, positions


class EnergyPeakFloor:
    """Loudest nodes among their neighbours are vehicles, placed at their local energy centroid."""

    def __init__(self, n_nodes: int, columns_per_node: int, level_column: int, n_classes: int):
        self.n_nodes, self.columns, self.level = n_nodes, columns_per_node, level_column
        self.softmax = SoftmaxFloor(n_classes)
        self.drop_db = DROP_DB[0]

    def node_features(self, x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[W, F] -> [W, N, columns] per-node features and masks."""
        return x.reshape(len(x), self.n_nodes, self.columns), mask.reshape(len(x), self.n_nodes, self.columns)

    def fit(self, x, mask, positions, true_class, true_position) -> EnergyPeakFloor:
        """positions [W, N, d]; truth as ``KnnDetectionFloor.fit``."""
        nx, nm = self.node_features(x, mask)
        d = true_position.shape[-1]
        gap = np.linalg.norm(positions[:, :, None, :d] - np.nan_to_num(true_position, nan=1e9)[:, None], axis=-1)
        nearest = gap.argmin(axis=-1)  # [W, N] nearest vehicle of each node
        near = np.take_along_axis(gap, nearest[..., None], -1)[..., 0] <= CLASS_RADIUS_M
        cls = np.take_along_axis(true_class, nearest, axis=1)
        rows = near & nm[..., self.level] & (cls >= 0)
        if rows.any():
            self.softmax.fit(nx[rows], nm[rows], cls[rows])
        self.fitted = bool(rows.any())
        _, tune_idx = tune_split(len(x))

        def tune_map(drop: float) -> float:
            self.drop_db = drop
            pred = self.predict(x[tune_idx], mask[tune_idx], positions[tune_idx])
            return mean_map(pred, true_class[tune_idx], true_position[tune_idx])

        self.drop_db = best_on_tuning(DROP_DB, tune_map, higher_is_better=True)
        return self

    def predict(self, x, mask, positions) -> Predictions:
        nx, nm = self.node_features(x, mask)
        level = np.where(nm[..., self.level], nx[..., self.level], -np.inf)  # [W, N] dB
        d = positions.shape[-1]
        scores, classes, places = [], [], []
        for w in range(len(x)):
            pos = positions[w]
            dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
            neighbours = np.argsort(dist, axis=1)[:, 1:NEIGHBOURS + 1]
            top = level[w].max()
            peak = (level[w] >= level[w][neighbours].max(axis=1)) & (level[w] >= top - self.drop_db) & \
                np.isfinite(level[w])
            nodes = np.flatnonzero(peak)
            group = np.concatenate([nodes[:, None], neighbours[nodes]], axis=1)  # [P, 1 + NEIGHBOURS]
            lin = np.where(np.isfinite(level[w][group]), 10 ** ((level[w][group] - top) / 10), 0.0)
            places.append((lin[..., None] * pos[group, :d]).sum(1) / np.maximum(lin.sum(1, keepdims=True), 1e-12))
            scores.append(10 ** ((level[w][nodes] - top) / 10))
            classes.append(self.softmax.predict(nx[w, nodes], nm[w, nodes]) if self.fitted and len(nodes)
                           else np.zeros(len(nodes), dtype=np.int64))
        return scores, classes, places


def detect_floor_metrics(train, evaluation) -> dict[str, dict[str, float]]:
    """Both floors fitted on the WindowSet ``train`` and scored on ``evaluation``: floor ->
    {"mAP@4": ..., "mAP@6": ..., "mAP@8": ..., "mAP@10": ..., "k" or "drop_db": its setting}."""
    x_train, m_train = window_features(train)
    x_eval, m_eval = window_features(evaluation)
    dims = train.target_dims
    truth = (evaluation.target_class, evaluation.target_position[..., :dims])
    knn = KnnDetectionFloor().fit(x_train, m_train, train.target_class, train.target_position[..., :dims])
    names = sorted(train.tokens)
    level_modality = "microphone" if "microphone" in names else names[0]
    peak = EnergyPeakFloor(train.n_nodes, len(names) * (BANDS + 1), names.index(level_modality) * (BANDS + 1) + BANDS,
                           len(train.class_names))
    peak.fit(x_train, m_train, train.positions[..., :dims], train.target_class, train.target_position[..., :dims])
    out = {}
    for name, pred, setting in (("knn", knn.predict(x_eval, m_eval), {"k": knn.k}),
                                ("energy_peaks", peak.predict(x_eval, m_eval, evaluation.positions[..., :dims]),
                                 {"drop_db": peak.drop_db})):
        maps = map_at_thresholds(*pred, *truth, RADII)
        out[name] = {**{f"mAP@{r:g}": v for r, v in maps.items()}, **setting}
    return out

