"""Reader of ``spar-dataset`` folders: the on-disk contract between the node exporter and training.

The writer lives in ``node_firmware_sim.dataset``; the reader lives here so that ``train`` (which
may import only spar_wire and torch) reads shards through the same code the exporter's tests use.

A dataset folder holds ``dataset.json`` (the manifest: feature configs and hashes, site, class
names, one entry with ``file``, ``windows`` and ``sha256`` per shard) and ``shard-NNNNN.npz``
files. Arrays in a shard (W windows, N nodes in site order, per modality ``m``):

    window_index        [W] int64
    positions           [W, N, d_S] float32       node positions in metres (site frame)
    image/m             [W, N, H, T] uint8 codes (image codecs) or float32 dB (raw codecs)
    scale/m, offset/m   [W, N] float32           value = code * scale + offset
    present/m           [W, N] bool              False: the node sent nothing (missing trace)
    label               [W] int64                GroundTruth.label
    target_class        [W, K] int64             -1 where there is no target
    target_position     [W, K, d_T] float32      NaN where there is no target
    extra/<key>         [W] float64              GroundTruth.extras, NaN when absent

Every problem raises ``WireError("bad_dataset", ...)`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spar_wire.errors import WireError
from spar_wire.feature_config import FeatureConfig

FORMAT = "spar-dataset"
FORMAT_VERSION = 1
MANIFEST = "dataset.json"
REASON = "bad_dataset"
_REQUIRED = ("shards", "modalities", "class_names", "site")


@dataclass
class Shard:
    """One loaded shard, with helpers that give the model's view of it.

    ``layout_modalities`` maps modality name -> FeatureConfig (from the manifest).
    """

    arrays: dict[str, np.ndarray]
    layout_modalities: dict[str, FeatureConfig]

    def __len__(self) -> int:
        return len(self.arrays["window_index"])

    def images(self, modality: str) -> np.ndarray:
        """[W, N, H, T] float32 dB token images (zeros where absent)."""
        stored = self._array("image", modality)
        images = stored.astype(np.float32)
        if stored.dtype == np.uint8:  # codes: dequantize as the aggregator does
            images = images * self._array("scale", modality)[:, :, None, None] \
                + self._array("offset", modality)[:, :, None, None]
        present = self._array("present", modality)[:, :, None, None]
        return np.where(present, images, 0.0).astype(np.float32)

    def tokens(self, modality: str) -> np.ndarray:
        """[W, N, m, D] float32 tokens, exactly what the aggregator would assemble.

        Same layout as ``spar_wire.features.patchify`` applied per image, done for the whole shard
        at once (a per-image loop dominated loading time).
        """
        cfg = self.layout_modalities[modality]
        images = self.images(modality)
        w, n = images.shape[:2]
        c, pf, pt = cfg.image_channels, cfg.patch_freq, cfg.patch_time
        gf, gt = cfg.patch_grid
        x = images.reshape(w, n, c, gf, pf, gt, pt).transpose(0, 1, 3, 5, 2, 4, 6)
        return np.ascontiguousarray(x.reshape(w, n, gf * gt, c * pf * pt))

    def _array(self, kind: str, modality: str) -> np.ndarray:
        try:
            return self.arrays[f"{kind}/{modality}"]
        except KeyError:
            raise WireError(REASON, f"shard has no {kind}/{modality} array "
                                    f"(modalities: {', '.join(self.layout_modalities)})") from None


def read_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """The parsed ``dataset.json`` of ``dataset_dir``, checked for format, version and main fields."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise WireError(REASON, f"{dataset_dir}: no such dataset folder")
    path = dataset_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WireError(REASON, f"{path}: cannot read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WireError(REASON, f"{path}: not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("version") != FORMAT_VERSION:
        found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else None
        raise WireError(REASON, f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest (found {found})")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise WireError(REASON, f"{path}: missing field(s) {', '.join(missing)}")
    return manifest


def feature_configs(manifest: dict[str, Any]) -> dict[str, FeatureConfig]:
    """Modality name -> FeatureConfig, from a manifest returned by :func:`read_manifest`."""
    try:
        configs = {name: FeatureConfig.from_dict(info["feature_config"], f"{MANIFEST} modality {name}")
                   for name, info in manifest["modalities"].items()}
        hashes = {name: info.get("feature_hash") for name, info in manifest["modalities"].items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise WireError(REASON, f"{MANIFEST}: malformed modalities: {exc!r}") from None
    for name, cfg in configs.items():
        # A hash that no longer matches means the feature code or config changed since export:
        # training on these tokens would not match what live nodes send.
        if hashes[name] is not None and hashes[name] != cfg.hash:
            raise WireError(REASON, f"{MANIFEST}: modality {name} feature_hash {hashes[name]} != "
                                    f"{cfg.hash} computed from its feature_config")
    return configs


def load_shard(dataset_dir: str | Path, index: int, manifest: dict[str, Any] | None = None) -> Shard:
    """Load shard ``index`` of a dataset, checking its sha256 against the manifest.

    Pass ``manifest`` (from :func:`read_manifest`) to avoid re-reading it for every shard.
    """
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir) if manifest is None else manifest
    shards = manifest["shards"]
    if not 0 <= index < len(shards):  # negative indices would silently wrap
        raise WireError(REASON, f"{dataset_dir}: no shard {index} (it has {len(shards)})")
    try:
        path, expected = dataset_dir / shards[index]["file"], shards[index]["sha256"]
    except (KeyError, TypeError):
        raise WireError(REASON, f"{dataset_dir / MANIFEST}: shard entry {index} lacks file/sha256") from None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WireError(REASON, f"{path}: cannot read: {exc.strerror or exc}") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise WireError(REASON, f"{path}: sha256 does not match {MANIFEST}; the shard is damaged")
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise WireError(REASON, f"{path}: not a readable npz: {exc}") from None
    return Shard(arrays, feature_configs(manifest))
