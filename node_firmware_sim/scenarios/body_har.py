"""Body-worn IMUs (accelerometer, gyroscope, magnetometer) during everyday activities, RealWorld-HAR style.

Recording plan (as a HAR study is recorded): subjects come one after the other. Each records
``sessions_per_subject`` sessions in a row; a session puts the sensors on once and performs every
activity once, in an order drawn per (subject, session), one episode of ``episode_windows`` windows
each. So window order is subject order: subject k owns windows [k S, (k + 1) S), S =
``describe()["subject_windows"]`` (4 x 8 x 6 = 192 by default), and a temporal split holds out
whole later subjects (cross-subject evaluation, as RealWorld-HAR is reported); only after
``n_subjects`` subjects do ids repeat (new sessions of the same people). Signals are analytic in
the episode time, so consecutive windows of an episode join without a seam.

What makes it as hard as real data (each a parameter; 0 switches it off):

* subjects: height -> cadence, motion amplitude, sensor mounting, gyro bias, and a movement style
  (``style_sigma`` x ``STYLE``: arm and leg swing, bounce, impacts, trunk lean, knee lift, ...) from
  ``episode_rng(seed, "subject", id)``, the same in every episode of the subject;
* sensor displacement: each session the sensor sits elsewhere on its body part, turned about the
  segment's long axis (uniform +- ``displacement_deg``), tilted (``displacement_tilt_deg`` std) and
  slid along the limb (lever arm +- ``displacement_m``);
* orientation changes: with ``reorient_prob`` per episode and sensor it has been turned about the
  long axis (uniform, any angle) for that episode, as a phone re-pocketed or a strap pushed round;
* transitions: with ``transition_prob`` an episode (not a session's first) starts with the end of
  the previous activity inside its first window; the body changes over ``transition_s`` (posture
  slerped, specific force and heading cross-faded). The label is the activity that fills most of
  the window; extras name the other one;
* confusable activities: walking, stairs up and stairs down move their profiles
  (``CONFUSABLE``) towards the group mean by ``confusion`` (0: distinct textbook profiles, 1:
  identical), as real gait on stairs and on the level differs by less than its cadence spread.

Kinematics, one function per step, in a heading frame (X forward, Y left, Z up):

* gait phase: steps at the activity's cadence with a slow stride-to-stride wobble; legs and arms
  swing once per stride (two steps) in the sagittal plane, both legs together when jumping;
* centre of mass: vertical specific force g (1 + bounce harmonics) for walking and stairs, and
  half-sine ground-contact pulses with flight phases in between for running and jumping (their
  mean is g: over a stride the ground carries the body weight); forward and lateral oscillations;
* segment: orientation = posture (standing, sitting: thigh horizontal, lying: long axis
  horizontal) x swing pitch x trunk twist x mounting jitter; swing accelerations at the sensor's
  lever arm from the hip or shoulder; heel-strike transients on the legs; the spine and arm
  low-pass the centre-of-mass motion for chest, head and forearm;
* sensors: acc = R^T (specific force), gyro = segment angular velocity in the sensor frame,
  mag = R^T (Earth field seen from a slowly turning heading), plus white sensor noise.

Sensor frame: z along the segment towards the head (up when standing), x out of the body's front,
y to the left. Units: acc m/s^2, gyro rad/s, mag uT.

Ground truth per window: label = activity; extras subject_id, session (the subject's session
number), transition_share (share of the window in the other activity, 0 when none), and in
transition windows other_label (that activity; datasets hold NaN elsewhere).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.signal import lfilter
from scipy.spatial.transform import Rotation

from node_firmware_sim.errors import NodeError
from node_firmware_sim.scenarios.base import (
    GroundTruth,
    SourceWindow,
    check_window_index,
    episode_rng,
    node_key,
    site_window_s,
)
from spar_wire.site_layout import NodeSpec, SiteLayout

_IMPACT_HZ = 15.0  # ringing frequency of soft tissue after a heel strike
_IMPACT_DECAY_S = 0.025
_WARMUP_S = 1.0  # samples computed before the window so the low-pass filters have settled


@dataclass(frozen=True)
class ActivityProfile:
    """How one activity moves the body. Angles in rad, accelerations in m/s^2 unless named in g."""

    name: str
    posture: str  # "stand", "sit" or "lie"
    cadence_hz: float = 0.0  # step frequency (trunk bounce); 0 = static activity
    cadence_range_hz: tuple[float, float] = (0.0, 0.0)  # drawn cadences are clipped to this range
    duty: float = 1.0  # ground-contact fraction of a step; < 1: flight phases and contact pulses
    bounce: float = 0.0  # vertical specific force at the step frequency, fraction of g (duty = 1)
    bounce2: float = 0.0  # its second harmonic, fraction of g
    asymmetry_rad: float = 0.0  # phase of the second harmonic: push-off (up) vs landing (down) on stairs
    forward: float = 0.0  # forward CoM acceleration at the step frequency
    lateral: float = 0.0  # side-to-side CoM acceleration at the stride frequency
    leg_swing: float = 0.0  # thigh pitch amplitude
    arm_swing: float = 0.0  # forearm pitch amplitude about the shoulder
    legs_in_phase: bool = False  # jumping: both legs flex once per jump
    impact_g: float = 0.0  # heel-strike transient at the shin
    trunk_lean: float = 0.0  # static forward lean of the trunk
    thigh_bias: float = 0.0  # static thigh pitch (negative: knee raised, as on stairs)
    arm_bias: float = 0.0  # static forearm pitch (about -pi/2: elbow bent, forearm forward)
    twist: float = 0.0  # pelvis rotation about the long axis at the stride frequency
    sway: float = 0.005  # postural sway of the whole body
    turn_rate: float = 0.03  # std of the heading drift (rad/s)

    @property
    def dynamic(self) -> bool:
        return self.cadence_hz > 0


ACTIVITIES: tuple[ActivityProfile, ...] = (
    ActivityProfile("walk", "stand", 1.8, (1.5, 2.1), bounce=0.25, bounce2=0.08, forward=1.5, lateral=0.8,
                    leg_swing=0.4, arm_swing=0.3, impact_g=0.4, trunk_lean=0.03, twist=0.08,
                    turn_rate=0.05),
    ActivityProfile("run", "stand", 2.8, (2.4, 3.2), duty=0.45, forward=3.0, lateral=1.2, leg_swing=0.55,
                    arm_swing=0.45, impact_g=1.0, trunk_lean=0.1, arm_bias=-1.3, twist=0.12,
                    turn_rate=0.05),
    ActivityProfile("sit", "sit", trunk_lean=-0.1, sway=0.004, turn_rate=0.005),
    ActivityProfile("stand", "stand", sway=0.01, turn_rate=0.01),
    ActivityProfile("stairs_up", "stand", 1.5, (1.2, 1.8), bounce=0.2, bounce2=0.12, asymmetry_rad=1.0,
                    forward=1.0, lateral=0.7, leg_swing=0.55, arm_swing=0.25, impact_g=0.25,
                    trunk_lean=0.15, thigh_bias=-0.35, twist=0.06, turn_rate=0.02),
    ActivityProfile("stairs_down", "stand", 1.6, (1.3, 1.9), bounce=0.3, bounce2=0.15, asymmetry_rad=-1.0,
                    forward=1.0, lateral=0.8, leg_swing=0.4, arm_swing=0.25, impact_g=0.7,
                    trunk_lean=-0.05, thigh_bias=-0.15, twist=0.06, turn_rate=0.02),
    ActivityProfile("lie", "lie", sway=0.002, turn_rate=0.0),
    ActivityProfile("jump", "stand", 2.0, (1.7, 2.3), duty=0.5, forward=0.4, lateral=0.2, leg_swing=0.35,
                    arm_swing=0.5, legs_in_phase=True, impact_g=0.8, trunk_lean=0.05, turn_rate=0.01),
)


# Activities whose profiles ``confusion`` pulls towards their group mean, and the fields it pulls.
CONFUSABLE: tuple[tuple[str, ...], ...] = (("walk", "stairs_up", "stairs_down"),)
_BLENDED = ("cadence_hz", "bounce", "bounce2", "asymmetry_rad", "forward", "lateral", "leg_swing", "arm_swing",
            "impact_g", "trunk_lean", "thigh_bias", "arm_bias", "twist", "turn_rate")
# A subject's movement style, drawn once per subject (x style_sigma): "mul" scales the activity's
# value by exp(sigma z), "add" adds sigma z (rad). Sizes: the person-to-person spread of gait.
STYLE: dict[str, tuple[str, float]] = {
    "leg_swing": ("mul", 0.15), "arm_swing": ("mul", 0.35), "bounce": ("mul", 0.25), "bounce2": ("mul", 0.3),
    "forward": ("mul", 0.25), "lateral": ("mul", 0.3), "impact_g": ("mul", 0.35), "twist": ("mul", 0.35),
    "trunk_lean": ("add", 0.06), "thigh_bias": ("add", 0.08), "arm_bias": ("add", 0.2),
}
_STYLE_CADENCE = 0.06  # relative std of a subject's cadence beyond what height explains (x style_sigma)


@lru_cache(maxsize=16)
def confusable_profiles(confusion: float) -> tuple[ActivityProfile, ...]:
    """ACTIVITIES with each CONFUSABLE group's _BLENDED fields moved towards the group mean by
    ``confusion`` (0: ACTIVITIES unchanged, 1: the group's members move alike)."""
    out = list(ACTIVITIES)
    names = [a.name for a in ACTIVITIES]
    for group in CONFUSABLE:
        members = [names.index(n) for n in group]
        changes: dict[int, dict[str, Any]] = {i: {} for i in members}
        for name in (*_BLENDED, "cadence_range_hz"):
            values = np.array([getattr(ACTIVITIES[i], name) for i in members], dtype=float)
            mixed = (1 - confusion) * values + confusion * values.mean(axis=0)
            for i, v in zip(members, mixed, strict=True):
                changes[i][name] = tuple(float(x) for x in v) if v.ndim else float(v)
        for i in members:
            out[i] = replace(ACTIVITIES[i], **changes[i])
    return tuple(out)


def styled_profile(profile: ActivityProfile, style: dict[str, float]) -> ActivityProfile:
    """``profile`` as one subject moves: STYLE fields scaled or offset by the subject's ``style``
    (field -> sigma z, already times style_sigma)."""
    changes = {}
    for name, (kind, _) in STYLE.items():
        value = getattr(profile, name)
        changes[name] = value * float(np.exp(style[name])) if kind == "mul" else value + style[name]
    return replace(profile, **changes)


@dataclass(frozen=True)
class SegmentProfile:
    """How a body segment carrying a sensor moves (see ActivityProfile for the activity's amplitudes)."""

    kind: str  # "trunk", "thigh", "shin" or "arm": which static bias of the activity applies
    anchor: tuple[float, float, float]  # nominal position (m, body frame) to match unknown node ids
    leg_gain: float = 0.0  # swing amplitude / activity leg swing
    arm_gain: float = 0.0  # swing amplitude / activity arm swing
    phase_rad: float = 0.0  # swing phase relative to the ipsilateral thigh
    lever_m: float = 0.0  # distance from the swing pivot (hip, shoulder) to the sensor
    lowpass_hz: float | None = None  # spine/arm filtering of the centre-of-mass motion
    impact_gain: float = 0.0  # share of the heel-strike transient
    sit_pitch: float = 0.0  # segment pitch when sitting
    twist_gain: float = 0.0  # share of the pelvis rotation


SEGMENTS: dict[str, SegmentProfile] = {
    "waist": SegmentProfile("trunk", (0.15, 0.0, 0.05), impact_gain=0.3, twist_gain=1.0),
    "chest": SegmentProfile("trunk", (0.0, 0.10, 0.40), lowpass_hz=4.0, impact_gain=0.15, twist_gain=0.6),
    "head": SegmentProfile("trunk", (0.0, 0.0, 0.70), lowpass_hz=2.5, impact_gain=0.08, twist_gain=0.3),
    "thigh": SegmentProfile("thigh", (0.12, 0.05, -0.25), leg_gain=1.0, lever_m=0.2, impact_gain=0.6,
                            sit_pitch=-np.pi / 2, twist_gain=0.5),
    # the shin hangs from a moving knee; one pendulum with an effective lever stands in for both links
    "shin": SegmentProfile("shin", (0.10, 0.05, -0.60), leg_gain=1.4, phase_rad=-0.6, lever_m=0.3,
                           impact_gain=1.0, twist_gain=0.3),
    "forearm": SegmentProfile("arm", (0.25, 0.05, 0.05), arm_gain=1.0, phase_rad=np.pi, lever_m=0.45,
                              lowpass_hz=3.0, impact_gain=0.1, sit_pitch=-np.pi / 2, twist_gain=0.3),
}
GENERIC_SEGMENT = SegmentProfile("trunk", (0.0, 0.0, 0.0), leg_gain=0.1, lever_m=0.1, impact_gain=0.2,
                                 twist_gain=0.5)
_ALIASES = {"wrist": "forearm", "arm": "forearm", "hand": "forearm", "ankle": "shin", "shank": "shin",
            "leg": "thigh", "pocket": "thigh", "hip": "waist", "pelvis": "waist", "belt": "waist",
            "torso": "chest", "sternum": "chest", "forehead": "head"}


@dataclass(frozen=True)
class BodyHarParams:
    """Scenario constants (SI units; field in uT)."""

    episode_windows: int = 6
    n_subjects: int = 15  # RealWorld-HAR's 15; more windows than n_subjects subjects hold repeat the people
    sessions_per_subject: int = 4  # 4 x 8 activities x 6 windows: 192 windows (12.8 min) per subject
    style_sigma: float = 1.0  # scale of the subjects' movement styles (STYLE)
    confusion: float = 0.5  # walk / stairs up / stairs down profiles this far towards their mean
    displacement_deg: float = 35.0  # per session: sensor turned about the segment's long axis, uniform +-
    displacement_tilt_deg: float = 4.0  # per session: std of its tilt off the long axis
    displacement_m: float = 0.06  # per session: slid along the limb, lever arm uniform +-
    reorient_prob: float = 0.15  # per episode and sensor: turned about the long axis by any angle
    transition_prob: float = 0.5  # an episode after a session's first starts with the end of the previous
    transition_s: float = 1.5  # duration of a transition (centred on a switch time inside the first window)
    gravity_m_s2: float = 9.81
    field_ut: float = 50.0
    inclination_deg: float = 60.0  # field dips below the horizon towards magnetic north
    height_m: tuple[float, float] = (1.72, 0.09)  # mean, std of subject height
    amplitude_sigma: float = 0.12  # relative std of a subject's motion amplitude
    cadence_jitter: float = 0.04  # relative std of an episode's cadence around the subject's own
    mount_jitter_deg: float = 6.0  # std of the sensor mounting misalignment per subject and segment
    acc_noise_m_s2: float = 0.03
    gyro_noise_rad_s: float = 0.01
    gyro_bias_rad_s: float = 0.01  # std of the constant per-subject-and-segment gyro bias
    mag_noise_ut: float = 0.4
    noise_scale: float = 1.0  # 0: noise-free (tests)

    def __post_init__(self) -> None:
        if self.episode_windows < 1 or self.n_subjects < 1 or self.sessions_per_subject < 1:
            raise NodeError("body_har: episode_windows, n_subjects and sessions_per_subject must be >= 1")
        if not (0 <= self.confusion <= 1 and 0 <= self.reorient_prob <= 1 and 0 <= self.transition_prob <= 1):
            raise NodeError("body_har: confusion, reorient_prob and transition_prob must be in [0, 1]")
        if min(self.style_sigma, self.displacement_deg, self.displacement_tilt_deg, self.displacement_m,
               self.transition_s) < 0:
            raise NodeError("body_har: style_sigma, displacement_* and transition_s must be >= 0")
        if not (self.gravity_m_s2 > 0 and self.field_ut > 0 and self.noise_scale >= 0):
            raise NodeError("body_har: gravity_m_s2 and field_ut must be > 0, noise_scale >= 0")


@dataclass(frozen=True)
class _Subject:
    subject_id: int
    cadence_factor: float  # taller people step more slowly (pendulum legs: f ~ 1 / sqrt(length))
    amplitude: float
    style: dict[str, float]  # STYLE field -> sigma z (times style_sigma)


@dataclass(frozen=True)
class _Episode:
    subject: _Subject
    session: int  # the subject's session number
    slot: int  # place in the session (0: the sensors were just put on)
    activity: int
    profile: ActivityProfile  # the activity as this subject moves (confusion, style)
    transition_at: float | None  # switch time (s) inside the first window from the previous episode
    cadence_hz: float
    amplitude: float
    phase0: float
    wobble: np.ndarray  # [3, 3] (amplitude rad, frequency Hz, phase) of the gait-phase wobble
    sway: np.ndarray  # [3, 3] (amplitude rad, frequency Hz, phase) of postural sway
    heading0: float
    turn_rate: float
    lie_roll: float  # rotation about the long axis when lying: 0 supine, pi prone, +-pi/2 on a side


@dataclass(frozen=True)
class _Kinematics:
    """Per-sample sensor-frame motion of one segment on one time grid (S samples)."""

    specific_force: np.ndarray  # [S, 3] m/s^2
    angular_velocity: np.ndarray  # [S, 3] rad/s
    field: np.ndarray  # [S, 3] uT
    rotation: np.ndarray  # [S, 3, 3] sensor -> heading frame
    force_heading: np.ndarray  # [S, 3] specific force in the heading frame
    heading: np.ndarray  # [S] rad


class BodyHarScenario:
    """Six-IMU human activity recognition windows; label = index into ``class_names``."""

    name = "body_har"
    class_names = tuple(a.name for a in ACTIVITIES)

    def __init__(self, layout: SiteLayout, seed: int = 0, *, episode_windows: int = 6, n_subjects: int = 15,
                 noise_scale: float = 1.0, **physics: Any):
        known = {f.name for f in fields(BodyHarParams)}
        unknown = sorted(set(physics) - known)
        if unknown:
            raise NodeError(f"body_har: unknown parameter(s) {unknown}; known: {', '.join(sorted(known))}")
        self.params = BodyHarParams(episode_windows=episode_windows, n_subjects=n_subjects,
                                    noise_scale=noise_scale,
                                    **{k: tuple(v) if isinstance(v, list) else v for k, v in physics.items()})
        self.layout = layout
        self.seed = int(seed)
        self.window_s = site_window_s(layout)
        self.sensor_kinds = {name: _sensor_kind(name, spec.channels)
                             for name, spec in layout.modalities.items()}
        self.segments = {n.id: segment_profile(n, layout.frame) for n in layout.nodes}
        if self.params.transition_s >= self.window_s:
            raise NodeError(f"body_har: transition_s must be shorter than the {self.window_s:g} s window")
        self.profiles = confusable_profiles(float(self.params.confusion))

    @property
    def subject_episodes(self) -> int:
        """Consecutive episodes of one subject."""
        return self.params.sessions_per_subject * len(ACTIVITIES)

    # ------------------------------------------------------------------ public API
    def episode_of(self, index: int) -> tuple[int, int]:
        """(episode, window within the episode) of window ``index``."""
        return divmod(check_window_index(index), self.params.episode_windows)

    def window(self, index: int, node_ids: tuple[str, ...] | None = None) -> SourceWindow:
        """Window ``index`` for ``node_ids`` (default: all nodes). Deterministic."""
        episode_index, offset = self.episode_of(index)
        episode = self._episode(episode_index)
        previous = self._episode(episode_index - 1) if offset == 0 and episode.transition_at is not None else None
        nodes = self.layout.nodes if node_ids is None else tuple(self._node(n) for n in node_ids)
        signals: dict[tuple[str, str], np.ndarray] = {}
        for node in nodes:
            signals.update(self._node_signals(index, offset, episode_index, episode, previous, node))
        label, extras = episode.activity, {"subject_id": float(episode.subject.subject_id),
                                           "session": float(episode.session), "transition_share": 0.0}
        if previous is not None:
            share_new = 1.0 - episode.transition_at / self.window_s  # the ramp is symmetric about the switch
            other = previous.activity
            if share_new < 0.5:
                label, other = previous.activity, episode.activity
            extras.update(transition_share=min(share_new, 1.0 - share_new), other_label=float(other))
        return SourceWindow(index=index, start_s=index * self.window_s, signals=signals,
                            truth=GroundTruth(label=label, extras=extras))

    def describe(self) -> dict[str, Any]:
        """JSON-able parameters for manifests."""
        return {"name": self.name, "seed": self.seed, "window_s": self.window_s,
                "class_names": list(self.class_names),
                "units": {"acc": "m/s^2", "gyro": "rad/s", "mag": "uT"},
                "modalities": dict(self.sensor_kinds),
                "subject_windows": self.subject_episodes * self.params.episode_windows,
                "cadence_range_hz": {a.name: list(a.cadence_range_hz) for a in self.profiles},
                **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.params).items()}}

    # ------------------------------------------------------------------ internals
    def _node(self, node_id: str) -> NodeSpec:
        for node in self.layout.nodes:
            if node.id == node_id:
                return node
        raise NodeError(f"body_har: no node {node_id!r} in site {self.layout.site_id!r}")

    def _subject(self, subject_id: int) -> _Subject:
        p = self.params
        rng = episode_rng(self.seed, "subject", subject_id)
        height = max(1.4, p.height_m[0] + p.height_m[1] * rng.standard_normal())
        amplitude = float(np.clip(1.0 + p.amplitude_sigma * rng.standard_normal(), 0.6, 1.4))
        z = rng.standard_normal(len(STYLE) + 1)  # always drawn: style_sigma only scales them
        style = {name: p.style_sigma * sigma * float(zi)
                 for (name, (_, sigma)), zi in zip(STYLE.items(), z, strict=False)}
        cadence = float((height / p.height_m[0]) ** -0.5 * np.exp(p.style_sigma * _STYLE_CADENCE * z[-1]))
        return _Subject(subject_id, cadence, amplitude, style)

    def _schedule(self, episode: int) -> tuple[int, int, int, int]:
        """(subject id, session, slot in the session, activity) of an episode (see the module doc)."""
        p, n = self.params, len(ACTIVITIES)
        block, within = divmod(episode, self.subject_episodes)
        subject_id, rounds = block % p.n_subjects, block // p.n_subjects
        session = rounds * p.sessions_per_subject + within // n
        slot = within % n
        order = episode_rng(self.seed, "body_har.session", subject_id, session).permutation(n)
        return subject_id, session, slot, int(order[slot])

    def _episode(self, episode: int) -> _Episode:
        p = self.params
        rng = episode_rng(self.seed, "body_har", episode)
        subject_id, session, slot, activity = self._schedule(episode)
        subject = self._subject(subject_id)
        profile = styled_profile(self.profiles[activity], subject.style)
        jitter = 1.0 + p.cadence_jitter * rng.standard_normal()
        cadence = profile.cadence_hz * subject.cadence_factor * jitter
        cadence = float(np.clip(cadence, *profile.cadence_range_hz))
        wobble = np.stack([rng.uniform(0.05, 0.15, 3), rng.uniform(0.05, 0.3, 3),
                           rng.uniform(0, 2 * np.pi, 3)])
        sway = np.stack([profile.sway * rng.uniform(0.5, 1.0, 3), rng.uniform(0.1, 0.6, 3),
                         rng.uniform(0, 2 * np.pi, 3)])
        episode_amplitude = float(np.clip(1 + 0.05 * rng.standard_normal(), 0.8, 1.2))
        phase0, heading0 = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))
        turn_rate = float(profile.turn_rate * rng.standard_normal())
        lie_roll = float(rng.integers(4) * np.pi / 2 + 0.15 * rng.standard_normal())
        # drawn whatever the parameters, so switching one effect off leaves the others as they were
        transition, switch = rng.random() < p.transition_prob, rng.uniform(0.0, 1.0)
        half = 0.5 * p.transition_s
        transition_at = half + switch * (self.window_s - 2 * half) if transition and slot > 0 else None
        return _Episode(subject=subject, session=session, slot=slot, activity=activity, profile=profile,
                        transition_at=transition_at, cadence_hz=cadence,
                        amplitude=subject.amplitude * episode_amplitude, phase0=phase0, wobble=wobble.T,
                        sway=sway.T, heading0=heading0, turn_rate=turn_rate, lie_roll=lie_roll)

    def _mounting(self, episode_index: int, episode: _Episode, node_id: str) -> tuple[np.ndarray, np.ndarray, float]:
        """Mounting rotation [3, 3] (sensor -> segment), gyro bias [3] and lever-arm change (m) of a
        sensor in an episode: the subject's own misalignment, then the session's displacement, then
        the episode's re-orientation (if any)."""
        p = self.params
        subject_id = episode.subject.subject_id
        rng = episode_rng(self.seed, "subject", subject_id, node_key(node_id))
        axis = rng.standard_normal(3)
        angle = np.deg2rad(p.mount_jitter_deg) * rng.standard_normal()
        bias = p.gyro_bias_rad_s * rng.standard_normal(3)
        mount = axis_angle(axis, angle)
        placed = episode_rng(self.seed, "body_har.displacement", subject_id, episode.session, node_key(node_id))
        turn, tilt_axis, tilt, slide = (placed.uniform(-1, 1), placed.uniform(0, 2 * np.pi),
                                        placed.standard_normal(), placed.uniform(-1, 1))
        tilt_rotation = axis_angle(np.array([np.cos(tilt_axis), np.sin(tilt_axis), 0.0]),
                                   np.deg2rad(p.displacement_tilt_deg) * tilt)
        mount = rot_z(np.array(np.deg2rad(p.displacement_deg) * turn)) @ tilt_rotation @ mount
        turned = episode_rng(self.seed, "body_har.reorient", episode_index, node_key(node_id))
        if turned.random() < p.reorient_prob:
            mount = rot_z(np.array(turned.uniform(-np.pi, np.pi))) @ mount
        return mount, bias, p.displacement_m * slide

    def _node_signals(self, index: int, offset: int, episode_index: int, episode: _Episode,
                      previous: _Episode | None, node: NodeSpec) -> dict[tuple[str, str], np.ndarray]:
        p = self.params
        mount, bias, slide = self._mounting(episode_index, episode, node.id)
        segment = self.segments[node.id]
        if segment.lever_m > 0:
            segment = replace(segment, lever_m=max(0.02, segment.lever_m + slide))
        noise = episode_rng(self.seed, "body_har.sensor", index, node_key(node.id))
        cache: dict[tuple[float, int], _Kinematics] = {}
        out = {}
        for modality in node.modalities:
            cfg = self.layout.modalities[modality].features
            grid = (float(cfg.sample_rate_hz), cfg.window_samples)
            if grid not in cache:
                t = offset * self.window_s + np.arange(grid[1]) / grid[0]
                kin = segment_kinematics(t, grid[0], episode, segment, mount, p)
                if previous is not None:  # the previous activity goes on until the switch, in its own time
                    before_mount, _, _ = self._mounting(episode_index - 1, previous, node.id)
                    before = segment_kinematics(t + p.episode_windows * self.window_s, grid[0], previous, segment,
                                                before_mount, p)
                    w, w_dot = transition_weight(t, episode.transition_at, p.transition_s)
                    kin = blend_kinematics(before, kin, w, w_dot, p)
                cache[grid] = kin
            kin, kind = cache[grid], self.sensor_kinds[modality]
            # one draw per modality in the node's fixed modality order keeps every stream reproducible
            white = noise.standard_normal((grid[1], 3))
            if kind == "acc":
                samples = kin.specific_force + p.noise_scale * p.acc_noise_m_s2 * white
            elif kind == "gyro":
                samples = kin.angular_velocity + p.noise_scale * (bias + p.gyro_noise_rad_s * white)
            else:
                samples = kin.field + p.noise_scale * p.mag_noise_ut * white
            out[(node.id, modality)] = np.ascontiguousarray(samples.T)
        return out


# ---------------------------------------------------------------------- physical steps
def gait_phase(t: np.ndarray, cadence_hz: float, phase0: float,
               wobble: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step phase phi (rad) and its first two time derivatives, [S] each.

    phi = 2 pi f t + phi0 + sum_k a_k sin(2 pi nu_k t + p_k): the slow wobble is the stride-to-stride
    variability of real gait; it is analytic, so the derivatives (for gyro and lever arms) are exact.
    """
    a, nu, p = (wobble[:, i, None] for i in range(3))
    w = 2 * np.pi * nu
    arg = w * t[None, :] + p
    phi = 2 * np.pi * cadence_hz * t + phase0 + (a * np.sin(arg)).sum(axis=0)
    phi_dot = 2 * np.pi * cadence_hz + (a * w * np.cos(arg)).sum(axis=0)
    phi_ddot = -(a * w ** 2 * np.sin(arg)).sum(axis=0)
    return phi, phi_dot, phi_ddot


def com_specific_force(phi: np.ndarray, activity: ActivityProfile, amplitude: float, g: float) -> np.ndarray:
    """[S, 3] specific force (acceleration minus gravity) of the centre of mass in the heading frame.

    Walking and stairs keep a foot on the ground: vertical = g (1 + bounce cos phi + bounce2
    cos(2 phi + asymmetry)). Running and jumping alternate contact and flight: half-sine contact
    pulses of height g pi / (2 duty) and zero in flight (free fall), so the mean stays g.
    """
    out = np.zeros((phi.size, 3))
    if not activity.dynamic:
        out[:, 2] = g
        return out
    if activity.duty < 1.0:
        frac = np.mod(phi, 2 * np.pi) / (2 * np.pi)
        pulse = np.where(frac < activity.duty, np.sin(np.pi * np.minimum(frac / activity.duty, 1.0)), 0.0)
        vertical = g * np.pi / (2 * activity.duty) * pulse
        out[:, 2] = g + amplitude * (vertical - g)
    else:
        out[:, 2] = g * (1.0 + amplitude * (activity.bounce * np.cos(phi)
                                            + activity.bounce2 * np.cos(2 * phi + activity.asymmetry_rad)))
    out[:, 0] = amplitude * activity.forward * np.sin(phi + np.pi / 4)
    out[:, 1] = amplitude * activity.lateral * np.sin(0.5 * phi)  # one sway per stride (two steps)
    return out


def impact_transient(phase: np.ndarray, phase_rate: float, gain: float) -> np.ndarray:
    """[S] vertical ringing after each heel strike (phase crossing a multiple of 2 pi), m/s^2 per unit gain.

    A decaying 15 Hz oscillation: the soft tissue around the sensor rings after the foot hits the
    ground; it starts at zero, so the signal has no jump.
    """
    if gain == 0.0 or phase_rate <= 0.0:
        return np.zeros(phase.size)
    since = np.mod(phase, 2 * np.pi) / phase_rate
    return gain * np.exp(-since / _IMPACT_DECAY_S) * np.sin(2 * np.pi * _IMPACT_HZ * since)


def swing_angle(x: np.ndarray, x_dot: np.ndarray, x_ddot: np.ndarray, amplitude: float,
                harmonic: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Swing pitch theta = A (sin x + h sin(2x + 0.8)) and its time derivatives, [S] each."""
    s1, c1 = np.sin(x), np.cos(x)
    s2, c2 = np.sin(2 * x + 0.8), np.cos(2 * x + 0.8)
    d1 = amplitude * (c1 + 2 * harmonic * c2)  # d theta / dx
    d2 = -amplitude * (s1 + 4 * harmonic * s2)  # d2 theta / dx2
    return amplitude * (s1 + harmonic * s2), d1 * x_dot, d2 * x_dot ** 2 + d1 * x_ddot


def postural_sway(t: np.ndarray, sway: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whole-body sway pitch and its rate, [S] each, from [3, 3] (amplitude, frequency, phase) rows.

    Its lever-arm accelerations (~0.01 m/s^2) are below the sensor noise and left out.
    """
    a, nu, p = (sway[:, i, None] for i in range(3))
    arg = 2 * np.pi * nu * t[None, :] + p
    return (a * np.sin(arg)).sum(axis=0), (a * 2 * np.pi * nu * np.cos(arg)).sum(axis=0)


def lever_acceleration(theta: np.ndarray, theta_dot: np.ndarray, theta_ddot: np.ndarray,
                       lever_m: float) -> np.ndarray:
    """[S, 3] acceleration of a point ``lever_m`` below a pivot on a segment pitched by theta about Y.

    Position p = L (-sin theta, 0, -cos theta); p'' has the tangential (L theta'') and centripetal
    (L theta'^2) parts.
    """
    s, c = np.sin(theta), np.cos(theta)
    out = np.zeros((theta.size, 3))
    out[:, 0] = -lever_m * (theta_ddot * c - theta_dot ** 2 * s)
    out[:, 2] = lever_m * (theta_ddot * s + theta_dot ** 2 * c)
    return out


def lowpass(x: np.ndarray, fs: float, cutoff_hz: float | None) -> np.ndarray:
    """First-order low-pass along axis 0 (bilinear transform); None passes ``x`` through."""
    if cutoff_hz is None:
        return x
    k = np.tan(np.pi * min(cutoff_hz, 0.45 * fs) / fs)
    b = np.array([k, k]) / (1 + k)
    a = np.array([1.0, (k - 1) / (1 + k)])
    return lfilter(b, a, x, axis=0)


def earth_field(heading: np.ndarray, field_ut: float, inclination_deg: float) -> np.ndarray:
    """[S, 3] Earth field in the heading frame for a heading (rad, CCW from east) per sample.

    World (E, N, U): B (0, cos I, -sin I) -- north and dipping down in the northern hemisphere.
    """
    inc = np.deg2rad(inclination_deg)
    north, down = field_ut * np.cos(inc), field_ut * np.sin(inc)
    return np.stack([north * np.sin(heading), north * np.cos(heading), np.full(heading.shape, -down)], axis=1)


def segment_kinematics(t: np.ndarray, fs: float, episode: _Episode, segment: SegmentProfile,
                       mount: np.ndarray, p: BodyHarParams) -> _Kinematics:
    """Sensor-frame specific force, angular velocity and field of one segment at episode times ``t`` [S]."""
    activity = episode.profile
    warm = int(round(_WARMUP_S * fs))
    te = np.concatenate([t[0] - np.arange(warm, 0, -1) / fs, t])  # settle the low-pass filters
    phi, phi_dot, phi_ddot = gait_phase(te, episode.cadence_hz, episode.phase0, episode.wobble)
    stride = 1.0 if activity.legs_in_phase else 0.5
    x = stride * phi + segment.phase_rad
    amp = episode.amplitude * (activity.leg_swing * segment.leg_gain + activity.arm_swing * segment.arm_gain)
    harmonic = 0.2 if segment.leg_gain > 0 else 0.0
    theta, theta_dot, theta_ddot = swing_angle(x, stride * phi_dot, stride * phi_ddot, amp, harmonic)
    sway, sway_dot = postural_sway(te, episode.sway)
    static = _static_pitch(activity, segment)
    pitch, pitch_dot = static + theta + sway, theta_dot + sway_dot
    twist_amp = episode.amplitude * activity.twist * segment.twist_gain
    twist = twist_amp * np.cos(0.5 * phi)  # the pelvis turns with the swinging leg, once per stride
    twist_dot = -0.5 * twist_amp * np.sin(0.5 * phi) * phi_dot

    posture = _posture_rotation(activity.posture, episode.lie_roll)
    g = p.gravity_m_s2
    com = com_specific_force(phi, activity, episode.amplitude, g)
    com[:, 2] -= g  # filter only the dynamic part: gravity passes any low-pass unchanged
    force = lowpass(com, fs, segment.lowpass_hz)
    force[:, 2] += g
    force += lever_acceleration(pitch, pitch_dot, theta_ddot, segment.lever_m) @ posture.T
    # a leg sensor rings after its own foot strikes (once per stride), the trunk after every step
    on_leg = segment.kind in ("thigh", "shin")
    strike_phase, strike_rate = (stride * phi, stride) if on_leg else (phi, 1.0)
    force[:, 2] += impact_transient(strike_phase, strike_rate * 2 * np.pi * episode.cadence_hz,
                                    episode.amplitude * activity.impact_g * g * segment.impact_gain)

    rotation = posture @ rot_y(pitch) @ rot_z(twist) @ mount  # [S, 3, 3] sensor -> heading frame
    heading = episode.heading0 + episode.turn_rate * te
    field = earth_field(heading, p.field_ut, p.inclination_deg)
    # body rates: pitch about the segment's Y (before twist), twist about its long axis, turning about up
    body = np.stack([np.zeros_like(pitch_dot), pitch_dot, np.zeros_like(pitch_dot)], axis=1)
    body = np.einsum("sji,sj->si", rot_z(twist), body)
    body[:, 2] += twist_dot
    omega = body @ mount + np.einsum("sji,j->si", rotation, np.array([0.0, 0.0, episode.turn_rate]))
    sensor = slice(warm, None)
    return _Kinematics(specific_force=np.einsum("sji,sj->si", rotation, force)[sensor],
                       angular_velocity=omega[sensor],
                       field=np.einsum("sji,sj->si", rotation, field)[sensor],
                       rotation=rotation[sensor], force_heading=force[sensor], heading=heading[sensor])


def transition_weight(t: np.ndarray, switch_s: float, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Share w [S] of the new activity at times ``t`` (s, same origin as ``switch_s``): a smoothstep
    from 0 to 1 over ``duration_s`` centred on the switch; and its rate dw/dt."""
    if duration_s <= 0:
        return (t >= switch_s).astype(float), np.zeros(t.size)
    u = np.clip((t - switch_s) / duration_s + 0.5, 0.0, 1.0)
    return u * u * (3 - 2 * u), 6 * u * (1 - u) / duration_s


def blend_kinematics(a: _Kinematics, b: _Kinematics, w: np.ndarray, w_dot: np.ndarray,
                     p: BodyHarParams) -> _Kinematics:
    """Activity ``a`` turning into ``b`` with share ``w`` [S] of ``b``: the sensor orientation is
    slerped (R = R_a exp(w log(R_a^T R_b))), specific force (gravity common to both) and heading are
    cross-faded, so |gravity| and |field| hold through the change. Angular velocity: both rates seen
    from the blended frame plus the turn of the slerp itself, w' log(R_a^T R_b) (the slow change of
    the relative rotation during the ramp is left out)."""
    relative = np.einsum("sji,sjk->sik", a.rotation, b.rotation)  # R_a^T R_b
    axis_angle_vec = _unwrap_rotvec(Rotation.from_matrix(relative).as_rotvec())
    step = Rotation.from_rotvec(w[:, None] * axis_angle_vec).as_matrix()  # [S, 3, 3]
    rest = Rotation.from_rotvec((1.0 - w)[:, None] * axis_angle_vec).as_matrix()  # R^T R_b
    rotation = a.rotation @ step
    force = (1 - w)[:, None] * a.force_heading + w[:, None] * b.force_heading
    turn = np.angle(np.exp(1j * (b.heading - a.heading)))
    heading = a.heading + w * turn
    field = earth_field(heading, p.field_ut, p.inclination_deg)
    omega = (np.einsum("sji,sj->si", step, (1 - w)[:, None] * a.angular_velocity)
             + np.einsum("sij,sj->si", rest, w[:, None] * b.angular_velocity)
             + w_dot[:, None] * axis_angle_vec
             + np.einsum("sji,j->si", rotation, np.array([0.0, 0.0, 1.0])) * (w_dot * turn)[:, None])
    return _Kinematics(specific_force=np.einsum("sji,sj->si", rotation, force), angular_velocity=omega,
                       field=np.einsum("sji,sj->si", rotation, field), rotation=rotation, force_heading=force,
                       heading=heading)


def _unwrap_rotvec(v: np.ndarray) -> np.ndarray:
    """[S, 3] rotation vectors made continuous in time: near 180 degrees a rotation has two
    vectors (v and -v (2 pi - |v|) / |v|); keep the one nearer the previous sample's."""
    out = v.copy()
    for i in range(1, len(out)):
        angle = np.linalg.norm(out[i])
        if angle > 1e-9:
            other = -out[i] / angle * (2 * np.pi - angle)
            if np.linalg.norm(other - out[i - 1]) < np.linalg.norm(out[i] - out[i - 1]):
                out[i] = other
    return out


# ---------------------------------------------------------------------- helpers
def rot_y(angle: np.ndarray) -> np.ndarray:
    """[S, 3, 3] rotations about Y (positive tilts the +Z axis towards +X)."""
    c, s = np.cos(angle), np.sin(angle)
    out = np.zeros(np.shape(angle) + (3, 3))
    out[..., 0, 0], out[..., 0, 2], out[..., 1, 1], out[..., 2, 0], out[..., 2, 2] = c, s, 1.0, -s, c
    return out


def rot_z(angle: np.ndarray) -> np.ndarray:
    """[S, 3, 3] rotations about Z (positive turns +X towards +Y)."""
    c, s = np.cos(angle), np.sin(angle)
    out = np.zeros(np.shape(angle) + (3, 3))
    out[..., 0, 0], out[..., 0, 1], out[..., 1, 0], out[..., 1, 1], out[..., 2, 2] = c, -s, s, c, 1.0
    return out


def axis_angle(axis: np.ndarray, angle: float) -> np.ndarray:
    """[3, 3] rotation by ``angle`` about ``axis`` (Rodrigues)."""
    k = axis / max(np.linalg.norm(axis), 1e-12)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def segment_profile(node: NodeSpec, frame: str) -> SegmentProfile:
    """The segment profile of a node: by id (or an alias in it), else by the nearest nominal position
    in a 3-D body frame, else the generic profile."""
    name = node.id.lower()
    for key in SEGMENTS:
        if key in name:
            return SEGMENTS[key]
    for alias, key in _ALIASES.items():
        if alias in name:
            return SEGMENTS[key]
    if frame == "body" and len(node.position) == 3:
        anchors = {k: np.linalg.norm(np.subtract(s.anchor, node.position)) for k, s in SEGMENTS.items()}
        return SEGMENTS[min(anchors, key=anchors.get)]
    return GENERIC_SEGMENT


def _static_pitch(activity: ActivityProfile, segment: SegmentProfile) -> float:
    """Static segment pitch of the posture and activity (0 = upright)."""
    pitch = segment.sit_pitch if activity.posture == "sit" else 0.0
    if segment.kind == "trunk":
        pitch += activity.trunk_lean
    elif segment.kind == "thigh":
        pitch += activity.thigh_bias
    elif segment.kind == "arm" and activity.posture == "stand":
        pitch += activity.arm_bias
    return pitch


def _posture_rotation(posture: str, lie_roll: float) -> np.ndarray:
    """[3, 3] whole-body rotation: identity upright; lying turns the long axis horizontal (-X) after
    rolling the body about it by ``lie_roll`` (0: face up)."""
    if posture != "lie":
        return np.eye(3)
    return rot_y(np.array(-np.pi / 2)) @ rot_z(np.array(lie_roll))


def _sensor_kind(modality: str, channels: int) -> str:
    name = modality.lower()
    kind = "acc" if name.startswith("acc") else "gyro" if name.startswith("gyr") else \
        "mag" if name.startswith("mag") else None
    if kind is None:
        raise NodeError(f"body_har: modality {modality!r} is not an accelerometer, gyroscope or magnetometer "
                        "(names must start with acc, gyr or mag)")
    if channels != 3:
        raise NodeError(f"body_har: modality {modality!r} has {channels} channels; IMU axes need 3")
    return kind

