"""Replay field recordings (WAV, miniSEED) through the node firmware instead of a scenario.

A recordings file maps (node, modality) to a file::

    # configs/recordings/example.toml
    [[recordings]]
    node = "n01"
    modality = "microphone"
    path = "n01_mic.wav"            # relative paths are relative to this file
    channels = [0]                  # optional: which file channels, in order (default: all)

    [[recordings]]
    node = "CLC"
    modality = "seismometer"
    path = "CI.CLC..HH.mseed"       # miniSEED through obspy; traces ordered E, N, Z
    components = "ENZ"              # optional; "12Z" for unoriented stations, "Z" for a vertical-only one

Every recording is resampled (polyphase, scipy) to the modality's sample rate and cut into the
site's windows from its first sample; miniSEED traces of one file are aligned on their common
start time. Window k exists while every recording still has a full window; a node with no
recording for a modality sends nothing for it (a missing trace).

Single-component stations: a one-channel modality takes the file's only trace (or its Z trace); a
three-channel modality takes the components it can find in ``components`` order and replays the
others as flat (zero) traces, so their spectrogram rows sit at the quantisation floor, the
"no signal" the model sees for a dead channel. The wire has one presence flag per node and
modality, not per channel, so a flat channel is how an absent component reaches the aggregator;
``absent_components`` lists them and the replay warns once per file. A corrupt record (obspy skips
it with a warning) is reported in one warning per file and the readable records are replayed.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from scipy import signal as sp_signal
from scipy.io import wavfile

from node_firmware_sim.errors import NodeError
from node_firmware_sim.scenarios.base import GroundTruth, SourceWindow, site_window_s
from node_firmware_sim.toml_file import read_toml
from spar_wire.site_layout import SiteLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recording:
    node: str
    modality: str
    path: Path
    channels: tuple[int, ...] | None = None  # WAV: channel indices to keep
    components: str | None = None  # miniSEED: trace order by the channel code's last letter (None: ENZ, or Z)


class RecordingReplay:
    """A ``Source`` backed by recordings; ground truth is unknown (label -1)."""

    name = "replay"
    class_names = ("unknown",)

    def __init__(self, layout: SiteLayout, recordings: list[Recording]):
        if not recordings:
            raise NodeError("replay: no recordings given")
        self.layout = layout
        self.window_s = site_window_s(layout)
        self.recordings = recordings
        self._signals: dict[tuple[str, str], np.ndarray] = {}
        self.absent_components: dict[tuple[str, str], str] = {}  # (node, modality) -> components replayed flat
        self.notes: list[str] = []  # what the replay warned about, for summaries
        for rec in recordings:
            self._signals[(rec.node, rec.modality)] = self._load(rec)
        self.windows = min(sig.shape[1] // self._samples(mod) for (_, mod), sig in self._signals.items())
        if self.windows == 0:
            raise NodeError(f"replay: the shortest recording is shorter than one {self.window_s:g} s window")

    def window(self, index: int, node_ids: tuple[str, ...] | None = None) -> SourceWindow:
        if not 0 <= index < self.windows:
            raise NodeError(f"replay: window {index} is past the end of the recordings "
                            f"({self.windows} windows)")
        wanted = set(node_ids) if node_ids else set(self.layout.node_ids)
        signals = {}
        for (node, modality), samples in self._signals.items():
            if node in wanted:
                n = self._samples(modality)
                signals[(node, modality)] = samples[:, index * n:(index + 1) * n]
        return SourceWindow(index, index * self.window_s, signals, GroundTruth(label=-1))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "windows": self.windows,
                "recordings": [{"node": r.node, "modality": r.modality, "path": str(r.path),
                                "absent_components": self.absent_components.get((r.node, r.modality), "")}
                               for r in self.recordings], "notes": list(self.notes)}

    def _samples(self, modality: str) -> int:
        return self.layout.modalities[modality].features.window_samples

    def _load(self, rec: Recording) -> np.ndarray:
        """[C, S] float64 at the modality's rate."""
        if rec.node not in self.layout.node_ids:
            raise NodeError(f"replay: node {rec.node!r} is not in site {self.layout.site_id}")
        if rec.modality not in self.layout.node(rec.node).modalities:
            raise NodeError(f"replay: node {rec.node} has no modality {rec.modality!r}")
        cfg = self.layout.modalities[rec.modality].features
        if not rec.path.exists():
            raise NodeError(f"replay: {rec.path} does not exist")
        suffix = rec.path.suffix.lower()
        if suffix == ".wav":
            rate, data = _read_wav(rec)
        elif suffix in (".mseed", ".miniseed", ".msd"):
            rate, data, absent, problems = _read_mseed(rec, cfg.channels)
            if problems:
                self._note(f"{rec.path.name}: {problems}; replaying the records that could be read")
            if absent:
                self.absent_components[(rec.node, rec.modality)] = absent
                self._note(f"{rec.node}: component(s) {', '.join(absent)} not in {rec.path.name}; replayed as "
                           "flat traces (silent channels)")
        else:
            raise NodeError(f"replay: {rec.path}: unknown format {suffix!r} (use .wav or .mseed)")
        if data.shape[0] != cfg.channels:
            raise NodeError(f"replay: {rec.path} gives {data.shape[0]} channel(s), modality "
                            f"{rec.modality} needs {cfg.channels}")
        return resample(data, rate, cfg.sample_rate_hz)

    def _note(self, text: str) -> None:
        self.notes.append(text)
        log.warning("replay: %s", text)


def resample(data: np.ndarray, rate_in: float, rate_out: float) -> np.ndarray:
    """[C, S] at rate_in -> [C, S'] at rate_out (polyphase filter, exact rational ratio)."""
    if math.isclose(rate_in, rate_out):
        return data.astype(np.float64)
    ratio = Fraction(rate_out / rate_in).limit_denominator(1000)
    out = sp_signal.resample_poly(data.astype(np.float64), ratio.numerator, ratio.denominator, axis=-1)
    return out


def load_recordings(path: str | Path, layout: SiteLayout) -> RecordingReplay:
    """Read a recordings TOML file (see the module docstring) and build the replay source."""
    path = Path(path)
    data = read_toml(path)
    entries = data.get("recordings")
    if not isinstance(entries, list) or not entries:
        raise NodeError(f"{path}: needs at least one [[recordings]] entry")
    recordings = []
    for i, entry in enumerate(entries):
        where = f"{path}: recordings[{i}]"
        required = ("node", "modality", "path")
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in required):
            raise NodeError(f"{where}: node, modality and path are required strings")
        unknown = set(entry) - {"node", "modality", "path", "channels", "components"}
        if unknown:
            raise NodeError(f"{where}: unknown field(s) {sorted(unknown)}")
        channels = entry.get("channels")
        if channels is not None and (not isinstance(channels, list)
                                     or not all(isinstance(c, int) and c >= 0 for c in channels)):
            raise NodeError(f"{where}: channels must be a list of channel indices")
        components = entry.get("components")
        if components is not None and (not isinstance(components, str) or not components
                                       or len(set(components)) != len(components)):
            raise NodeError(f"{where}: components must be a string of distinct component letters, e.g. \"ENZ\"")
        recordings.append(Recording(entry["node"], entry["modality"], path.parent / entry["path"],
                                    tuple(channels) if channels else None, components))
    return RecordingReplay(layout, recordings)


def _read_wav(rec: Recording) -> tuple[float, np.ndarray]:
    try:
        rate, data = wavfile.read(rec.path)
    except (ValueError, OSError) as exc:
        raise NodeError(f"replay: {rec.path}: not a readable WAV file: {exc}") from None
    data = np.atleast_2d(data.T if data.ndim == 2 else data)  # -> [C, S]
    if np.issubdtype(data.dtype, np.integer):  # full scale -> 1.0
        data = data.astype(np.float64) / float(np.iinfo(data.dtype).max)
    if rec.channels is not None:
        if max(rec.channels) >= data.shape[0]:
            raise NodeError(f"replay: {rec.path} has {data.shape[0]} channel(s), asked for {rec.channels}")
        data = data[list(rec.channels)]
    return float(rate), data.astype(np.float64)


def _read_mseed(rec: Recording, channels: int) -> tuple[float, np.ndarray, str, str]:
    """(rate, [channels, S] samples, the components replayed flat, what obspy warned about)."""
    try:
        import obspy
    except ImportError:
        raise NodeError("replay: miniSEED needs obspy: pip install 'spar-edge[replay]'") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            stream = obspy.read(str(rec.path), format="MSEED")
        except Exception as exc:  # noqa: BLE001 - obspy raises many types on a corrupt file
            raise NodeError(f"replay: {rec.path}: not readable miniSEED: {exc}") from None
    problems = ""
    if caught:
        problems = f"{len(caught)} unreadable part(s) skipped (last: {str(caught[-1].message)[:160]})"
    stream.merge(fill_value=0)
    wanted = rec.components or _default_components(stream, channels)
    if len(wanted) != channels:
        raise NodeError(f"replay: {rec.path}: components {wanted!r} give {len(wanted)} channel(s), the modality "
                        f"needs {channels}")
    found = {c: next((tr for tr in stream if tr.stats.channel.endswith(c)), None) for c in wanted}
    traces = [tr for tr in found.values() if tr is not None]
    absent = "".join(c for c, tr in found.items() if tr is None)
    if not traces:
        raise NodeError(f"replay: {rec.path}: no trace for components {wanted!r} "
                        f"(has {[tr.stats.channel for tr in stream]})")
    rates = {float(tr.stats.sampling_rate) for tr in traces}
    if len(rates) != 1:
        raise NodeError(f"replay: {rec.path}: components have different rates {sorted(rates)}")
    start = max(tr.stats.starttime for tr in traces)
    end = min(tr.stats.endtime for tr in traces)
    if end <= start:
        raise NodeError(f"replay: {rec.path}: the components do not overlap in time")
    aligned = [tr.slice(start, end).data.astype(np.float64) for tr in traces]
    n = min(len(a) for a in aligned)
    by_component = dict(zip((c for c, tr in found.items() if tr is not None), aligned, strict=True))
    data = np.stack([by_component[c][:n] if c in by_component else np.zeros(n) for c in wanted])
    return rates.pop(), data, absent, problems


def _default_components(stream, channels: int) -> str:
    """ENZ for a three-channel modality; for one channel the file's only component, or Z."""
    if channels != 1:
        return "ENZ"[:channels] if channels <= 3 else "ENZ"
    codes = sorted({tr.stats.channel[-1:] for tr in stream})
    return codes[0] if len(codes) == 1 else "Z"
