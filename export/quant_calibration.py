"""Calibration for static INT8: real windows in, activation ranges out.

Static quantization needs the range of every activation that gets a Q/DQ pair. The ranges come from
real windows of the target dataset, not random inputs: dB-scaled tokens and node positions in metres
have ranges no random input reproduces. This module checks that the windows were made with the
feature configs the model was trained on (``check_dataset``), picks which windows calibrate
(``calibration_indices``), feeds them to ONNX Runtime (``WindowCalibrationReader``) and computes
the ranges itself (``calibrate``): ``quantize_static`` cannot set histogram bins, and its Entropy
default degenerates to MinMax (see ``CALIBRATOR_OPTIONS``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from export.errors import ExportError
from export.parity import Indices, window_inputs
from spar_wire.model_manifest import ModelManifest
from train.data import WindowSet

METHODS = ("minmax", "percentile", "entropy")

# Histogram settings. ORT's quantize_static does not pass bin counts through, and its Entropy
# default (128 bins into 128 quantized bins) leaves a single candidate threshold: the MinMax range.
# 2048 / 128 are the counts TensorRT's entropy calibrator uses.
CALIBRATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128, "symmetric": True},
}

CALIBRATION_CHUNK = 16  # calibration batches per collect_data call


def check_dataset(manifest: ModelManifest, windows: WindowSet) -> None:
    """ExportError unless ``windows`` were made with the feature configs the model was trained on."""
    problems = []
    hashes, shapes = windows.feature_hashes, windows.token_shapes
    for name, need in manifest.modalities.items():
        if name not in hashes:
            problems.append(f"modality {name} is missing (the dataset has {', '.join(sorted(hashes)) or 'none'})")
        elif hashes[name] != need.feature_hash:
            problems.append(f"{name} feature hash is {hashes[name]}, the model was trained on {need.feature_hash}")
        elif shapes[name] != (need.n_tokens, need.token_dim):
            problems.append(f"{name} tokens are {shapes[name]}, the model takes {(need.n_tokens, need.token_dim)}")
    if problems:
        raise ExportError(f"the calibration dataset does not match {manifest.source}: " + "; ".join(problems))


def check_indices(indices: Indices, n: int, what: str) -> np.ndarray:
    """``indices`` as a flat int64 array [k] of window numbers in ``0..n-1``; ExportError when empty or out
    of range (``what`` names the set in the message: "calibration", "evaluation")."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    if idx.size == 0:
        raise ExportError(f"no {what} windows given")
    if idx.min() < 0 or idx.max() >= n:
        raise ExportError(f"{what} window index out of range for {n} windows: {idx.min()}..{idx.max()}")
    return idx


def calibration_indices(train_idx: np.ndarray, count: int) -> np.ndarray:
    """``count`` windows spread evenly over the training part ``train_idx`` (episodes differ,
    consecutive windows do not), sorted and unique: the calibration set of every INT8 graph here."""
    count = min(count, len(train_idx))
    return np.unique(train_idx[np.linspace(0, len(train_idx) - 1, count).astype(int)])


def calibration_method(method: str) -> Any:
    """ONNX Runtime's ``CalibrationMethod`` for one of ``METHODS``; ExportError for any other name."""
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}
    if method not in table:
        raise ExportError(f"calibration method must be one of {', '.join(table)}, got {method!r}")
    return table[method]


class WindowCalibrationReader(CalibrationDataReader):
    """Real windows as calibration batches: each ``get_next()`` is one dict of named numpy inputs
    (tokens float32, presence bool, positions float32, node_index int64; the bool and int64 inputs
    only feed float ops and pass through unquantized). ``None`` after the last batch; ``rewind()``
    starts over (calibration may read the data more than once)."""

    def __init__(self, windows: WindowSet, indices: Indices, input_names: Sequence[str], batch_size: int = 1):
        if batch_size < 1:
            raise ExportError(f"calibration batch_size must be >= 1, got {batch_size}")
        self.windows, self.input_names, self.batch_size = windows, tuple(input_names), batch_size
        self.indices = check_indices(indices, len(windows), "calibration")
        window_inputs(windows, self.indices[:1], self.input_names)  # fail now, not inside ORT
        self._next = 0

    def __len__(self) -> int:
        return -(-self.indices.size // self.batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self.indices.size:
            return None
        chunk = self.indices[self._next:self._next + self.batch_size]
        self._next += self.batch_size
        return window_inputs(self.windows, chunk, self.input_names)

    def rewind(self) -> None:
        self._next = 0


class _Chunk(CalibrationDataReader):
    """At most ``size`` batches of ``reader`` per pass; ``more()`` starts the next pass."""

    def __init__(self, reader: CalibrationDataReader, size: int):
        self.reader, self.size, self.left, self._peek = reader, size, 0, None

    def more(self) -> bool:
        self._peek = self.reader.get_next()
        self.left = self.size
        return self._peek is not None

    def get_next(self):
        if self.left <= 0:
            return None
        self.left -= 1
        if self._peek is not None:
            item, self._peek = self._peek, None
            return item
        return self.reader.get_next()


def calibrate(model_path: Path, reader: WindowCalibrationReader, method: str, op_types: Sequence[str], work: Path,
              options: Mapping[str, Any] | None = None) -> Any:
    """Activation ranges (ORT ``TensorsData``) of the tensors around ``op_types`` over ``reader``'s windows."""
    from onnxruntime.quantization.calibrate import create_calibrator

    reader.rewind()
    calibrator = create_calibrator(Path(model_path), list(op_types), augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=calibration_method(method),
                                   extra_options={**CALIBRATOR_OPTIONS[method], **(options or {})})
    # ORT keeps every intermediate tensor of one collect_data call in memory: feed it in chunks
    # (ranges and histograms accumulate across calls).
    chunk = _Chunk(reader, CALIBRATION_CHUNK)
    while chunk.more():
        calibrator.collect_data(chunk)
    ranges = calibrator.compute_data()
    del calibrator
    return ranges
