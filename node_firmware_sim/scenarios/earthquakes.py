"""Synthetic local earthquakes recorded by a regional network of three-component seismometers.

Every window holds one event, drawn from ``episode_rng(seed, "earthquakes", index)``. The physics is
the textbook minimum that gives a localisation model the cues it needs, one function per step:

* source: Hanks-Kanamori moment, Brune omega-square spectrum whose corner frequency falls with
  magnitude (fc_P = 1.5 fc_S);
* path: straight rays in a homogeneous half-space (P at R/vp, S at R/vs, R hypocentral distance
  down to the station's elevation), geometric spreading 1/R and anelastic attenuation t* = R/(Q v)
  + kappa, which broadens the pulse and lowers its peak with distance;
* station: a thin low-velocity surface layer bends rays towards the vertical (Snell), so P shows
  mostly on Z and S on the horizontals; S is split into SV (radial-vertical plane) and SH
  (transverse); free-surface doubling; a fixed log-normal site amplification per station;
* scattering: forward-scattered codas behind P and S with an exponential decay set by coda Q;
  the P coda keeps the P polarisation, so the transverse component is quiet until S arrives;
* noise: per-station microseism (around 0.2 Hz) plus broadband noise, with per-window drift;
  codas and noise are random-phase spectra (Gaussian in time by the central limit theorem);
* recording: each sample is the mean ground velocity over its sampling interval, so the onset is
  sharp to one sample and the pulse area (the seismic moment) is exact. Units: nm/s, channel order
  E, N, Z. About ``missing_trace_fraction`` of the station traces are dropped per window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from node_firmware_sim.errors import NodeError
from node_firmware_sim.scenarios.base import (
    GroundTruth,
    SourceWindow,
    Target,
    check_window_index,
    episode_rng,
    node_key,
    site_window_s,
)
from spar_wire.site_layout import SiteLayout

_NM_PER_M = 1e9
_P_CORNER_RATIO = 1.5  # fc_P / fc_S for a circular crack (Madariaga 1976)
_RAD_P, _RAD_S = 0.52, 0.63  # radiation pattern averaged over the focal sphere (Boore & Boatwright 1984)
_FREE_SURFACE = 2.0  # amplitude doubling at the free surface for near-vertical incidence
_MICROSEISM_LOG_WIDTH = 0.25  # natural-log width of the secondary microseism peak
# Random spectral phases are drawn as indices into a table of unit phasors: sin/cos of every bin
# would cost more than the rest of the window, and 2 pi / 4096 resolution is irrelevant for noise.
_PHASE_STEPS = 4096
_PHASORS = np.exp(2j * np.pi * np.arange(_PHASE_STEPS) / _PHASE_STEPS)


@dataclass(frozen=True)
class QuakeParams:
    """Physics constants and ranges of the scenario (SI units unless named otherwise)."""

    missing_trace_fraction: float = 0.2
    magnitude_range: tuple[float, float] = (0.5, 4.5)
    depth_km_range: tuple[float, float] = (1.0, 20.0)
    vp_m_s: float = 6000.0
    vs_m_s: float = 3500.0
    density_kg_m3: float = 2700.0
    stress_drop_bar: float = 30.0
    q_p: float = 600.0
    q_s: float = 400.0  # S-wave Q near 5-10 Hz in southern California (Q(f) ~ 180 f^0.45)
    kappa_s: float = 0.01  # near-surface attenuation: caps the recorded bandwidth near 30 Hz
    coda_q: float = 150.0
    coda_ratio: float = 0.5  # coda level relative to the direct-wave peak
    surface_velocity_ratio: float = 0.4  # v(surface layer) / v(source depth): ray bending
    origin_delay_s: tuple[float, float] = (2.0, 5.0)  # origin time after the window start
    tail_s: float = 3.0  # keep the last S arrival this far before the window end when possible
    footprint_margin: float = 0.1  # epicentres within the station bounding box grown by this fraction
    noise_scale: float = 1.0  # 0 = noise-free (tests): exact silence before the P arrival
    broadband_noise_nm_s: tuple[float, float] = (5.0, 50.0)  # per-station RMS, log-uniform
    microseism_nm_s: tuple[float, float] = (100.0, 800.0)  # per-station RMS, log-uniform
    microseism_hz: float = 0.2
    noise_drift_sigma: float = 0.2  # natural-log std of the per-window noise level
    site_amplification_sigma: float = 0.3  # natural-log std of the fixed per-station site term

    def __post_init__(self) -> None:
        for name in ("vp_m_s", "vs_m_s", "density_kg_m3", "stress_drop_bar", "q_p", "q_s", "coda_q"):
            if not getattr(self, name) > 0:
                raise NodeError(f"earthquakes: {name} must be > 0, got {getattr(self, name)!r}")
        if not self.vs_m_s < self.vp_m_s:
            raise NodeError(f"earthquakes: vs_m_s ({self.vs_m_s}) must be below vp_m_s ({self.vp_m_s})")
        if not 0.0 <= self.missing_trace_fraction <= 1.0:
            raise NodeError(f"earthquakes: missing_trace_fraction must be in [0, 1], "
                            f"got {self.missing_trace_fraction!r}")
        if not 0.0 < self.surface_velocity_ratio <= 1.0:
            raise NodeError("earthquakes: surface_velocity_ratio must be in (0, 1]")
        if self.noise_scale < 0 or self.kappa_s < 0 or self.coda_ratio < 0:
            raise NodeError("earthquakes: noise_scale, kappa_s and coda_ratio must be >= 0")
        for name in ("magnitude_range", "depth_km_range", "origin_delay_s", "broadband_noise_nm_s",
                     "microseism_nm_s"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise NodeError(f"earthquakes: {name} must be (low, high) with low <= high, got {(lo, hi)}")
        if self.broadband_noise_nm_s[0] <= 0 or self.microseism_nm_s[0] <= 0:
            raise NodeError("earthquakes: noise levels must be > 0 (use noise_scale=0 to switch noise off)")


@dataclass(frozen=True)
class QuakeEvent:
    """One earthquake: epicentre (m, site frame), depth below the datum z = 0 (m), magnitude, origin time
    relative to the window start (s)."""

    x_m: float
    y_m: float
    depth_m: float
    magnitude: float
    origin_time_s: float


@dataclass(frozen=True)
class _StationDraws:
    """Per-event random station terms, [N] over the seismic nodes of the layout."""

    missing: np.ndarray  # bool
    p_polarity: np.ndarray  # +-1: first-motion sign
    s_polarity: np.ndarray  # +-1
    s_angle: np.ndarray  # rad: direct S split cos -> SV, sin -> SH


@dataclass(frozen=True)
class _Phase:
    """Direct pulse parameters of one phase at n stations."""

    arrival_s: np.ndarray  # [n] seconds after the window start
    plateau: np.ndarray  # [n] displacement pulse area (nm*s)
    omega_e: np.ndarray  # [n] effective corner angular frequency (rad/s), source x path


class EarthquakeScenario:
    """One local earthquake per window on the first 3-channel modality of ``layout`` (see module doc).

    Ground truth: label 0 (``class_names = ("event",)``), one target at (x, y, depth_m), extras
    magnitude, origin_time_s (relative to the window start) and depth_m.
    """

    name = "earthquakes"
    class_names = ("event",)

    def __init__(self, layout: SiteLayout, seed: int = 0, *, missing_trace_fraction: float = 0.2,
                 magnitude_range: tuple[float, float] = (0.5, 4.5),
                 depth_km_range: tuple[float, float] = (1.0, 20.0), vp_m_s: float = 6000.0,
                 vs_m_s: float = 3500.0, noise_scale: float = 1.0, **physics: Any):
        known = {f.name for f in fields(QuakeParams)}
        unknown = sorted(set(physics) - known)
        if unknown:
            raise NodeError(f"earthquakes: unknown parameter(s) {unknown}; known: {', '.join(sorted(known))}")
        self.params = QuakeParams(missing_trace_fraction=missing_trace_fraction,
                              magnitude_range=tuple(magnitude_range), depth_km_range=tuple(depth_km_range),
                              vp_m_s=vp_m_s, vs_m_s=vs_m_s, noise_scale=noise_scale,
                              **{k: tuple(v) if isinstance(v, list) else v for k, v in physics.items()})
        self.layout = layout
        self.seed = int(seed)
        self.window_s = site_window_s(layout)
        self.modality = _three_channel_modality(layout)
        spec = layout.modalities[self.modality]
        self.sample_rate_hz = float(spec.sample_rate_hz)
        self.n_samples = spec.features.window_samples
        self.station_ids = tuple(n.id for n in layout.nodes if self.modality in n.modalities)
        self._row = {node_id: i for i, node_id in enumerate(self.station_ids)}
        self.positions = _positions_3d(layout, self.station_ids)
        self._site = _site_terms(self.seed, self.station_ids, self.params)
        lo, hi = self.positions[:, :2].min(axis=0), self.positions[:, :2].max(axis=0)
        grow = self.params.footprint_margin * np.maximum(hi - lo, 1000.0)
        self._epicentre_box = (lo - grow, hi + grow)

    # ------------------------------------------------------------------ public API
    def event(self, index: int) -> QuakeEvent:
        """The earthquake of window ``index``."""
        return self._draw(check_window_index(index))[0]

    def window(self, index: int, node_ids: tuple[str, ...] | None = None, *,
               event: QuakeEvent | None = None) -> SourceWindow:
        """Window ``index`` for ``node_ids`` (default: all stations).

        ``event`` replaces the drawn hypocentre, magnitude and origin time (for controlled
        experiments); polarities, missing traces and noise still come from ``index``.
        """
        index = check_window_index(index)
        drawn, draws = self._draw(index)
        event = drawn if event is None else event
        rows = self._requested_rows(node_ids)
        rows = [r for r in rows if not draws.missing[r]]
        signals: dict[tuple[str, str], np.ndarray] = {}
        if rows:
            traces = self._render(index, event, draws, np.asarray(rows))
            for k, r in enumerate(rows):
                signals[(self.station_ids[r], self.modality)] = traces[k]
        truth = GroundTruth(
            label=0, targets=(Target(0, (event.x_m, event.y_m, event.depth_m)),),
            extras={"magnitude": float(event.magnitude), "origin_time_s": float(event.origin_time_s),
                    "depth_m": float(event.depth_m)})
        return SourceWindow(index=index, start_s=index * self.window_s, signals=signals, truth=truth)

    def describe(self) -> dict[str, Any]:
        """JSON-able parameters for manifests."""
        return {"name": self.name, "seed": self.seed, "modality": self.modality, "units": "nm/s",
                "channels": ["E", "N", "Z"], "window_s": self.window_s,
                "sample_rate_hz": self.sample_rate_hz, "stations": list(self.station_ids),
                **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.params).items()}}

    # ------------------------------------------------------------------ internals
    def _requested_rows(self, node_ids: tuple[str, ...] | None) -> list[int]:
        if node_ids is None:
            return list(range(len(self.station_ids)))
        rows = []
        for node_id in node_ids:
            if node_id in self._row:
                rows.append(self._row[node_id])
            elif node_id not in self.layout.node_ids:
                raise NodeError(f"earthquakes: no node {node_id!r} in site {self.layout.site_id!r}")
            # a node of the site without the seismic modality records nothing here
        return rows

    def _draw(self, index: int) -> tuple[QuakeEvent, _StationDraws]:
        """Event and per-station terms of window ``index``; a fixed draw order keeps it reproducible."""
        p = self.params
        rng = episode_rng(self.seed, "earthquakes", index)
        lo, hi = self._epicentre_box
        x, y = rng.uniform(lo, hi)
        depth_m = 1000.0 * rng.uniform(*p.depth_km_range)
        magnitude = rng.uniform(*p.magnitude_range)
        u_origin = rng.random()
        n = len(self.station_ids)
        draws = _StationDraws(missing=rng.random(n) < p.missing_trace_fraction,
                              p_polarity=np.where(rng.random(n) < 0.5, -1.0, 1.0),
                              s_polarity=np.where(rng.random(n) < 0.5, -1.0, 1.0),
                              s_angle=rng.uniform(0.0, 2.0 * np.pi, n))
        # the latest S arrival over the whole network (not just the requested stations) sets the
        # origin time, so a node subset sees the same event as the full call
        distances, _, _ = ray_geometry(np.array([x, y, depth_m]), self.positions)
        origin = _origin_time(u_origin, distances.max() / p.vs_m_s, self.window_s, p)
        return QuakeEvent(float(x), float(y), float(depth_m), float(magnitude), origin), draws

    def _render(self, index: int, event: QuakeEvent, draws: _StationDraws, rows: np.ndarray) -> np.ndarray:
        """[n, 3, S] nm/s traces of the stations ``rows``."""
        p, fs, n_samples = self.params, self.sample_rate_hz, self.n_samples
        t = np.arange(n_samples) / fs
        hypo = np.array([event.x_m, event.y_m, event.depth_m])
        distance, radial, sin_source = ray_geometry(hypo, self.positions[rows])
        d_p, d_sv, d_sh = polarisations(radial, sin_source * p.surface_velocity_ratio)
        moment = seismic_moment_nm(event.magnitude)
        site = self._site["amplification"][rows]
        phase_p = direct_phase(moment, distance, event.origin_time_s, p.vp_m_s, p.q_p, _RAD_P,
                               _P_CORNER_RATIO, p)
        phase_s = direct_phase(moment, distance, event.origin_time_s, p.vs_m_s, p.q_s, _RAD_S, 1.0, p)
        pulse_p, pulse_s = sampled_pulse(phase_p, t, fs), sampled_pulse(phase_s, t, fs)
        amp_p, amp_s = np.abs(pulse_p).max(axis=1), np.abs(pulse_s).max(axis=1)

        streams = [episode_rng(self.seed, "earthquakes.trace", index, node_key(self.station_ids[r]))
                   for r in rows]
        drift = np.array([g.standard_normal(2) for g in streams])  # [n, 2] noise level drift
        n_freq = n_samples // 2 + 1
        phases = np.stack([_draw_phases(g, (3, n_freq)) for g in streams])  # [n, K, F] phasors
        corners = np.stack([phase_p.omega_e, phase_s.omega_e, phase_s.omega_e], axis=1)
        carriers = coda_carriers(phases, corners, fs, n_samples)
        env_p = coda_envelope(t, phase_p, amp_p, p.coda_q, p.coda_ratio)
        env_s = coda_envelope(t, phase_s, amp_s, p.coda_q, p.coda_ratio / np.sqrt(2.0))
        along_p = draws.p_polarity[rows, None] * pulse_p + env_p * carriers[:, 0]
        cos_s, sin_s = np.cos(draws.s_angle[rows])[:, None], np.sin(draws.s_angle[rows])[:, None]
        sv = draws.s_polarity[rows, None] * cos_s * pulse_s + env_s * carriers[:, 1]
        sh = draws.s_polarity[rows, None] * sin_s * pulse_s + env_s * carriers[:, 2]
        directions = site[:, None, None] * np.stack([d_p, d_sv, d_sh], axis=2)  # [n, channel, phase]
        traces = directions @ np.stack([along_p, sv, sh], axis=1)  # [n, 3, S]
        if p.noise_scale > 0:
            # drawn after the carriers, so switching noise off leaves the event waveforms unchanged
            n_low = microseism_bins(n_samples, fs, p.microseism_hz)
            noise_phases = [np.stack([_draw_phases(g, (3, n_freq)) for g in streams]),
                            np.stack([_draw_phases(g, (3, n_low)) for g in streams])]
            levels = np.stack([self._site["microseism"][rows], self._site["broadband"][rows]], axis=1)
            levels = p.noise_scale * levels * np.exp(p.noise_drift_sigma * drift)
            traces = traces + station_noise(*noise_phases, levels, fs, n_samples, p.microseism_hz)
        return traces


# ---------------------------------------------------------------------- physical steps
def seismic_moment_nm(magnitude: float) -> float:
    """Seismic moment (N m) of moment magnitude ``magnitude`` (Hanks & Kanamori 1979)."""
    return 10.0 ** (1.5 * magnitude + 9.1)


def brune_corner_hz(moment_nm: float, vs_m_s: float, stress_drop_bar: float) -> float:
    """S-wave corner frequency (Hz) of the Brune (1970) source: falls as M0^(-1/3)."""
    moment_dyne_cm = moment_nm * 1e7
    return 4.906e6 * (vs_m_s / 1000.0) * (stress_drop_bar / moment_dyne_cm) ** (1.0 / 3.0)


def ray_geometry(hypocentre: np.ndarray, stations: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Straight rays from ``hypocentre`` (x, y, depth below z = 0) to ``stations`` [n, 3] (x, y, elevation).

    Returns:
        distance [n] hypocentral distance (m); radial [n, 2] unit vector epicentre -> station (E, N);
        sin_source [n] sine of the ray angle from the vertical at the source.
    """
    horizontal = stations[:, :2] - hypocentre[:2]
    h = np.hypot(horizontal[:, 0], horizontal[:, 1])
    vertical = stations[:, 2] + hypocentre[2]
    distance = np.maximum(np.hypot(h, vertical), 1.0)  # a station on the hypocentre would divide by 0
    # directly above the source the radial direction is undefined; any horizontal unit vector will do
    radial = np.where(h[:, None] > 1e-6, horizontal / np.maximum(h, 1e-6)[:, None], np.array([1.0, 0.0]))
    return distance, radial, h / distance


def polarisations(radial: np.ndarray, sin_incidence: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit particle-motion vectors (E, N, Z) at the surface for rays arriving ``sin_incidence`` off vertical.

    Returns:
        d_p [n, 3] along the ray (outward and up), d_sv [n, 3] perpendicular to it in the vertical
        plane through source and station, d_sh [n, 3] transverse (Z x radial).
    """
    s = np.clip(sin_incidence, 0.0, 1.0)
    c = np.sqrt(1.0 - s ** 2)
    zeros = np.zeros_like(s)
    d_p = np.stack([s * radial[:, 0], s * radial[:, 1], c], axis=1)
    d_sv = np.stack([c * radial[:, 0], c * radial[:, 1], -s], axis=1)
    d_sh = np.stack([-radial[:, 1], radial[:, 0], zeros], axis=1)
    return d_p, d_sv, d_sh


def direct_phase(moment_nm: float, distance: np.ndarray, origin_s: float, velocity: float, q: float,
                 radiation: float, corner_ratio: float, p: QuakeParams) -> _Phase:
    """Arrival, pulse area and effective corner of one body-wave phase at n stations ([n] arrays).

    The far-field displacement pulse area is M0 * radiation * free surface / (4 pi rho v^3 R)
    (geometric spreading 1/R). Anelastic attenuation exp(-pi f t*) conserves that area but cuts
    frequencies above ~1/(pi t*), i.e. it stretches the pulse: its width adds in quadrature to the
    source duration 1/omega_c, which lowers the peak velocity with distance on top of 1/R.
    """
    t_star = distance / (q * velocity) + p.kappa_s
    omega_c = 2.0 * np.pi * corner_ratio * brune_corner_hz(moment_nm, p.vs_m_s, p.stress_drop_bar)
    omega_e = 1.0 / np.sqrt(omega_c ** -2 + (0.5 * t_star) ** 2)
    plateau = (_NM_PER_M * moment_nm * radiation * _FREE_SURFACE
               / (4.0 * np.pi * p.density_kg_m3 * velocity ** 3 * distance))
    return _Phase(arrival_s=origin_s + distance / velocity, plateau=plateau, omega_e=omega_e)


def sampled_pulse(phase: _Phase, t: np.ndarray, fs: float) -> np.ndarray:
    """[n, S] mean velocity over each sampling interval of the Brune pulse u = A we^2 tau exp(-we tau).

    Averaging over the interval ending at each sample (an integrating digitiser) is the displacement
    difference / dt: exactly zero before the arrival, non-zero on the first sample after it, and
    the pulse area is preserved however short the pulse is compared with dt.
    """
    tau = np.maximum(t[None, :] - phase.arrival_s[:, None], 0.0)
    we = phase.omega_e[:, None]
    displacement = phase.plateau[:, None] * we ** 2 * tau * np.exp(-we * tau)
    return np.diff(displacement, axis=1, prepend=0.0) * fs


def coda_envelope(t: np.ndarray, phase: _Phase, peak: np.ndarray, coda_q: float, ratio: float) -> np.ndarray:
    """[n, S] amplitude envelope of the scattered coda behind one phase.

    Scattered energy builds up over a few pulse widths after the direct arrival and then decays as
    exp(-pi f t / Qc) at the dominant frequency f = omega_e / 2 pi: high-frequency codas die first.
    """
    tau = np.maximum(t[None, :] - phase.arrival_s[:, None], 0.0)
    rise = 4.0 / phase.omega_e[:, None] + 0.05
    decay = 2.0 * coda_q / phase.omega_e[:, None]
    return ratio * peak[:, None] * (1.0 - np.exp(-tau / rise)) * np.exp(-tau / decay)


def coda_carriers(phases: np.ndarray, omega_e: np.ndarray, fs: float, n_samples: int) -> np.ndarray:
    """[n, K, S] unit-RMS random-phase noise with the Brune velocity spectrum f / (1 + (f/fe)^2), peak at fe.

    Args:
        phases: [n, K, F] complex unit phasors, uniformly random (F = S // 2 + 1). A smooth
            amplitude spectrum with random phases sums ~1500 sinusoids, so it is Gaussian in time,
            and it needs one cheap integer draw per bin instead of two normals (the dominant cost).
        omega_e: [n, K] corner angular frequencies.
    """
    f = np.fft.rfftfreq(n_samples, 1.0 / fs)
    ratio = f[None, None, :] / (omega_e[:, :, None] / (2.0 * np.pi))
    shape = ratio / (1.0 + ratio ** 2)
    spectrum = shape / _random_phase_rms(shape, n_samples) * phases
    return np.fft.irfft(spectrum, n=n_samples)


def microseism_bins(n_samples: int, fs: float, microseism_hz: float) -> int:
    """How many low rfft bins hold the microseism peak (up to 6 log-widths above it)."""
    top_hz = microseism_hz * np.exp(6.0 * _MICROSEISM_LOG_WIDTH)
    return int(min(n_samples // 2 + 1, np.ceil(top_hz * n_samples / fs) + 1))


def station_noise(broadband_phases: np.ndarray, microseism_phases: np.ndarray, levels: np.ndarray, fs: float,
                  n_samples: int, microseism_hz: float) -> np.ndarray:
    """[n, 3, S] ground noise: white broadband plus the secondary microseism peak, each at its RMS level.

    Args:
        broadband_phases: [n, 3, F] random unit phasors of a flat spectrum.
        microseism_phases: [n, 3, L] random unit phasors of the L lowest bins (see
            microseism_bins): the microseism has no energy above them.
        levels: [n, 2] RMS (nm/s) of the microseism and broadband parts.
    """
    n_freq, n_low = broadband_phases.shape[-1], microseism_phases.shape[-1]
    f = np.fft.rfftfreq(n_samples, 1.0 / fs)
    flat = np.ones(n_freq)
    flat[0] = 0.0  # no DC offset: a seismometer is AC-coupled
    bump = np.exp(-0.5 * (np.log(np.maximum(f[:n_low], f[1]) / microseism_hz) / _MICROSEISM_LOG_WIDTH) ** 2)
    bump[0] = 0.0
    spectrum = levels[:, 1, None, None] * (flat / _random_phase_rms(flat, n_samples)) * broadband_phases
    spectrum[..., :n_low] += (levels[:, 0, None, None] * (bump / _random_phase_rms(bump, n_samples))
                              * microseism_phases)
    return np.fft.irfft(spectrum, n=n_samples)


# ---------------------------------------------------------------------- helpers
def _draw_phases(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniformly random unit phasors (complex, ``shape``)."""
    return _PHASORS[rng.integers(0, _PHASE_STEPS, shape, dtype=np.uint16)]


def _random_phase_rms(amplitude: np.ndarray, n_samples: int) -> np.ndarray:
    """RMS of irfft(amplitude x exp(i random phase)) ([..., F] -> [..., 1]): Parseval with every bin
    but DC appearing twice in the Hermitian spectrum and numpy's irfft dividing by S."""
    return np.sqrt(2.0 * np.sum(amplitude[..., 1:] ** 2, axis=-1, keepdims=True)) / n_samples


def _origin_time(u: float, latest_s_travel_s: float, window_s: float, p: QuakeParams) -> float:
    """Origin time after the window start: uniform in ``origin_delay_s``, moved earlier so the latest S
    arrival still lands ``tail_s`` before the window end where the configured range allows."""
    lo, hi = p.origin_delay_s
    hi = min(hi, window_s - p.tail_s - latest_s_travel_s)
    if hi < lo:
        return float(lo)
    return float(lo + u * (hi - lo))


def _site_terms(seed: int, station_ids: tuple[str, ...], p: QuakeParams) -> dict[str, np.ndarray]:
    """Fixed per-station noise levels (nm/s) and site amplification, [N] each, keyed by station id."""
    out = {"microseism": [], "broadband": [], "amplification": []}
    for node_id in station_ids:
        rng = episode_rng(seed, "earthquakes.site", node_key(node_id))
        out["microseism"].append(np.exp(rng.uniform(*np.log(p.microseism_nm_s))))
        out["broadband"].append(np.exp(rng.uniform(*np.log(p.broadband_noise_nm_s))))
        out["amplification"].append(np.exp(p.site_amplification_sigma * rng.standard_normal()))
    return {k: np.array(v, dtype=np.float64) for k, v in out.items()}


def _three_channel_modality(layout: SiteLayout) -> str:
    for name, spec in layout.modalities.items():
        if spec.channels == 3:
            return name
    found = ", ".join(f"{n} ({s.channels} ch)" for n, s in layout.modalities.items())
    raise NodeError(f"earthquakes: site {layout.site_id!r} has no 3-channel modality (E, N, Z seismometer); "
                    f"modalities: {found}")


def _positions_3d(layout: SiteLayout, node_ids: tuple[str, ...]) -> np.ndarray:
    """[N, 3] (x, y, elevation) in metres; 2-D layouts sit at elevation 0."""
    out = np.zeros((len(node_ids), 3))
    for i, node_id in enumerate(node_ids):
        position = layout.node(node_id).position
        out[i, :len(position)] = position
    return out

