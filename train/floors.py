"""Simple floors every learned model is measured against, on the same windows.

A learned model that scores below one of these is a bug to find, not a result to report:

* ``band_features``: per node and modality, the mean dB in ``BANDS`` equal frequency bands of the
  token image plus the overall level (8 nodes x 2 modalities x 9 = 144 numbers in the parking lot);
* ``SoftmaxFloor``: multinomial logistic regression on those features (classification);
* ``KnnFloor``: k-nearest-neighbour regression on the same features (localization);
* ``CentroidFloor``: the energy-weighted centroid of the node positions, a physics estimate that
  needs no training beyond one exponent.

Every floor picks its one hyperparameter on the last fifth of its training windows (temporal, as
the benchmark's own split), then refits on all of them, so a floor is as strong as a one-screen
baseline can reasonably be. numpy and scipy only: no torch, no randomness.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from scipy.optimize import minimize

from spar_wire.feature_config import FeatureConfig
from spar_wire.features import unpatchify

BANDS = 8  # frequency bands per modality (plus the overall level)
SOFTMAX_L2 = (1e-4, 1e-3, 1e-2, 1e-1)  # candidates for the softmax floor's L2 weight
KNN_K = (1, 3, 5, 10, 20)
T = TypeVar("T")
CENTROID_POWER = (0.25, 0.5, 1.0, 2.0)  # weight = linear energy ** power
TUNE_FRACTION = 0.2


def band_features(tokens: dict[str, np.ndarray], present: dict[str, np.ndarray],
                  configs: dict[str, FeatureConfig], bands: int = BANDS) -> tuple[np.ndarray, np.ndarray]:
    """Hand features of every window.

    Args:
        tokens: modality -> [W, N, m, D] dB; present: modality -> [W, N] bool;
        configs: modality -> the FeatureConfig that made the tokens (for the token grid).
    Returns:
        features [W, N * K * (bands + 1)] float64 (K modalities, node-major), and a mask of the
        same shape that is False where the node's message was absent.
    """
    feats, masks = [], []
    for name in sorted(tokens):
        cfg = configs[name]
        toks = tokens[name]
        w, n = toks.shape[:2]
        images = np.stack([unpatchify(t, cfg) for t in toks.reshape(w * n, *toks.shape[2:])])  # [W*N, C*F, T]
        rows = np.array_split(np.arange(images.shape[1]), bands)
        per_band = np.stack([images[:, r, :].mean(axis=(1, 2)) for r in rows], axis=-1)  # [W*N, bands]
        overall = images.mean(axis=(1, 2))[:, None]
        f = np.concatenate([per_band, overall], axis=-1).reshape(w, n, bands + 1)
        feats.append(f)
        masks.append(np.broadcast_to(present[name][:, :, None], f.shape))
    features = np.concatenate(feats, axis=-1).reshape(len(feats[0]), -1).astype(np.float64)
    mask = np.concatenate(masks, axis=-1).reshape(features.shape)
    return features, mask


@dataclass
class Standardizer:
    """Zero mean, unit variance per feature over present values; absent values become 0 (the mean)."""

    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    std: np.ndarray = field(default_factory=lambda: np.ones(0))

    def fit(self, x: np.ndarray, mask: np.ndarray) -> Standardizer:
        count = np.maximum(mask.sum(axis=0), 1)
        self.mean = np.where(mask, x, 0.0).sum(axis=0) / count
        var = np.where(mask, (x - self.mean) ** 2, 0.0).sum(axis=0) / count
        self.std = np.sqrt(np.maximum(var, 1e-12))
        return self

    def __call__(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.where(mask, (x - self.mean) / self.std, 0.0)


def tune_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, tune) of ``n`` windows in recording order: the last ``TUNE_FRACTION`` tunes the
    floors' hyper-parameters, so every floor (classification and detection) is tuned the same way."""
    cut = max(1, int(round(n * (1.0 - TUNE_FRACTION))))
    return np.arange(cut), np.arange(cut, n)


def best_on_tuning(candidates: Iterable[T], score_of: Callable[[T], float], higher_is_better: bool) -> T | None:
    """The candidate whose tuning score is best (the first of equals); None when there is none.

    ``score_of(candidate)`` fits on the fit split and scores on the tune split (see ``tune_split``):
    every floor picks its hyper-parameter this one way."""
    best: tuple[float, T] | None = None
    for candidate in candidates:
        score = score_of(candidate)
        if best is None or (score > best[0] if higher_is_better else score < best[0]):
            best = (score, candidate)
    return None if best is None else best[1]


class SoftmaxFloor:
    """Multinomial logistic regression (L2, L-BFGS) on standardised band features."""

    def __init__(self, n_classes: int):
        self.n_classes = n_classes
        self.scaler = Standardizer()
        self.l2 = 0.0
        self.weights = np.zeros(0)

    def fit(self, x: np.ndarray, mask: np.ndarray, labels: np.ndarray) -> SoftmaxFloor:
        """x, mask [W, F]; labels [W] class ids in [0, n_classes)."""
        fit_idx, tune_idx = tune_split(len(x))

        def accuracy(l2: float) -> float:
            self._fit(x[fit_idx], mask[fit_idx], labels[fit_idx], l2)
            return float(np.mean(self.predict(x[tune_idx], mask[tune_idx]) == labels[tune_idx]))

        return self._fit(x, mask, labels, best_on_tuning(SOFTMAX_L2, accuracy, higher_is_better=True))

    def _fit(self, x, mask, labels, l2: float) -> SoftmaxFloor:
        self.l2 = l2
        z = self.scaler.fit(x, mask)(x, mask)
        z = np.concatenate([z, np.ones((len(z), 1))], axis=1)  # bias column (not regularised)
        onehot = np.eye(self.n_classes)[labels]
        shape = (z.shape[1], self.n_classes)

        def loss_and_grad(flat: np.ndarray) -> tuple[float, np.ndarray]:
            w = flat.reshape(shape)
            logits = z @ w
            logits -= logits.max(axis=1, keepdims=True)
            log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            reg = w[:-1]
            loss = -(onehot * log_p).sum() / len(z) + 0.5 * l2 * (reg ** 2).sum()
            grad = z.T @ (np.exp(log_p) - onehot) / len(z)
            grad[:-1] += l2 * reg
            return loss, grad.ravel()

        result = minimize(loss_and_grad, np.zeros(np.prod(shape)), jac=True, method="L-BFGS-B",
                          options={"maxiter": 500})
        self.weights = result.x.reshape(shape)
        return self

    def predict_proba(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """[W, F] -> [W, C] class probabilities."""
        z = np.concatenate([self.scaler(x, mask), np.ones((len(x), 1))], axis=1)
        logits = z @ self.weights
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.predict_proba(x, mask).argmax(axis=1)


class KnnFloor:
    """k-nearest-neighbour regression (inverse-distance weights) on standardised band features."""

    def __init__(self):
        self.scaler = Standardizer()
        self.k = 1
        self.train_z = np.zeros((0, 0))
        self.train_y = np.zeros((0, 0))

    def fit(self, x: np.ndarray, mask: np.ndarray, targets: np.ndarray) -> KnnFloor:
        """x, mask [W, F]; targets [W, d] (metres, finite)."""
        fit_idx, tune_idx = tune_split(len(x))

        def error_m(k: int) -> float:
            self.k = k
            self._fit(x[fit_idx], mask[fit_idx], targets[fit_idx])
            return float(np.mean(np.linalg.norm(self.predict(x[tune_idx], mask[tune_idx]) - targets[tune_idx], axis=1)))

        self.k = best_on_tuning((k for k in KNN_K if k <= len(fit_idx)), error_m, higher_is_better=False) or 1
        return self._fit(x, mask, targets)

    def _fit(self, x, mask, targets) -> KnnFloor:
        self.train_z = self.scaler.fit(x, mask)(x, mask)
        self.train_y = np.asarray(targets, dtype=np.float64)
        return self

    def neighbours(self, x: np.ndarray, mask: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """[W, F] -> (indices [W, k] of the k nearest training windows, their inverse-distance weights [W, k])."""
        z = self.scaler(x, mask)
        k = min(self.k, len(self.train_z))
        idx, weights = [np.zeros((0, k), np.int64)], [np.zeros((0, k))]
        for start in range(0, len(z), chunk):
            q = z[start:start + chunk]
            d2 = (q ** 2).sum(1)[:, None] - 2 * q @ self.train_z.T + (self.train_z ** 2).sum(1)[None, :]
            nearest = np.argpartition(d2, k - 1, axis=1)[:, :k]
            idx.append(nearest)
            weights.append(1.0 / (np.sqrt(np.maximum(np.take_along_axis(d2, nearest, axis=1), 0.0)) + 1e-6))
        return np.concatenate(idx), np.concatenate(weights)

    def predict(self, x: np.ndarray, mask: np.ndarray, chunk: int = 512) -> np.ndarray:
        """[W, F] -> [W, d] positions."""
        nearest, w = self.neighbours(x, mask, chunk)
        return (self.train_y[nearest] * w[..., None]).sum(1) / np.maximum(w.sum(1, keepdims=True), 1e-12)


class CentroidFloor:
    """Centroid of the node positions weighted by each node's linear energy ** power.

    The energy is the node's overall level (dB -> power) in ``modality``; absent nodes weigh 0.
    """

    def __init__(self, level_column: int, columns_per_node: int):
        self.level_column = level_column  # column of the overall level inside one node's block
        self.columns_per_node = columns_per_node
        self.power = 1.0

    def fit(self, x: np.ndarray, mask: np.ndarray, positions: np.ndarray, targets: np.ndarray) -> CentroidFloor:
        """x, mask [W, F] band features; positions [W, N, d] node positions; targets [W, d]."""
        best = None
        for power in CENTROID_POWER:
            self.power = power
            err = float(np.mean(np.linalg.norm(self.predict(x, mask, positions) - targets[:, :positions.shape[-1]],
                                               axis=1)))
            if best is None or err < best[0]:
                best = (err, power)
        self.power = best[1]
        return self

    def predict(self, x: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        n = positions.shape[1]
        cols = np.arange(n) * self.columns_per_node + self.level_column
        level_db = x[:, cols]
        present = mask[:, cols]
        rel = np.where(present, level_db - np.where(present, level_db, -np.inf).max(axis=1, keepdims=True), -np.inf)
        weights = np.where(present, 10.0 ** (rel * self.power / 10.0), 0.0)
        weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
        return (weights[..., None] * positions).sum(axis=1)


def window_features(windows) -> tuple[np.ndarray, np.ndarray]:
    """``band_features`` of a ``train.data.WindowSet``."""
    return band_features(windows.tokens, windows.present, windows.feature_configs)


def centroid_floor(windows) -> CentroidFloor:
    """A CentroidFloor reading the overall level of the site's loudest-resolving modality: the
    first of microphone / the first modality in sorted order (the band_features column layout)."""
    names = sorted(windows.tokens)
    name = "microphone" if "microphone" in names else names[0]
    return CentroidFloor(level_column=names.index(name) * (BANDS + 1) + BANDS,
                         columns_per_node=len(names) * (BANDS + 1))


def _has_target(windows) -> np.ndarray:
    return np.isfinite(windows.target_position[:, 0]).all(axis=-1)


def floor_metrics(train, evaluation) -> dict[str, dict[str, float]]:
    """Fit every floor on the WindowSet ``train`` and score it on the WindowSet ``evaluation``.

    Returns floor name -> metrics of ``train.metrics.summarize``: "softmax" (classify, when the
    windows have two or more classes), "knn" and "centroid" (localize, when they have targets),
    plus "mean_position" (the training targets' mean, the guess that knows nothing).
    """
    from train.metrics import summarize

    x_train, m_train = window_features(train)
    x_eval, m_eval = window_features(evaluation)
    truth = {"label": evaluation.label, "target_class": evaluation.target_class,
             "target_position": evaluation.target_position}
    out: dict[str, dict[str, float]] = {}
    if len(train.class_names) > 1:
        softmax = SoftmaxFloor(len(train.class_names)).fit(x_train, m_train, train.label)
        out["softmax"] = summarize("classify", {"label": softmax.predict(x_eval, m_eval)}, truth)
    keep = _has_target(train)
    if keep.any() and _has_target(evaluation).any():
        dims = train.target_dims
        targets = train.target_position[keep, 0, :dims].astype(np.float64)
        knn = KnnFloor().fit(x_train[keep], m_train[keep], targets)
        out["knn"] = summarize("localize", {"position": knn.predict(x_eval, m_eval)}, truth)
        centroid = centroid_floor(train).fit(x_train[keep], m_train[keep], train.positions[keep], targets)
        guess = centroid.predict(x_eval, m_eval, evaluation.positions)
        if guess.shape[1] < dims:  # a 2-D layout under 3-D targets: the centroid knows no depth
            guess = np.concatenate([guess, np.full((len(guess), dims - guess.shape[1]), targets[:, -1].mean())], 1)
        out["centroid"] = summarize("localize", {"position": guess[:, :dims]}, truth)
        mean = np.broadcast_to(targets.mean(axis=0), (len(evaluation), dims))
        out["mean_position"] = summarize("localize", {"position": mean}, truth)
    return out
