"""Dataset export: windows from a source, through the firmware's own encoding, into npz shards.

Every window goes through exactly what a live node does (features -> quantization -> codec ->
framing) and back through the aggregator's decoder, so training sees what the aggregator will
see. A shard ``shard-00000.npz`` holds ``shard_size`` consecutive windows; ``dataset.json``
describes the lot (feature hashes, seed, scenario, shapes, class names, sha256 per shard).

The arrays of a shard are listed in ``spar_wire.dataset_format`` (the format is part of the contract).

Generation is deterministic for a seed: window i is source.window(i), whichever worker makes it.
The reader (``Shard``, ``load_shard``, ``read_manifest``, format constants) is the wire contract's
``spar_wire.dataset_format``, re-exported here; ``load_shard`` / ``read_manifest`` here raise NodeError.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from node_firmware_sim.errors import NodeError
from node_firmware_sim.firmware import FirmwareConfig, NodeFirmware
from node_firmware_sim.scenarios import make_scenario
from node_firmware_sim.scenarios.base import SourceWindow
from spar_wire import dataset_format
from spar_wire.codecs import CodecSpec
from spar_wire.dataset_format import FORMAT, FORMAT_VERSION, MANIFEST, Shard
from spar_wire.errors import WireError
from spar_wire.message import decode_message
from spar_wire.site_layout import SiteLayout, load_site_layout

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "DatasetSpec", "ExportReport", "Shard", "encode_windows",
           "export_dataset", "load_shard", "read_manifest"]


@dataclass(frozen=True)
class DatasetSpec:
    site: str  # path of the site layout TOML (workers reload it)
    scenario: str
    windows: int
    seed: int = 0
    codec: str = "png"  # png: lossless after uint8 quantization; jpeg:Q / webp:Q: codec loss included
    shard_size: int = 1000
    max_targets: int = 4
    params: dict[str, Any] = field(default_factory=dict)  # scenario parameters

    def __post_init__(self) -> None:
        if self.windows < 1 or self.shard_size < 1 or self.max_targets < 0:
            raise NodeError("windows and shard_size must be >= 1, max_targets >= 0")
        CodecSpec.parse(self.codec)


@dataclass
class ExportReport:
    out: Path
    windows: int
    shards: int
    bytes: int
    elapsed_s: float

    @property
    def windows_per_s(self) -> float:
        return self.windows / max(self.elapsed_s, 1e-9)


def export_dataset(spec: DatasetSpec, out: str | Path, *, workers: int = 2, overwrite: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> ExportReport:
    """Write the shards and the manifest under ``out``; ``progress(windows_done, total)``."""
    out = Path(out)
    layout = load_site_layout(spec.site)
    source = make_scenario(spec.scenario, layout, spec.seed, **spec.params)  # fail early on bad input
    if (out / MANIFEST).exists() and not overwrite:
        raise NodeError(f"{out} already holds a dataset; pass overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    shard_ranges = [(i, min(i + spec.shard_size, spec.windows))
                    for i in range(0, spec.windows, spec.shard_size)]
    jobs = [(spec, str(out), n, first, stop) for n, (first, stop) in enumerate(shard_ranges)]
    started = time.monotonic()
    shards, done = [], 0
    if workers <= 1 or len(jobs) == 1:
        results = map(_write_shard_job, jobs)
        pool = None
    else:
        with _single_threaded_children():
            pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)))
        results = pool.imap(_write_shard_job, jobs)
    try:
        for info in results:
            shards.append(info)
            done += info["windows"]
            if progress:
                progress(done, spec.windows)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    elapsed = time.monotonic() - started
    manifest = _manifest(spec, layout, source.describe(), source.class_names, shards, elapsed)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return ExportReport(out, spec.windows, len(shards), sum(s["bytes"] for s in shards), elapsed)


def encode_windows(layout: SiteLayout, windows: list[SourceWindow], codec: CodecSpec,
                   max_targets: int) -> dict[str, np.ndarray]:
    """Shard arrays (see the module docstring) for ``windows``, via the firmware and decoder."""
    firmwares = {n.id: NodeFirmware(layout, n.id, FirmwareConfig(codec=codec)) for n in layout.nodes}
    n_win, n_nodes = len(windows), len(layout.nodes)
    arrays: dict[str, np.ndarray] = {
        "window_index": np.array([w.index for w in windows], dtype=np.int64),
        "positions": np.broadcast_to(layout.positions().astype(np.float32),
                                     (n_win, n_nodes, layout.position_dim)).copy(),
    }
    for name, spec in layout.modalities.items():
        dtype = np.uint8 if codec.info.quantized else np.float32
        arrays[f"image/{name}"] = np.zeros((n_win, n_nodes, *spec.features.image_shape), dtype)
        arrays[f"scale/{name}"] = np.ones((n_win, n_nodes), np.float32)
        arrays[f"offset/{name}"] = np.zeros((n_win, n_nodes), np.float32)
        arrays[f"present/{name}"] = np.zeros((n_win, n_nodes), bool)
    for w, window in enumerate(windows):
        for j, node in enumerate(layout.nodes):
            for name in node.modalities:
                samples = window.signals.get((node.id, name))
                if samples is None:
                    continue
                encoded = firmwares[node.id].encode(name, samples, 0)
                message = decode_message(encoded.frame)
                arrays[f"image/{name}"][w, j] = message.values()
                arrays[f"scale/{name}"][w, j] = message.scale
                arrays[f"offset/{name}"][w, j] = message.offset
                arrays[f"present/{name}"][w, j] = True
    arrays.update(_truth_arrays(windows, max_targets))
    return arrays


def load_shard(dataset_dir: str | Path, index: int) -> Shard:
    """:func:`spar_wire.dataset_format.load_shard`, raising NodeError like the rest of the firmware."""
    try:
        return dataset_format.load_shard(dataset_dir, index)
    except WireError as exc:
        raise NodeError(str(exc)) from exc


def read_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """:func:`spar_wire.dataset_format.read_manifest`, raising NodeError like the rest of the firmware."""
    try:
        return dataset_format.read_manifest(dataset_dir)
    except WireError as exc:
        raise NodeError(str(exc)) from exc


# --------------------------------------------------------------------------- internals
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _single_threaded_children():
    """One BLAS/OpenMP thread per worker: N workers x N threads each on N cores ran slower than
    one worker (measured: 10.5 vs 18.1 windows/s on 2 cores). Spawned children read these at start."""
    saved = {name: os.environ.get(name) for name in _THREAD_VARS}
    for name in _THREAD_VARS:
        os.environ.setdefault(name, "1")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _write_shard_job(job: tuple[DatasetSpec, str, int, int, int]) -> dict[str, Any]:
    spec, out, number, first, stop = job
    layout = load_site_layout(spec.site)
    source = make_scenario(spec.scenario, layout, spec.seed, **spec.params)
    windows = [source.window(i) for i in range(first, stop)]
    arrays = encode_windows(layout, windows, CodecSpec.parse(spec.codec), spec.max_targets)
    path = Path(out) / f"shard-{number:05d}.npz"
    np.savez_compressed(path, **arrays)
    data = path.read_bytes()
    return {"file": path.name, "first_window": first, "windows": stop - first, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def _truth_arrays(windows: list[SourceWindow], max_targets: int) -> dict[str, np.ndarray]:
    n = len(windows)
    dims = {len(t.position) for w in windows for t in w.truth.targets} or {2}
    d_t = max(dims)
    target_class = np.full((n, max_targets), -1, np.int64)
    target_position = np.full((n, max_targets, d_t), np.nan, np.float32)
    keys = sorted({k for w in windows for k in w.truth.extras})
    extras = {k: np.full(n, np.nan) for k in keys}
    for i, window in enumerate(windows):
        for k, target in enumerate(window.truth.targets[:max_targets]):
            target_class[i, k] = target.class_id
            target_position[i, k, : len(target.position)] = target.position
        for key, value in window.truth.extras.items():
            extras[key][i] = float(value)
    out = {"label": np.array([w.truth.label for w in windows], np.int64),
           "target_class": target_class, "target_position": target_position}
    out.update({f"extra/{k}": v for k, v in extras.items()})
    return out


def _manifest(spec: DatasetSpec, layout: SiteLayout, source: dict[str, Any], class_names: tuple[str, ...],
              shards: list[dict[str, Any]], elapsed_s: float) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "scenario": spec.scenario, "seed": spec.seed, "source": source, "codec": spec.codec,
        "windows": spec.windows, "shard_size": spec.shard_size, "class_names": list(class_names),
        "site": {"id": layout.site_id, "layout_file": str(spec.site), "frame": layout.frame,
                 "node_ids": layout.node_ids, "positions": layout.positions().tolist(),
                 "descriptions": [n.description for n in layout.nodes]},
        "modalities": {
            name: {"feature_hash": m.features.hash, "feature_config": m.features.to_dict(),
                   "image_shape": list(m.features.image_shape), "n_tokens": m.features.n_tokens,
                   "token_dim": m.features.token_dim}
            for name, m in layout.modalities.items()},
        "shards": shards,
        "generation": {"seconds": round(elapsed_s, 3),
                       "windows_per_s": round(spec.windows / max(elapsed_s, 1e-9), 2)},
    }
