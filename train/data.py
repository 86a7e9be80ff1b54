"""Datasets -> Batches: loading spar-dataset folders, splits, label subsets, batch order for DDP.

A dataset folder (written by ``spar-node dataset``) is read through the wire contract's reader
(``spar_wire.dataset_format``), so training sees exactly the tokens the aggregator assembles.
A ``WindowSet`` holds every window of a folder in memory as numpy (W windows, N nodes in site
order, per modality ``m``: n_tokens x token_dim float32 dB values); ``WindowSet.batch`` turns a
list of window indices into the ``train.batch.Batch`` every model consumes.

Batch order (``iterate_batches``) is a function of (seed, epoch) only, and DDP ranks take
contiguous slices of each global batch: 2 ranks with batch size B see exactly the windows one
process sees with batch size 2B, step by step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from spar_wire.dataset_format import FORMAT, feature_configs, load_shard, read_manifest
from spar_wire.errors import WireError
from spar_wire.feature_config import FeatureConfig
from spar_wire.placement_text import PlacementTextEncoder
from train.batch import Batch
from train.errors import TrainError

Indices = Sequence[int] | np.ndarray
_STD_FLOOR = 1e-3  # a constant modality (e.g. digital silence) must not blow up normalisation
_REQUIRED_ARRAYS = {"window_index": np.int64, "positions": np.float32, "label": np.int64,
                    "target_class": np.int64, "target_position": np.float32}


class DataError(TrainError, ValueError):
    """Bad dataset or bad data argument; a TrainError (the CLI reports it) and a ValueError."""


@dataclass
class WindowSet:
    """All windows of one dataset folder, in memory.

    tokens:          modality -> [W, N, m, D] float32 token values in dB (zeros where absent)
    present:         modality -> [W, N] bool
    positions:       [W, N, d_S] float32 node positions in metres (site frame)
    label:           [W] int64 window label (0 = none)
    target_class:    [W, K] int64, -1 in empty slots
    target_position: [W, K, d_T] float32, NaN in empty slots
    window_index:    [W] int64 index of each window in its dataset (time order)
    extras:          key -> [W] float64 scenario ground-truth extras (NaN when absent)
    """

    tokens: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    positions: np.ndarray
    label: np.ndarray
    target_class: np.ndarray
    target_position: np.ndarray
    window_index: np.ndarray
    class_names: tuple[str, ...]
    feature_configs: dict[str, FeatureConfig]
    site: dict[str, Any]  # JSON-able: id, frame, node_ids, positions, descriptions (from the manifest)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # scenario description from the manifest
    node_text: np.ndarray | None = None  # [N, E] embeddings of the nodes' descriptions (SPAR+LLM)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.tokens)

    @property
    def feature_hashes(self) -> dict[str, str]:
        return {name: cfg.hash for name, cfg in self.feature_configs.items()}

    @property
    def n_nodes(self) -> int:
        return int(self.positions.shape[1])

    @property
    def token_shapes(self) -> dict[str, tuple[int, int]]:
        """modality -> (m, D)."""
        return {name: (int(t.shape[2]), int(t.shape[3])) for name, t in self.tokens.items()}

    @property
    def position_dims(self) -> int:
        """d_S: coordinates per node position."""
        return int(self.positions.shape[2])

    @property
    def target_dims(self) -> int:
        """d_T: coordinates per target position."""
        return int(self.target_position.shape[2])

    @property
    def max_targets(self) -> int:
        """K: target slots per window."""
        return int(self.target_class.shape[1])

    @property
    def episode_windows(self) -> int | None:
        """Consecutive windows that share one episode in the source scenario, when it says so."""
        value = self.source.get("episode_windows")
        return int(value) if value else None

    def subset(self, indices: Indices) -> WindowSet:
        """The windows ``indices`` (a copy), in the given order; metadata shared."""
        idx = _as_indices(indices, len(self))
        return WindowSet(
            tokens={k: v[idx] for k, v in self.tokens.items()},
            present={k: v[idx] for k, v in self.present.items()},
            positions=self.positions[idx], label=self.label[idx], target_class=self.target_class[idx],
            target_position=self.target_position[idx], window_index=self.window_index[idx],
            class_names=self.class_names, feature_configs=self.feature_configs, site=self.site,
            extras={k: v[idx] for k, v in self.extras.items()}, source=self.source, node_text=self.node_text)

    def batch(self, indices: Indices) -> Batch:
        """The windows ``indices`` as a CPU Batch (B = len(indices)); node_index is 0..N-1 per row."""
        idx = _as_indices(indices, len(self))
        node_index = torch.arange(self.n_nodes, dtype=torch.int64).expand(len(idx), -1).contiguous()
        node_text = None
        if self.node_text is not None:
            node_text = torch.from_numpy(self.node_text).expand(len(idx), -1, -1)
        return Batch(
            tokens={k: torch.from_numpy(v[idx]) for k, v in self.tokens.items()},
            present={k: torch.from_numpy(v[idx]) for k, v in self.present.items()},
            positions=torch.from_numpy(self.positions[idx]), node_index=node_index,
            label=torch.from_numpy(self.label[idx]), target_class=torch.from_numpy(self.target_class[idx]),
            target_position=torch.from_numpy(self.target_position[idx]), node_text=node_text)


def load_windows(dataset_dir: str | Path, *, limit: int | None = None, progress: bool = True) -> WindowSet:
    """Every window of ``dataset_dir`` (the first ``limit`` when given), checked against its manifest.

    Shards are verified (sha256) and their tokens computed as the aggregator does. Raises DataError
    naming the file for a missing folder, a wrong format or a damaged shard.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1 or None, got {limit}")
    try:
        manifest = read_manifest(dataset_dir)
        configs = feature_configs(manifest)
        parts = []
        for index in tqdm(_shards_needed(manifest, limit), desc=f"load {Path(dataset_dir).name}",
                          unit="shard", disable=not progress):
            parts.append(_shard_arrays(dataset_dir, manifest, index, configs))
    except WireError as exc:
        raise DataError(f"cannot load {FORMAT} {dataset_dir}: {exc.detail}") from exc
    if not parts:
        raise DataError(f"{dataset_dir}: the dataset has no shards")
    return _window_set(_merge(parts, limit), manifest, configs)


# --------------------------------------------------------------------------- splits
def temporal_split(n: int, val_fraction: float = 0.25, *, align: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) window indices: the first windows train, the last ``val_fraction`` validate.

    Windows come in episodes of consecutive windows, so a random split would put windows of one
    episode on both sides; a temporal cut leaks at most the one episode it crosses. ``align``
    (e.g. ``WindowSet.episode_windows``) moves the cut down to a multiple of it, so no episode
    straddles it at all. At least one window goes to each side when ``0 < val_fraction`` and n >= 2.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n < 0 or align < 1:
        raise DataError(f"need n >= 0 and align >= 1, got n={n}, align={align}")
    n_val = 0
    if val_fraction > 0:
        if n < 2:
            raise DataError(f"cannot split {n} window(s) into train and validation")
        n_val = min(max(1, int(np.floor(n * val_fraction + 0.5))), n - 1)
    cut = n - n_val
    aligned = (cut // align) * align
    if n_val and 0 < aligned:  # never align the training set away entirely
        cut = aligned
    return np.arange(cut, dtype=np.int64), np.arange(cut, n, dtype=np.int64)


def label_subset(train_idx: Indices, labels: Indices, ratio: float, seed: int) -> np.ndarray:
    """A seeded, class-stratified subset of ``train_idx`` (sorted), for label-ratio fine-tuning.

    ``labels[i]`` is the class of window ``train_idx[i]`` (same length). Each class keeps
    round-half-up(ratio * count) windows, at least 1 when it has any. Same seed, same subset.
    """
    if not 0.0 < ratio <= 1.0:
        raise DataError(f"label ratio must be in (0, 1], got {ratio}")
    train_idx, labels = np.asarray(train_idx, np.int64), np.asarray(labels)
    if train_idx.shape != labels.shape or train_idx.ndim != 1:
        raise DataError(f"train_idx {train_idx.shape} and labels {labels.shape} must be 1-D of one length")
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):  # sorted: the draw order, hence the subset, depends on the seed only
        members = train_idx[labels == cls]
        keep = max(1, int(np.floor(ratio * len(members) + 0.5)))
        chosen.append(rng.choice(members, size=keep, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


# --------------------------------------------------------------------------- statistics
def token_statistics(window_set: WindowSet, chunk: int = 256) -> dict[str, tuple[float, float]]:
    """modality -> (mean, std) of token values over present nodes only (std floored at 1e-3).

    Absent nodes are excluded whatever their tokens hold (zeros would drag the mean towards
    0 dB). Accumulated in float64 over chunks of windows to keep memory flat.
    """
    stats = {}
    for name, tokens in window_set.tokens.items():
        total = total_sq = count = 0.0
        for start in range(0, len(window_set), chunk):
            values = tokens[start:start + chunk][window_set.present[name][start:start + chunk]].astype(np.float64)
            total += values.sum()
            total_sq += np.square(values).sum()
            count += values.size
        if count == 0:
            raise DataError(f"modality {name}: no present node in any window; cannot compute statistics")
        mean = total / count
        std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))
        stats[name] = (float(mean), max(std, _STD_FLOOR))
    return stats


# --------------------------------------------------------------------------- batch order
def iterate_batches(indices: Indices, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
                    drop_last: bool, rank: int = 0, world_size: int = 1) -> Iterator[np.ndarray]:
    """Yield this rank's window indices, batch by batch.

    Contract (what makes DDP reproduce a single process):
      * the GLOBAL order is ``indices`` permuted by (seed, epoch) when ``shuffle``, else as given;
        it does not depend on rank or world_size;
      * it is cut into global batches of ``batch_size * world_size``; with ``drop_last`` a short
        last global batch is dropped, else it is kept;
      * rank r gets the r-th contiguous piece of each global batch (``np.array_split`` into
        world_size pieces: exactly ``batch_size`` each for full batches). So the union of the rank
        slices, in rank order, is the global batch one process with batch size
        ``batch_size * world_size`` would see.
      * every rank yields the same number of batches (a collective must not hang); in a short last
        global batch a rank's piece may be smaller, even empty when it holds fewer than world_size.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need batch_size >= 1, world_size >= 1, 0 <= rank < world_size; "
                        f"got {batch_size}, {world_size}, {rank}")
    order = np.asarray(indices, np.int64)
    if shuffle:
        order = order[np.random.default_rng([seed, epoch]).permutation(len(order))]
    global_size = batch_size * world_size
    for start in range(0, len(order), global_size):
        chunk = order[start:start + global_size]
        if drop_last and len(chunk) < global_size:
            return
        yield np.array_split(chunk, world_size)[rank]


def steps_per_epoch(n: int, batch_size: int, *, drop_last: bool, world_size: int = 1) -> int:
    """How many batches ``iterate_batches`` yields per rank for ``n`` indices."""
    global_size = batch_size * world_size
    return n // global_size if drop_last else -(-n // global_size)


# --------------------------------------------------------------------------- robustness
def drop_nodes(batch: Batch, rate: float, generator: torch.Generator, *, per_modality: bool = False) -> Batch:
    """A copy of ``batch`` where messages are lost independently with probability ``rate``.

    Default: a node loses all its modalities of a window at once (a node or its link went down);
    ``per_modality``: each (node, modality) token message is lost on its own, as on the wire.
    Lost messages get present False and zero tokens, as the aggregator would assemble them.
    """
    if not 0.0 <= rate <= 1.0:
        raise DataError(f"drop rate must be in [0, 1], got {rate}")
    shape = batch.positions.shape[:2]

    def draw() -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=generator.device) < rate

    shared = None if per_modality else draw()
    tokens, present = {}, {}
    for name in batch.modalities:  # fixed order: same generator state, same losses
        lost = (draw() if per_modality else shared).to(batch.present[name].device)
        present[name] = batch.present[name] & ~lost
        tokens[name] = batch.tokens[name] * present[name][:, :, None, None].to(batch.tokens[name].dtype)
    return dataclasses.replace(batch, tokens=tokens, present=present)


# --------------------------------------------------------------------------- internals
def _as_indices(indices: Indices, n: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise DataError(f"window index out of range for {n} windows: {idx.min()}..{idx.max()}")
    return idx


def _shards_needed(manifest: dict[str, Any], limit: int | None) -> list[int]:
    needed, windows = [], 0
    for index, entry in enumerate(manifest["shards"]):
        if limit is not None and windows >= limit:
            break
        needed.append(index)
        windows += int(entry.get("windows", 0))
    return needed


def _shard_arrays(dataset_dir: str | Path, manifest: dict[str, Any], index: int,
                  configs: dict[str, FeatureConfig]) -> dict[str, np.ndarray]:
    shard = load_shard(dataset_dir, index, manifest)
    arrays = shard.arrays
    expected = manifest["shards"][index].get("windows")
    if expected is not None and len(shard) != expected:
        raise WireError("bad_dataset", f"shard {index} holds {len(shard)} windows, manifest says {expected}")
    missing = [key for key in _REQUIRED_ARRAYS if key not in arrays]
    if missing:
        raise WireError("bad_dataset", f"shard {index} lacks array(s) {', '.join(missing)}")
    out = {key: arrays[key].astype(dtype) for key, dtype in _REQUIRED_ARRAYS.items()}
    for name in configs:
        out[f"tokens/{name}"] = shard.tokens(name)
        out[f"present/{name}"] = arrays[f"present/{name}"].astype(bool)
    out.update({key: arrays[key].astype(np.float64) for key in arrays if key.startswith("extra/")})
    return out


def _merge(parts: list[dict[str, np.ndarray]], limit: int | None) -> dict[str, np.ndarray]:
    """Concatenate shard arrays; an extra only some shards record is NaN in the others."""
    keys = dict.fromkeys(key for part in parts for key in part)  # ordered union
    merged = {}
    for key in keys:
        if not key.startswith("extra/") and any(key not in part for part in parts):
            raise DataError(f"array {key} is missing from some shards")
        merged[key] = np.concatenate([part.get(key, np.full(len(part["label"]), np.nan)) for part in parts])[:limit]
    return merged


def _window_set(merged: dict[str, np.ndarray], manifest: dict[str, Any],
                configs: dict[str, FeatureConfig]) -> WindowSet:
    def group(prefix: str) -> dict[str, np.ndarray]:
        return {key[len(prefix):]: value for key, value in merged.items() if key.startswith(prefix)}

    return WindowSet(
        tokens=group("tokens/"), present=group("present/"), positions=merged["positions"], label=merged["label"],
        target_class=merged["target_class"], target_position=merged["target_position"],
        window_index=merged["window_index"], class_names=tuple(manifest["class_names"]),
        feature_configs=configs, site=dict(manifest["site"]), extras=group("extra/"),
        source=dict(manifest.get("source") or {}), node_text=description_embeddings(manifest["site"]))


@functools.cache
def _text_encoder() -> PlacementTextEncoder:
    return PlacementTextEncoder()  # one per process: its memory cache spans datasets


def description_embeddings(site: dict[str, Any]) -> np.ndarray | None:
    """[N, E] embeddings of the site's node descriptions (SPAR+LLM inputs), or None when the
    manifest has no descriptions or the text encoder is not installed (only SPAR+LLM needs them,
    and it says so when they are missing)."""
    descriptions = site.get("descriptions")
    if not descriptions:
        return None
    try:
        return _text_encoder().embed(list(descriptions))
    except WireError:
        return None
