"""Vehicles in a parking lot heard by microphones and felt by geophones (M3N-VC-like data).

Each episode (``episode_windows`` consecutive windows) holds 0..max_vehicles vehicles of four
classes (motorcycle, car, van, truck) driving along straight or gently curved paths through the
lot, or idling in place. Every window renders, per node:

* microphone (Pa): engine harmonics + tyre/road noise of every vehicle, delayed by r/c at 343 m/s
  (per sample, so Doppler appears), spherical spreading 1/r, air absorption exp(-alpha(f) r),
  plus wind noise (pink to brown) and microphone self-noise;
* geophone (m/s, ground velocity): engine/body vibration + tyre-induced ground vibration, carried by
  a Rayleigh wave (~250 m/s): 1/sqrt(r) spreading, anelastic loss exp(-pi f r / (Q v)), plus
  ground noise and sensor self-noise. A 3-channel geophone gives (east, north, vertical); other
  channel counts (and multi-channel microphones) are co-located copies with their own noise.

Signals are built in four steps, one function each: trajectory (``vehicle_xy``), source synthesis
(``_emitted``), propagation (``_render`` with ``propagation.receive``/``attenuate``), noise
(``_noise_spectra``). The ground truth is the vehicle set at the window centre.

Random access: every window is a pure function of (seed, index); vehicles come from
``episode_rng(seed, "parking_lot", episode)``, noise from streams keyed by window and node.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft as sfft

from node_firmware_sim.errors import NodeError
from node_firmware_sim.scenarios import propagation as prop
from node_firmware_sim.scenarios.base import GroundTruth, SourceWindow, Target, episode_rng, node_key, site_window_s
from spar_wire.site_layout import SiteLayout

P_REF_PA = 20e-6  # 0 dB SPL
MICROPHONE, GEOPHONE = "microphone", "geophone"
_TABLE_SIZE = 4096  # engine wavetable points per cycle (power of two: index wrap is a bit mask)
_KNOT_S = 0.005  # spacing of the emission-time knots (interpolation error << 1 us)
_PHASE_KNOT_S = 0.001  # spacing of the engine-phase knots on the source grid
_PAD = 32  # receiver samples on each side of the window (room for the zero-phase loss filters)


# ----------------------------------------------------------------------------- parameter sets
@dataclass(frozen=True)
class VehicleClass:
    """Sound and vibration of one vehicle class. Levels are RMS at 1 m."""

    name: str
    engine_hz: tuple[float, float]  # firing frequency range (rpm x cylinders / 120 for 4-stroke)
    harmonics: int  # engine harmonics synthesised (capped below the receiver's band edge)
    harmonic_rolloff: float  # harmonic k has amplitude ~ k ** -rolloff ...
    formant_hz: float  # ... lifted near this exhaust/intake resonance ...
    formant_gain: float  # ... by up to this factor
    engine_pa: float  # engine sound, Pa, while driving (idle: TrafficParams.idle_level of it)
    tyre_pa: float  # tyre/road noise, Pa, at AcousticParams.ref_speed_mps
    engine_ground_mps: float  # ground velocity from engine/body vibration, m/s
    ground_mps: float  # ground velocity from tyres on the road at the reference speed, m/s
    ground_band_hz: tuple[float, float]  # where that tyre-induced ground motion sits


DEFAULT_CLASSES: tuple[VehicleClass, ...] = (
    # Single/twin cylinder at high rpm: high firing rate, bright exhaust, light on the ground.
    VehicleClass("motorcycle", (40.0, 70.0), 40, 0.5, 1200.0, 3.0, 1.0, 0.06, 2e-6, 3e-6, (20.0, 60.0)),
    VehicleClass("car", (25.0, 45.0), 30, 1.0, 500.0, 1.5, 0.3, 0.15, 4e-6, 1.5e-5, (10.0, 40.0)),
    VehicleClass("van", (18.0, 30.0), 36, 0.9, 350.0, 1.5, 0.45, 0.22, 8e-6, 4e-5, (7.0, 30.0)),
    # Slow-turning diesel: low firing rate, rich in harmonics (knock), heavy and low on the ground.
    VehicleClass("truck", (8.0, 20.0), 60, 0.7, 250.0, 2.0, 1.0, 0.35, 3e-5, 1.5e-4, (3.0, 18.0)),
)


@dataclass(frozen=True)
class TrafficParams:
    """How vehicles are drawn per episode."""

    speed_mps: tuple[float, float] = (1.5, 8.0)  # moving vehicles (parking-lot pace)
    idle_fraction: float = 0.15  # vehicles standing still with the engine running
    lot_margin_m: float = 8.0  # mid-episode positions: node bounding box grown by this
    max_turn_rad: float = 1.2  # heading change over a whole episode (gentle curves)
    rpm_drift: float = 0.08  # largest relative excursion of the firing frequency
    level_sigma_db: float = 3.0  # vehicle-to-vehicle level spread
    idle_level: float = 0.5  # engine level idling / driving


@dataclass(frozen=True)
class AcousticParams:
    sound_speed_mps: float = 343.0
    r_min_m: float = 1.0  # spreading is capped inside this (extended source)
    absorption_db_per_m: float = 0.1  # air absorption at absorption_ref_hz (ISO 9613-1, 20 C, 70 %)
    absorption_ref_hz: float = 8000.0
    absorption_exponent: float = 1.7
    tyre_peak_hz: float = 900.0  # tyre/road noise spectrum peaks near 1 kHz
    tyre_speed_exponent: float = 1.5  # level ~ speed ** 1.5, i.e. +30 dB per decade of speed
    ref_speed_mps: float = 8.0
    oversample: int = 2  # source grid rate / microphone rate (linear-interpolation accuracy)


@dataclass(frozen=True)
class SeismicParams:
    rayleigh_speed_mps: float = 250.0  # surface waves on compacted soil under asphalt
    q: float = 25.0  # quality factor of the near-surface ground
    r_min_m: float = 1.0
    ground_speed_exponent: float = 1.0  # tyre-induced ground motion ~ speed
    ref_speed_mps: float = 8.0
    hv_ratio: float = 0.7  # Rayleigh-wave horizontal / vertical amplitude (3-channel geophones)
    oversample: int = 4


@dataclass(frozen=True)
class NoiseParams:
    """Background noise; levels are drawn per episode (log-uniform) and spread per node."""

    wind_db_spl: tuple[float, float] = (40.0, 58.0)  # overall wind/ambient level, dB re 20 uPa
    wind_slope: tuple[float, float] = (1.0, 2.0)  # power ~ f ** -slope: 1 pink .. 2 brown
    wind_corner_hz: float = 8.0
    gust_db: float = 3.0  # slow level swings within an episode
    node_spread_db: float = 3.0  # per-node exposure differences
    mic_self_noise_pa: float = 3e-4  # ~24 dB SPL, white (a MEMS microphone)
    ground_noise_mps: tuple[float, float] = (2e-8, 3e-7)  # ambient ground velocity RMS
    ground_corner_hz: float = 15.0
    geophone_self_noise_mps: float = 5e-9


@dataclass(frozen=True)
class Vehicle:
    """One vehicle of an episode. Times are episode-local (0 = episode start)."""

    class_id: int  # 1-based index into class_names (0 is "none")
    centre_xy: tuple[float, float]  # position at the episode mid-time, m
    heading_rad: float  # direction of travel at the mid-time (0 = +x)
    speed_mps: float  # 0: standing still, idling
    curvature_per_m: float  # 1 / turn radius, positive turns left; 0 = straight
    engine_hz: float  # mean firing frequency
    rpm_drift: tuple[tuple[float, float, float], ...] = ()  # (relative amplitude, period s, phase rad)
    level: float = 1.0  # multiplies every source level of the class
    timbre_seed: int = 0  # draws the harmonic amplitudes and phases of this engine


# ----------------------------------------------------------------------------- trajectory
def vehicle_xy(vehicle: Vehicle, t: np.ndarray, t_mid: float) -> tuple[np.ndarray, np.ndarray]:
    """Position (x [...], y [...]) at episode-local times t [...]: constant speed on a circular arc."""
    s = vehicle.speed_mps * (np.asarray(t, dtype=np.float64) - t_mid)  # arc length from mid-point
    x0, y0 = vehicle.centre_xy
    th, k = vehicle.heading_rad, vehicle.curvature_per_m
    if abs(k) < 1e-9:
        return x0 + s * math.cos(th), y0 + s * math.sin(th)
    turn = th + k * s
    return x0 + (np.sin(turn) - math.sin(th)) / k, y0 + (math.cos(th) - np.cos(turn)) / k


def engine_phase(vehicle: Vehicle, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Firing phase (rad) and relative firing frequency f(t) / engine_hz at times t [...].

    f(t) = engine_hz * (1 + sum a sin(w t + p)); the phase is its exact integral, so it is
    continuous across windows and can be read at any (retarded) time.
    """
    t = np.asarray(t, dtype=np.float64)
    cycles = t.copy()
    rel = np.ones_like(t)
    for amplitude, period, phase in vehicle.rpm_drift:
        w = 2.0 * math.pi / period
        cycles += amplitude * (math.cos(phase) - np.cos(w * t + phase)) / w
        rel += amplitude * np.sin(w * t + phase)
    return 2.0 * math.pi * vehicle.engine_hz * cycles, rel


# ----------------------------------------------------------------------------- internals
@dataclass(frozen=True, eq=False)
class _Medium:
    """Everything one modality needs to render: sampling, receive grid, wave physics."""

    name: str
    rate: float  # receiver sample rate
    samples: int  # S
    channels: int  # C
    n_grid: int  # receive grid: PAD + S + the rest of a fast FFT length
    knot_step: int  # receiver samples per emission-time knot
    freqs: np.ndarray  # [F] rfft bin frequencies of the receive grid
    alpha: np.ndarray  # [F] frequency-dependent loss, Np/m
    wave_speed: float
    spreading: float  # 1 spherical (air), 0.5 surface wave
    r_min: float
    source_rate: float  # source grid rate (oversampled)
    phase_step: int  # source samples per engine-phase knot
    band_hz: float  # sources stay below this, so reading them at the receiver rate never aliases


@dataclass(frozen=True, eq=False)
class _Episode:
    vehicles: tuple[Vehicle, ...]
    tables: dict[str, tuple[np.ndarray, ...]]  # modality -> per-vehicle engine wavetable (+1 wrap point)
    wind_db: float
    wind_slope: float
    gust: tuple[tuple[float, float, float], ...]  # (dB, period s, phase) level swings
    node_wind_db: np.ndarray  # [N layout nodes]
    ground_mps: float
    node_ground_db: np.ndarray  # [N layout nodes]

    def wind_db_at(self, t: float) -> float:
        return self.wind_db + sum(a * math.sin(2 * math.pi * t / p + ph) for a, p, ph in self.gust)


def _lognormal_bump(freqs: np.ndarray, centre_hz: float, sigma: float) -> np.ndarray:
    """exp(-ln(f / centre)^2 / (2 sigma^2)): a band centred on centre_hz (0 at f = 0)."""
    out = np.zeros_like(freqs)
    pos = freqs > 0
    out[pos] = np.exp(-0.5 * (np.log(freqs[pos] / centre_hz) / sigma) ** 2)
    return out


def _red_shape(freqs: np.ndarray, corner_hz: float, slope: float, highpass_hz: float) -> np.ndarray:
    """Amplitude of noise whose power falls as f ** -slope above corner_hz, high-passed (no DC)."""
    f2 = freqs * freqs
    return f2 / (f2 + highpass_hz**2) * (1.0 + f2 / corner_hz**2) ** (-slope / 4.0)


def _unit_rms_scale(amplitude: np.ndarray, n: int) -> float:
    """Scale that gives irfft(amplitude * _random_spectrum(...), n) unit RMS.

    irfft's sample n is (1/n) (X_0 + 2 sum_k Re(X_k e^{...})), and each term has variance
    2 |A_k|^2 when E|X_k|^2 = |A_k|^2, so var = 2 sum_{k>0} A_k^2 / n^2 (DC is kept at 0).
    """
    power = 2.0 * float(np.sum(amplitude[1:] ** 2))
    return n / math.sqrt(power) if power > 0 else 0.0


def _random_spectrum(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Spectrum of white noise: independent complex bins with E|z|^2 = 1.

    Real and imaginary parts are uniform rather than Gaussian: every time sample sums thousands of
    bins, so the noise is Gaussian in time all the same (central limit theorem), and uniforms
    cost a fifth of normals; noise generation was the largest single cost of a window.
    """
    parts = rng.random((*shape, 2), dtype=np.float32)
    parts -= 0.5
    return parts.view(np.complex64)[..., 0] * np.float32(math.sqrt(6.0))  # var(U - 1/2) = 1/12


def _noise(rng: np.random.Generator, n: int, rate: float, band_hz: float, shape) -> np.ndarray:
    """[n] Gaussian noise of unit RMS whose amplitude spectrum follows shape(freqs) below band_hz.

    Only the bins below band_hz are drawn (an oversampled source grid leaves most bins empty).
    """
    m = sfft.next_fast_len(n, real=True)
    freqs = sfft.rfftfreq(m, 1.0 / rate)
    used = int(np.searchsorted(freqs, band_hz))
    amplitude = shape(freqs[:used])
    spectrum = np.zeros(freqs.size, dtype=np.complex128)
    spectrum[:used] = _random_spectrum(rng, amplitude.shape) * (amplitude * _unit_rms_scale(amplitude, m))
    return sfft.irfft(spectrum, m)[:n]


def _wavetable_read(table: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """table (one period, _TABLE_SIZE points + wrap point) read at phases [...] (rad), linearly."""
    x = phase * (_TABLE_SIZE / (2.0 * math.pi))
    i = np.floor(x)
    x -= i
    idx = i.astype(np.int64) & (_TABLE_SIZE - 1)  # two's complement: also right for negative phases
    out = np.diff(table)[idx]
    out *= x
    out += table[idx]
    return out


def _engine_table(amplitudes: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """One period of sum_k a_k cos(k theta + p_k), unit RMS, with the wrap point appended."""
    spectrum = np.zeros(_TABLE_SIZE // 2 + 1, dtype=np.complex128)
    spectrum[1:amplitudes.size + 1] = amplitudes * np.exp(1j * phases) * (_TABLE_SIZE / 2)
    table = sfft.irfft(spectrum, _TABLE_SIZE)
    rms = math.sqrt(float(np.mean(table**2)))
    if rms > 0:
        table /= rms
    return np.append(table, table[0])


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _as_count(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise NodeError(f"parking_lot: {what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_range(pair: tuple[float, float], what: str, positive: bool = True) -> None:
    lo, hi = (float(v) for v in pair)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi and (lo > 0 or not positive)):
        raise NodeError(f"parking_lot: {what} must be a finite (low, high) range"
                        f"{' of positive numbers' if positive else ''}, got {pair!r}")


def _check_positive(values: dict[str, float], where: str) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise NodeError(f"parking_lot: {where}.{name} must be a positive number, got {value!r}")


# ----------------------------------------------------------------------------- the scenario
class ParkingLotScenario:
    """Vehicles driving through a parking lot instrumented with microphones and geophones.

    Args:
        layout: the site; needs a modality named ``microphone`` and/or ``geophone``.
        seed: selects the whole random world.
        episode_windows: windows per episode (vehicles keep moving across them).
        max_vehicles: most vehicles at once; a non-empty episode has 1..max_vehicles (uniform).
        empty_fraction: share of episodes without any vehicle (label 0 throughout).
        classes: vehicle classes, label 1.. in order (default motorcycle, car, van, truck).
        traffic, acoustic, seismic, noise: physics parameter sets (defaults when None).
        vehicles: fixed vehicles for every episode instead of random ones (tests, demos);
            background noise stays random.
    """

    name = "parking_lot"

    def __init__(self, layout: SiteLayout, seed: int = 0, *, episode_windows: int = 8, max_vehicles: int = 3,
                 empty_fraction: float = 0.2, classes: tuple[VehicleClass, ...] = DEFAULT_CLASSES,
                 traffic: TrafficParams | None = None, acoustic: AcousticParams | None = None,
                 seismic: SeismicParams | None = None, noise: NoiseParams | None = None,
                 vehicles: tuple[Vehicle, ...] | None = None):
        self.layout = layout
        self.seed = _as_count(seed, "seed", 0)
        self.episode_windows = _as_count(episode_windows, "episode_windows", 1)
        self.max_vehicles = _as_count(max_vehicles, "max_vehicles", 0)
        if not (isinstance(empty_fraction, (int, float)) and 0.0 <= empty_fraction <= 1.0):
            raise NodeError(f"parking_lot: empty_fraction must be in [0, 1], got {empty_fraction!r}")
        self.empty_fraction = float(empty_fraction)
        self.classes = tuple(classes)
        self.traffic = traffic or TrafficParams()
        self.acoustic = acoustic or AcousticParams()
        self.seismic = seismic or SeismicParams()
        self.noise = noise or NoiseParams()
        self._check_params()
        self.class_names = ("none", *(c.name for c in self.classes))
        self.window_s = site_window_s(layout)
        self.episode_s = self.episode_windows * self.window_s
        self._t_mid = self.episode_s / 2.0

        present = [m for m in (MICROPHONE, GEOPHONE) if m in layout.modalities]
        if not present:
            raise NodeError(f"parking_lot: site {layout.site_id!r} has no 'microphone' or 'geophone' "
                            f"modality (it has {sorted(layout.modalities)})")
        self._media = {m: self._medium(m) for m in present}
        pos = layout.positions()
        self._xyz = np.zeros((pos.shape[0], 3))
        self._xyz[:, :pos.shape[1]] = pos  # 2-D layouts: nodes at z = 0, like the vehicles
        self._node_index = {n.id: i for i, n in enumerate(layout.nodes)}
        self._centroid = pos[:, :2].mean(axis=0)
        margin = self.traffic.lot_margin_m
        self._lot_lo = pos[:, :2].min(axis=0) - margin
        self._lot_hi = pos[:, :2].max(axis=0) + margin
        self.vehicles = None if vehicles is None else tuple(self._check_vehicle(v) for v in vehicles)
        self._cache: OrderedDict[int, _Episode] = OrderedDict()

    # ------------------------------------------------------------------ public API
    def window(self, index: int, node_ids: tuple[str, ...] | None = None) -> SourceWindow:
        """Window ``index`` for ``node_ids`` (default all); only the requested nodes are computed."""
        index = _as_count(index, "window index", 0)
        wanted = self._select(node_ids)
        episode, k = divmod(index, self.episode_windows)
        state = self._episode(episode)
        signals: dict[tuple[str, str], np.ndarray] = {}
        for modality, medium in self._media.items():
            members = [i for i in wanted if modality in self.layout.nodes[i].modalities]
            if not members:
                continue
            rendered = self._render(medium, state, index, k, members)
            for i, x in zip(members, rendered, strict=True):
                signals[(self.layout.nodes[i].id, modality)] = x
        return SourceWindow(index, index * self.window_s, signals, self._truth(state, episode, k))

    def truth(self, index: int) -> GroundTruth:
        """Ground truth of window ``index`` without rendering any signal (cheap)."""
        index = _as_count(index, "window index", 0)
        episode, k = divmod(index, self.episode_windows)
        return self._truth(self._episode(episode), episode, k)

    def episode_vehicles(self, episode: int) -> tuple[Vehicle, ...]:
        """The vehicles of ``episode`` (windows episode * episode_windows ...)."""
        return self._episode(_as_count(episode, "episode", 0)).vehicles

    def describe(self) -> dict[str, Any]:
        return _jsonable({
            "name": self.name, "seed": self.seed, "site_id": self.layout.site_id,
            "window_s": self.window_s, "episode_windows": self.episode_windows,
            "max_vehicles": self.max_vehicles, "empty_fraction": self.empty_fraction,
            "class_names": list(self.class_names),
            "classes": [dataclasses.asdict(c) for c in self.classes],
            "traffic": dataclasses.asdict(self.traffic), "acoustic": dataclasses.asdict(self.acoustic),
            "seismic": dataclasses.asdict(self.seismic), "noise": dataclasses.asdict(self.noise),
            "vehicles": None if self.vehicles is None else [dataclasses.asdict(v) for v in self.vehicles],
        })

    # ------------------------------------------------------------------ setup
    def _check_params(self) -> None:
        if not self.classes:
            raise NodeError("parking_lot: at least one vehicle class is required")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names) or "none" in names:
            raise NodeError(f"parking_lot: class names must be unique and not 'none', got {names}")
        drift = self.traffic.rpm_drift
        if not 0.0 <= drift < 0.5:
            raise NodeError(f"parking_lot: traffic.rpm_drift must be in [0, 0.5), got {drift!r}")
        for c in self.classes:
            where = f"class {c.name!r}"
            _check_range(c.engine_hz, f"{where} engine_hz")
            _check_range(c.ground_band_hz, f"{where} ground_band_hz")
            if not c.formant_gain >= 0:
                raise NodeError(f"parking_lot: {where} formant_gain must be >= 0, got {c.formant_gain!r}")
            _check_positive({"formant_hz": c.formant_hz, "engine_pa": c.engine_pa, "tyre_pa": c.tyre_pa,
                             "engine_ground_mps": c.engine_ground_mps, "ground_mps": c.ground_mps}, where)
            _as_count(c.harmonics, f"{where} harmonics", 1)
            if c.engine_hz[1] / (1 + drift) <= c.engine_hz[0] / (1 - drift):
                raise NodeError(f"parking_lot: {where} engine_hz range {c.engine_hz} is too narrow for "
                                f"traffic.rpm_drift = {drift}")
        t, a, s, n = self.traffic, self.acoustic, self.seismic, self.noise
        _check_range(t.speed_mps, "traffic.speed_mps")
        if not (0.0 <= t.idle_fraction <= 1.0 and t.lot_margin_m >= 0 and t.max_turn_rad >= 0
                and t.level_sigma_db >= 0 and t.idle_level > 0):
            raise NodeError(f"parking_lot: invalid traffic parameters {t}")
        _check_positive({k: v for k, v in dataclasses.asdict(a).items()}, "acoustic")
        _check_positive({k: v for k, v in dataclasses.asdict(s).items()}, "seismic")
        for name, over in (("acoustic", a.oversample), ("seismic", s.oversample)):
            _as_count(over, f"{name}.oversample", 1)
        _check_range(n.wind_db_spl, "noise.wind_db_spl", positive=False)
        _check_range(n.wind_slope, "noise.wind_slope", positive=False)
        _check_range(n.ground_noise_mps, "noise.ground_noise_mps")
        _check_positive({"wind_corner_hz": n.wind_corner_hz, "mic_self_noise_pa": n.mic_self_noise_pa,
                         "ground_corner_hz": n.ground_corner_hz,
                         "geophone_self_noise_mps": n.geophone_self_noise_mps}, "noise")
        if n.gust_db < 0 or n.node_spread_db < 0:
            raise NodeError("parking_lot: noise.gust_db and noise.node_spread_db must be >= 0")

    def _check_vehicle(self, v: Vehicle) -> Vehicle:
        if not isinstance(v, Vehicle):
            raise NodeError(f"parking_lot: vehicles must be Vehicle instances, got {type(v).__name__}")
        if not 1 <= v.class_id < len(self.class_names):
            raise NodeError(f"parking_lot: vehicle class_id {v.class_id} is not in 1..{len(self.classes)}")
        if not (v.speed_mps >= 0 and v.engine_hz > 0 and v.level > 0):
            raise NodeError(f"parking_lot: vehicle needs speed >= 0, engine_hz > 0, level > 0: {v}")
        if sum(abs(a) for a, _, _ in v.rpm_drift) >= 0.5 or any(p <= 0 for _, p, _ in v.rpm_drift):
            raise NodeError(f"parking_lot: vehicle rpm_drift needs amplitudes summing below 0.5 and "
                            f"positive periods: {v.rpm_drift}")
        return v

    def _medium(self, modality: str) -> _Medium:
        f = self.layout.modalities[modality].features
        n_grid = sfft.next_fast_len(f.window_samples + 2 * _PAD, real=True)
        freqs = sfft.rfftfreq(n_grid, 1.0 / f.sample_rate_hz)
        if modality == MICROPHONE:
            a = self.acoustic
            alpha = prop.air_absorption(freqs, a.absorption_db_per_m, a.absorption_ref_hz,
                                        a.absorption_exponent)
            speed, spreading, r_min, over = a.sound_speed_mps, 1.0, a.r_min_m, a.oversample
        else:
            s = self.seismic
            alpha = prop.anelastic_absorption(freqs, s.q, s.rayleigh_speed_mps)
            speed, spreading, r_min, over = s.rayleigh_speed_mps, 0.5, s.r_min_m, s.oversample
        source_rate = f.sample_rate_hz * over
        # float32 losses: the per-node copies of each source are carried in float32 (half the
        # memory traffic and FFT time; -140 dB rounding noise), the sum over vehicles in float64.
        return _Medium(
            name=modality, rate=f.sample_rate_hz, samples=f.window_samples, channels=f.channels,
            n_grid=n_grid, knot_step=max(1, round(f.sample_rate_hz * _KNOT_S)), freqs=freqs,
            alpha=alpha.astype(np.float32), wave_speed=speed, spreading=spreading, r_min=r_min,
            source_rate=source_rate, phase_step=max(1, round(source_rate * _PHASE_KNOT_S)),
            band_hz=0.45 * f.sample_rate_hz,
        )

    def _select(self, node_ids: tuple[str, ...] | None) -> list[int]:
        if node_ids is None:
            return list(range(len(self.layout.nodes)))
        unknown = [n for n in node_ids if n not in self._node_index]
        if unknown:
            raise NodeError(f"parking_lot: unknown node(s) {unknown} in site {self.layout.site_id!r}")
        return sorted({self._node_index[n] for n in node_ids})

    # ------------------------------------------------------------------ episode state
    def _episode(self, episode: int) -> _Episode:
        """Vehicles, engine wavetables and background levels of an episode (pure; LRU-cached)."""
        state = self._cache.get(episode)
        if state is None:
            state = self._draw_episode(episode)
            self._cache[episode] = state
            if len(self._cache) > 16:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(episode)
        return state

    def _draw_episode(self, episode: int) -> _Episode:
        if self.vehicles is not None:
            vehicles = self.vehicles
        else:
            vehicles = self._draw_vehicles(episode_rng(self.seed, "parking_lot", episode))
        tables = {m: tuple(self._engine_table(v, m) for v in vehicles) for m in self._media}
        rng = episode_rng(self.seed, "parking_lot/background", episode)
        n = self.noise
        lo, hi = np.log(n.ground_noise_mps)
        # Each node's offsets come from a stream keyed by its id, not its place in the layout: a node
        # that joins or moves (placement events) leaves what every other node hears unchanged.
        spread = np.array([episode_rng(self.seed, "parking_lot/background/node", episode, node_key(node.id))
                           .uniform(-1.0, 1.0, 2) for node in self.layout.nodes]).reshape(-1, 2) * n.node_spread_db
        return _Episode(
            vehicles=vehicles, tables=tables,
            wind_db=float(rng.uniform(*n.wind_db_spl)), wind_slope=float(rng.uniform(*n.wind_slope)),
            gust=tuple((float(n.gust_db * rng.uniform(0.3, 0.7)), float(rng.uniform(4.0, 20.0)),
                        float(rng.uniform(0, 2 * math.pi))) for _ in range(2)),
            node_wind_db=spread[:, 0],
            ground_mps=float(np.exp(rng.uniform(lo, hi))),
            node_ground_db=spread[:, 1],
        )

    def _draw_vehicles(self, rng: np.random.Generator) -> tuple[Vehicle, ...]:
        """0 vehicles with probability empty_fraction, else 1..max_vehicles random ones."""
        if self.max_vehicles == 0 or rng.random() < self.empty_fraction:
            return ()
        t = self.traffic
        out = []
        for _ in range(int(rng.integers(1, self.max_vehicles + 1))):
            class_id = int(rng.integers(1, len(self.classes) + 1))
            cls = self.classes[class_id - 1]
            idle = rng.random() < t.idle_fraction
            speed = 0.0 if idle else float(rng.uniform(*t.speed_mps))
            # Gentle curves: the heading turns by at most max_turn_rad over the whole episode.
            max_k = t.max_turn_rad / (speed * self.episode_s) if speed > 0 else 0.0
            # Keep f(t) = engine_hz (1 +- drift) inside the class range.
            f_lo, f_hi = cls.engine_hz[0] / (1 - t.rpm_drift), cls.engine_hz[1] / (1 + t.rpm_drift)
            engine = f_lo + (f_hi - f_lo) * rng.uniform(0.0, 0.3 if idle else 1.0)  # idle: low rpm
            share = rng.uniform(0.0, 1.0)
            total = t.rpm_drift * rng.uniform(0.3, 1.0)
            drift = tuple((float(total * w), float(rng.uniform(3.0, 12.0)),
                           float(rng.uniform(0, 2 * math.pi))) for w in (share, 1.0 - share))
            out.append(Vehicle(
                class_id=class_id,
                centre_xy=(float(rng.uniform(self._lot_lo[0], self._lot_hi[0])),
                           float(rng.uniform(self._lot_lo[1], self._lot_hi[1]))),
                heading_rad=float(rng.uniform(-math.pi, math.pi)), speed_mps=speed,
                curvature_per_m=float(rng.uniform(-1.0, 1.0) * max_k), engine_hz=float(engine),
                rpm_drift=drift, level=float(10 ** (rng.normal(0.0, t.level_sigma_db) / 20)),
                timbre_seed=int(rng.integers(2**31)),
            ))
        return tuple(out)

    def _engine_table(self, v: Vehicle, modality: str) -> np.ndarray:
        """Wavetable of the engine's harmonic series as heard (air) or felt (ground), unit RMS.

        Harmonics stay below the receiver's band edge even at the highest rpm plus Doppler, so
        reading the source at the receiver rate never aliases.
        """
        cls = self.classes[v.class_id - 1]
        medium = self._media[modality]
        top = v.engine_hz * (1 + sum(abs(a) for a, _, _ in v.rpm_drift)) * 1.05
        rng = np.random.default_rng([v.timbre_seed, zlib.crc32(modality.encode())])
        if modality == MICROPHONE:
            k = np.arange(1, min(cls.harmonics, int(medium.band_hz / top)) + 1, dtype=np.float64)
            log_ratio = np.log(k * v.engine_hz / cls.formant_hz)
            lift = 1 + cls.formant_gain * np.exp(-0.5 * (log_ratio / 0.35) ** 2)
            amplitudes = k**-cls.harmonic_rolloff * lift * np.exp(0.35 * rng.standard_normal(k.size))
        else:  # the ground is driven mostly by the low orders (body and engine-mount vibration)
            k = np.arange(1, min(8, int(medium.band_hz / top)) + 1, dtype=np.float64)
            amplitudes = k**-1.5 * np.exp(0.3 * rng.standard_normal(k.size))
        return _engine_table(amplitudes, rng.uniform(0, 2 * math.pi, k.size))

    # ------------------------------------------------------------------ source synthesis
    def _emitted(self, medium: _Medium, state: _Episode, v: int, index: int, t_lo: float,
                 t_hi: float) -> tuple[np.ndarray, float]:
        """Signal vehicle v emits over [t_lo, t_hi], referred to 1 m: Pa (air) or m/s (ground).

        Engine harmonics (wavetable read at the firing phase, louder at higher rpm) plus, when
        moving, tyre/road noise (air) or tyre-induced ground vibration (ground).

        Returns:
            (source [M] on a uniform grid at medium.source_rate, episode-local time of source[0]).
        """
        vehicle = state.vehicles[v]
        cls = self.classes[vehicle.class_id - 1]
        step, rate = medium.phase_step, medium.source_rate
        j0 = math.floor(t_lo * rate) - 2
        j0 -= j0 % step  # phase knots sit on multiples of step
        n = -(-(math.ceil(t_hi * rate) + 3 - j0) // step) * step
        knots_t = (j0 + step * np.arange(n // step + 1)) / rate
        phase, rel = engine_phase(vehicle, knots_t)
        load = prop.linear_upsample(rel * rel, step, n)  # engine sound power grows with rpm
        signal = _wavetable_read(state.tables[medium.name][v], prop.linear_upsample(phase, step, n)) * load

        idle = 1.0 if vehicle.speed_mps > 0 else self.traffic.idle_level
        if medium.name == MICROPHONE:
            a = self.acoustic
            signal *= cls.engine_pa * vehicle.level * idle
            speed = vehicle.speed_mps / a.ref_speed_mps
            level = cls.tyre_pa * vehicle.level * speed**a.tyre_speed_exponent

            def shape(f: np.ndarray) -> np.ndarray:  # broad hump around 1 kHz
                return (0.15 + _lognormal_bump(f, a.tyre_peak_hz, 1.0)) * (f > 20)
        else:
            s = self.seismic
            signal *= cls.engine_ground_mps * vehicle.level * idle
            speed = vehicle.speed_mps / s.ref_speed_mps
            level = cls.ground_mps * vehicle.level * speed**s.ground_speed_exponent
            lo, hi = cls.ground_band_hz

            def shape(f: np.ndarray) -> np.ndarray:  # heavier vehicles: lower, stronger band
                return _lognormal_bump(f, math.sqrt(lo * hi), max(0.3, math.log(hi / lo) / 2))
        if level > 0:  # tyres on the road: same realisation reaches every node, only delayed
            rng = episode_rng(self.seed, f"parking_lot/{medium.name}/tyre", index, v)
            signal += level * _noise(rng, n, rate, medium.band_hz, shape)
        return signal, j0 / rate

    # ------------------------------------------------------------------ propagation
    def _render(self, medium: _Medium, state: _Episode, index: int, k: int,
                members: list[int]) -> list[np.ndarray]:
        """[C, S] signals of nodes ``members`` (layout indices) for window k of the episode."""
        t_first = k * self.window_s - _PAD / medium.rate  # episode-local time of receive-grid sample 0
        knots_t = t_first + np.arange(prop.knot_count(medium.n_grid, medium.knot_step)) * (
            medium.knot_step / medium.rate)
        t_centre = (k + 0.5) * self.window_s
        # Emission-time span over every node of the modality, not just the requested ones: the
        # source noise realisation depends on its span, and a node subset must match a full call.
        everyone = [i for i, n in enumerate(self.layout.nodes) if medium.name in n.modalities]
        rows = [everyone.index(i) for i in members]
        three_c = medium.name == GEOPHONE and medium.channels == 3
        n_bins = medium.freqs.size
        vertical = np.zeros((len(members), n_bins), dtype=np.complex128)
        horizontal = np.zeros((len(members), 2, n_bins), dtype=np.complex128) if three_c else None
        for v, vehicle in enumerate(state.vehicles):
            def trajectory(t: np.ndarray, vehicle: Vehicle = vehicle) -> np.ndarray:
                x, y = vehicle_xy(vehicle, t, self._t_mid)
                return np.stack([x, y, np.zeros_like(x)], axis=-1)

            t_emit, r = prop.emission_times(knots_t, self._xyz[everyone], trajectory, medium.wave_speed)
            source, source_t0 = self._emitted(medium, state, v, index, float(t_emit.min()),
                                              float(t_emit.max()))
            x = prop.receive(source.astype(np.float32), source_t0, medium.source_rate, t_emit[rows], r[rows],
                             medium.knot_step, medium.n_grid, medium.spreading, medium.r_min)
            # Frequency-dependent loss with the path length near the window centre (it changes
            # by < 1 dB at 8 kHz across a window).
            spectrum = prop.attenuate(sfft.rfft(x, axis=-1), medium.alpha, r[rows, r.shape[1] // 2])
            vertical += spectrum
            if horizontal is not None:
                # Rayleigh wave: horizontal motion along the propagation direction, 90 deg from vertical.
                vx, vy = vehicle_xy(vehicle, np.array(t_centre), self._t_mid)
                d = self._xyz[members, :2] - np.array([float(vx), float(vy)])
                u = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)
                horizontal += (self.seismic.hv_ratio * -1j) * u[:, :, None] * spectrum[:, None, :]

        total = self._noise_spectra(medium, state, index, members, t_centre)  # [n, C, F]
        if horizontal is not None:
            total[:, :2] += horizontal
            total[:, 2] += vertical
        else:
            total += vertical[:, None, :]
        x = sfft.irfft(total, medium.n_grid, axis=-1)
        return [np.ascontiguousarray(x[i, :, _PAD:_PAD + medium.samples]) for i in range(len(members))]

    # ------------------------------------------------------------------ noise
    def _noise_spectra(self, medium: _Medium, state: _Episode, index: int, members: list[int],
                       t_centre: float) -> np.ndarray:
        """[n, C, F] rfft spectra of the background at each node: ambient + sensor self-noise.

        Ambient (wind / ground unrest) and self-noise are independent per node and channel;
        drawn in the frequency domain so they join the vehicle spectra before one inverse FFT.
        """
        n, f, m = self.noise, medium.freqs, medium.n_grid
        white = (f > 0).astype(np.float64)
        if medium.name == MICROPHONE:
            ambient = _red_shape(f, n.wind_corner_hz, state.wind_slope, 1.0)
            ambient_rms = P_REF_PA * 10 ** ((state.wind_db_at(t_centre) + state.node_wind_db[members]) / 20)
            self_rms = n.mic_self_noise_pa
        else:
            ambient = _red_shape(f, n.ground_corner_hz, 2.0, 0.5)
            ambient_rms = state.ground_mps * 10 ** (state.node_ground_db[members] / 20)
            self_rms = n.geophone_self_noise_mps
        a = (ambient * _unit_rms_scale(ambient, m))[None, :] * ambient_rms[:, None]
        w = white * (_unit_rms_scale(white, m) * self_rms)
        amplitude = np.sqrt(a * a + w * w)  # independent Gaussian parts: powers add
        out = np.empty((len(members), medium.channels, f.size), dtype=np.complex128)
        for row, i in enumerate(members):
            rng = episode_rng(self.seed, f"parking_lot/{medium.name}/noise", index, node_key(self.layout.nodes[i].id))
            out[row] = _random_spectrum(rng, (medium.channels, f.size)) * amplitude[row]
        return out

    # ------------------------------------------------------------------ ground truth
    def _truth(self, state: _Episode, episode: int, k: int) -> GroundTruth:
        """Vehicles at the window centre; label = class of the one nearest the site centroid."""
        t_centre = (k + 0.5) * self.window_s
        extras = {"episode": float(episode), "window_in_episode": float(k),
                  "n_vehicles": float(len(state.vehicles)), "wind_db_spl": state.wind_db_at(t_centre),
                  "ground_noise_mps": state.ground_mps, "nearest_distance_m": -1.0,
                  "nearest_speed_mps": 0.0, "nearest_engine_hz": 0.0, "min_node_distance_m": -1.0}
        if not state.vehicles:
            return GroundTruth(0, (), extras)
        xy = np.array([[float(c) for c in vehicle_xy(v, np.array(t_centre), self._t_mid)]
                       for v in state.vehicles])
        to_centroid = np.linalg.norm(xy - self._centroid, axis=1)
        nearest = int(np.argmin(to_centroid))
        v = state.vehicles[nearest]
        _, rel = engine_phase(v, np.array(t_centre))
        to_nodes = np.linalg.norm(self._xyz[None, :, :] - np.c_[xy, np.zeros(len(xy))][:, None, :], axis=-1)
        extras.update(nearest_distance_m=float(to_centroid[nearest]), nearest_speed_mps=v.speed_mps,
                      nearest_engine_hz=float(v.engine_hz * rel), min_node_distance_m=float(to_nodes.min()))
        targets = tuple(Target(veh.class_id, (float(p[0]), float(p[1])))
                        for veh, p in zip(state.vehicles, xy, strict=True))
        return GroundTruth(v.class_id, targets, extras)
