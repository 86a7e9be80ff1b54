"""Physics floors for earthquake location, computed from the very tokens a model sees.

A seismologist with a ruler and a velocity model would locate a local event like this:

* ``pick_p_onsets``: a P onset per station from an STA/LTA trigger on the spectrogram energy
  envelope (the tokens' dB summed over frequency and components, one value per 0.64 s STFT frame);
  an absent trace or one that never triggers has no pick;
* ``GridSearchLocator``: the hypocentre on a grid (coarse, then fine around the best node) whose
  straight-ray P travel times at the known P velocity best explain the picks with an unknown
  origin time (L1 misfit, so one bad pick does not drag the answer); fewer than four picks fall
  back to the first-arrival station;
* ``first_arrival_station``: the epicentre is the station that triggered first, the depth the
  training windows' mean depth.

The trigger threshold is the floors' one hyperparameter, chosen on the training windows like the
other floors' (``train.floors``); the P velocity is the regional model's (``vp_m_s`` of the
dataset's source), which a network operator knows. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spar_wire.features import unpatchify

STA_LTA_THRESHOLDS = (2.0, 3.0, 5.0, 8.0, 13.0)  # energy ratio of one frame to the frames before it
LTA_FRAMES = 4  # long-term average: the frames before the tested one (2.56 s at a 0.64 s hop)
MIN_PICKS = 4  # x, y, depth and the origin time
COARSE_STEP_M, FINE_STEP_M = 2000.0, 250.0
DEPTH_RANGE_M = (0.0, 30000.0)
MARGIN = 0.15  # the grid covers the station bounding box grown by this fraction on every side


def energy_envelopes(tokens: np.ndarray, present: np.ndarray, cfg) -> np.ndarray:
    """Linear energy per STFT frame.

    Args:
        tokens: [W, N, m, D] dB token values; present: [W, N] bool; cfg: the modality's FeatureConfig.
    Returns:
        [W, N, T] energy (sum over frequency and components of 10 ** (dB / 10)); NaN where absent.
    """
    w, n = tokens.shape[:2]
    flat = tokens.reshape(w * n, *tokens.shape[2:])
    parts = []
    for start in range(0, len(flat), 1024):  # bounded memory: a test recording is ~30k station images
        images = np.stack([unpatchify(t, cfg) for t in flat[start:start + 1024]]).astype(np.float64)  # [B, C*F, T]
        # Relative to each image's maximum: the quantised dB scale is per window, only ratios matter.
        parts.append((10.0 ** ((images - images.max(axis=(1, 2), keepdims=True)) / 10.0)).sum(axis=1))
    env = (np.concatenate(parts) if parts else np.zeros((0, cfg.patch_grid[1] * cfg.patch_time))).reshape(w, n, -1)
    return np.where(present[:, :, None], env, np.nan)


def pick_p_onsets(envelopes: np.ndarray, threshold: float, frame_s: float) -> np.ndarray:
    """[W, N, T] energy -> [W, N] onset time in seconds from the window start (NaN: no pick).

    The onset is the first frame whose energy exceeds ``threshold`` times the mean of the
    ``LTA_FRAMES`` frames before it.
    """
    t = envelopes.shape[-1]
    csum = np.concatenate([np.zeros(envelopes.shape[:-1] + (1,)), np.nancumsum(envelopes, axis=-1)], axis=-1)
    k = np.arange(1, t)
    lo = np.maximum(k - LTA_FRAMES, 0)
    lta = (csum[..., k] - csum[..., lo]) / (k - lo)
    ratio = envelopes[..., 1:] / np.maximum(lta, 1e-30)
    hit = ratio > threshold
    first = np.where(hit.any(axis=-1), hit.argmax(axis=-1) + 1, -1)
    onset = first * frame_s
    return np.where((first >= 0) & np.isfinite(envelopes[..., 0]), onset, np.nan)


@dataclass
class GridSearchLocator:
    """Straight-ray P travel times in a homogeneous half-space, the scenario's own physics."""

    stations: np.ndarray  # [N, 3] x, y, elevation (m)
    vp_m_s: float

    def __post_init__(self) -> None:
        self.stations = np.asarray(self.stations, dtype=np.float64)
        lo, hi = self.stations[:, :2].min(axis=0), self.stations[:, :2].max(axis=0)
        pad = (hi - lo) * MARGIN
        self.bounds = (lo - pad, hi + pad)
        axes = [np.arange(self.bounds[0][i], self.bounds[1][i] + 1.0, COARSE_STEP_M) for i in range(2)]
        axes.append(np.arange(DEPTH_RANGE_M[0], DEPTH_RANGE_M[1] + 1.0, COARSE_STEP_M))
        self.coarse = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
        self.coarse_times = self.travel_times(self.coarse)
        offsets = np.arange(-COARSE_STEP_M, COARSE_STEP_M + 1.0, FINE_STEP_M)
        self.fine_offsets = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), -1).reshape(-1, 3)

    def travel_times(self, hypocentres: np.ndarray) -> np.ndarray:
        """[H, 3] (x, y, depth below z = 0) -> [H, N] P travel time (s) to every station."""
        dx = hypocentres[:, None, :2] - self.stations[None, :, :2]
        dz = hypocentres[:, None, 2] + self.stations[None, :, 2]  # depth below datum + station elevation
        return np.sqrt((dx ** 2).sum(-1) + dz ** 2) / self.vp_m_s

    @staticmethod
    def misfit(times: np.ndarray, picks: np.ndarray) -> np.ndarray:
        """[H, S] predicted times, [S] picks -> [H] L1 misfit with the best (median) origin time."""
        residual = picks[None, :] - times
        return np.abs(residual - np.median(residual, axis=1, keepdims=True)).sum(axis=1)

    def locate(self, picks: np.ndarray) -> np.ndarray:
        """[N] onset times (NaN: no pick) -> [3] hypocentre (x, y, depth); NaN when too few picks."""
        used = np.isfinite(picks)
        if used.sum() < MIN_PICKS:
            return np.full(3, np.nan)
        best = self.coarse[np.argmin(self.misfit(self.coarse_times[:, used], picks[used]))]
        fine = best[None, :] + self.fine_offsets
        fine[:, 2] = np.clip(fine[:, 2], *DEPTH_RANGE_M)
        return fine[np.argmin(self.misfit(self.travel_times(fine)[:, used], picks[used]))]


def first_arrival_station(picks: np.ndarray, stations: np.ndarray, depth_m: float) -> np.ndarray:
    """[W, N] picks, [N, 3] stations -> [W, 3]: the earliest station's (x, y) and ``depth_m``;
    NaN rows where nothing was picked."""
    out = np.full((len(picks), 3), np.nan)
    any_pick = np.isfinite(picks).any(axis=1)
    first = np.nanargmin(np.where(any_pick[:, None], picks, 0.0), axis=1)
    out[any_pick, :2] = stations[first[any_pick], :2]
    out[any_pick, 2] = depth_m
    return out


class QuakeFloors:
    """Fit the trigger threshold on training windows, then locate evaluation windows."""

    def __init__(self, stations: np.ndarray, vp_m_s: float, frame_s: float):
        self.locator = GridSearchLocator(stations, vp_m_s)
        self.stations = self.locator.stations
        self.frame_s = frame_s
        self.threshold = STA_LTA_THRESHOLDS[0]
        self.mean_target = np.zeros(3)

    def fit(self, envelopes: np.ndarray, targets: np.ndarray, tune_windows: int = 300) -> QuakeFloors:
        """envelopes [W, N, T]; targets [W, 3] (x, y, depth). The threshold with the lowest mean
        hypocentre error on (up to) ``tune_windows`` training windows wins."""
        self.mean_target = targets.mean(axis=0)
        rows = np.linspace(0, len(targets) - 1, min(tune_windows, len(targets))).astype(int)
        errors = []
        for threshold in STA_LTA_THRESHOLDS:
            self.threshold = threshold
            guess = self.grid_search(envelopes[rows])
            errors.append(float(np.mean(np.linalg.norm(guess - targets[rows], axis=1))))
        self.threshold = STA_LTA_THRESHOLDS[int(np.argmin(errors))]
        return self

    def picks(self, envelopes: np.ndarray) -> np.ndarray:
        return pick_p_onsets(envelopes, self.threshold, self.frame_s)

    def _fallback(self, guess: np.ndarray, picks: np.ndarray) -> np.ndarray:
        """Rows without an answer take the first-arrival station, then the training mean."""
        first = first_arrival_station(picks, self.stations, float(self.mean_target[2]))
        guess = np.where(np.isnan(guess), first, guess)
        return np.where(np.isnan(guess), self.mean_target[None, :], guess)

    def grid_search(self, envelopes: np.ndarray) -> np.ndarray:
        """[W, N, T] -> [W, 3] hypocentres."""
        picks = self.picks(envelopes)
        return self._fallback(np.stack([self.locator.locate(p) for p in picks]), picks)

    def first_arrival(self, envelopes: np.ndarray) -> np.ndarray:
        """[W, N, T] -> [W, 3] first-arrival station epicentres at the training mean depth."""
        picks = self.picks(envelopes)
        return self._fallback(first_arrival_station(picks, self.stations, float(self.mean_target[2])), picks)


def quake_floor_metrics(train, evaluation) -> dict[str, dict[str, float]]:
    """Fit the quake floors on the WindowSet ``train``, score them on ``evaluation``.

    Returns floor name -> ``train.metrics.hypocentre_errors``: "grid_search" (STA/LTA picks +
    travel-time grid search), "first_arrival" (the earliest station), "knn" (band features, as in
    ``train.floors``) and "mean_position" (the training targets' mean).
    """
    from train.floors import KnnFloor, window_features
    from train.metrics import summarize

    (name,) = train.tokens  # one seismometer modality
    cfg = train.feature_configs[name]
    frame_s = cfg.hop / cfg.sample_rate_hz
    keep = np.isfinite(train.target_position[:, 0]).all(axis=-1)
    targets = train.target_position[keep, 0, :3].astype(np.float64)
    stations = np.asarray(train.site["positions"], dtype=np.float64)
    floors = QuakeFloors(stations, float(train.source["vp_m_s"]), frame_s)
    floors.fit(energy_envelopes(train.tokens[name][keep], train.present[name][keep], cfg), targets)
    env_eval = energy_envelopes(evaluation.tokens[name], evaluation.present[name], cfg)
    truth = {"target_position": evaluation.target_position}
    x_train, m_train = window_features(train)
    x_eval, m_eval = window_features(evaluation)
    guesses = {"grid_search": floors.grid_search(env_eval), "first_arrival": floors.first_arrival(env_eval),
               "knn": KnnFloor().fit(x_train[keep], m_train[keep], targets).predict(x_eval, m_eval),
               "mean_position": np.broadcast_to(targets.mean(axis=0), (len(evaluation), 3))}
    out = {floor: summarize("quake", {"position": guess}, truth) for floor, guess in guesses.items()}
    out["grid_search"]["sta_lta_threshold"] = floors.threshold
    return out
