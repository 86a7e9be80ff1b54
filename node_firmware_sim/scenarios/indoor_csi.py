"""Wi-Fi CSI of a phone carried through an office, seen by ceiling/wall access points (AEMP-like).

Each node is an access point (AP) at a known 2-D position (a third coordinate, when given, is its
height). One device, a phone carried by a person, walks between the rooms of a floor plan
(``spar_wire.floor_plan.FloorPlan``; default: ``office_floor_plan``, 20 m x 12 m, six rooms and a
corridor) and sends ``sample_rate_hz`` packets per second; every AP measures the amplitude of K
subcarriers (K = the modality's ``channels``) of each packet. The modality must use the
``subcarrier_db`` feature transform, so the token image is subcarriers x time.

Channel per AP and packet (narrow-band paths, summed per subcarrier)::

    H(f_k) = sum_p a_p exp(-j 2 pi f_k L_p / c),   f_k evenly across [fc - B/2, fc + B/2]

Paths p, all with 3-D lengths L_p (AP at ``ap_height_m``, phone at ``device_height_m``; walls are
vertical, so a reflection's unfolded length is the 2-D image distance with the height added):

* direct: a = lambda / (4 pi L) (free space), minus the penetration loss of every wall piece the
  2-D segment AP-device crosses (``Wall.loss_db``);
* first-order wall reflections (image method): the AP mirrored in each wall piece's line; the path
  exists when AP and device are on the same side and the reflection point lies on the piece (a
  doorway does not reflect); a = -lambda / (4 pi L) x ``reflection_loss_db``, minus walls crossed
  on either leg;
* static scatterers (cabinets, radiators; ``n_scatterers`` drawn per seed at legal points, 1 m
  high): bistatic radar equation a = lambda sqrt(rcs / 4 pi) / (4 pi d1 d2) with a fixed random
  phase, minus walls crossed on either leg.

The paths' relative delays (10-50 ns indoors) make |H| frequency-selective across a 40 MHz band,
and their phases turn by 2 pi per wavelength (5.8 cm at 5.2 GHz) of motion: small-scale fading as
the person walks. Wall crossings and reflection validity are evaluated every ``geometry_step_s``
(0.1 s, <= 15 cm of walking) and interpolated; lengths and phases are exact per packet.

Body: the phone is held in front of the walker, so a path leaving backwards goes through the torso:
loss ``body_loss_db`` x max(0, -cos(angle between the path's departure and the heading)).

Receiver: complex white noise of ``noise_floor_db`` per subcarrier (dB re the transmitted field
amplitude, i.e. an effective SNR floor including CSI estimation error), then the reported amplitude
|H + n| is scaled by an AGC-like gain: per-packet jitter (``agc_jitter_db`` std, same for all
subcarriers of a packet) and a per-episode device gain (``device_gain_db`` std: phone model, grip).

Units: samples are linear amplitudes |H| (received over transmitted field, dimensionless; 20 log10
of them is the path gain in dB, about -45 dB at 1 m and -90 dB across the office).

Motion: episodes of ``episode_windows`` windows share one walk, from ``episode_rng(seed,
"indoor_csi", episode)``: start at a random legal point, then repeat {maybe pause (``pause_s``),
pick a room (the current one with ``stay_prob``), a legal waypoint in it, walk there through the
doors of the room graph (shortest by doors) at a speed drawn from ``speed_m_s``}. Positions are
piecewise linear in time, so consecutive windows of an episode join without a jump.

Ground truth per window (at its centre): label = room index (``class_names`` = room names), one
target = (room, (x, y)), extras speed_m_s, heading_rad, episode, device_gain_db, los_aps (APs with no
wall on the direct path). ``describe()["floor_plan"]`` carries the plan into dataset manifests.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
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
from spar_wire.errors import WireError
from spar_wire.floor_plan import Doorway, FloorPlan, Region, Wall
from spar_wire.site_layout import NodeSpec, SiteLayout

C_M_S = 299_792_458.0
TRANSFORM = "subcarrier_db"
_SCATTERER_HEIGHT_M = 1.0
_WALK_CLEARANCE_M = 0.1  # a walked segment stays this clear of walls and obstacles
_STAND_CLEARANCE_M = 0.3  # waypoints and starting points: not pressed against a wall
_TRIES = 30  # waypoint draws per trip before the walker just waits


@dataclass(frozen=True)
class IndoorCsiParams:
    """Scenario constants (SI units, gains in dB)."""

    episode_windows: int = 30
    carrier_hz: float = 5.21e9  # centre of a 40 MHz channel in the 5 GHz band
    bandwidth_hz: float = 40e6  # the K subcarriers spread evenly across it
    ap_height_m: float = 2.7  # used for 2-D node positions (ceiling mount)
    device_height_m: float = 1.2  # phone in hand
    reflection_loss_db: float = 7.0  # per wall bounce (|Gamma| ~ 0.45)
    n_scatterers: int = 8
    scatterer_rcs_m2: tuple[float, float] = (0.3, 3.0)  # log-uniform radar cross-section
    body_loss_db: float = 10.0  # a path leaving straight backwards through the walker
    speed_m_s: tuple[float, float] = (0.5, 1.5)  # walking speed, drawn per trip
    pause_prob: float = 0.5  # chance of a pause before each trip (at a desk, a whiteboard, the coffee machine)
    pause_s: tuple[float, float] = (2.0, 12.0)
    stay_prob: float = 0.35  # chance that a trip's waypoint is in the current room
    noise_floor_db: float = -115.0  # complex noise per subcarrier, dB re transmitted amplitude
    agc_jitter_db: float = 0.8  # per-packet gain jitter (std)
    device_gain_db: float = 2.0  # per-episode device gain (std)
    geometry_step_s: float = 0.1
    noise_scale: float = 1.0  # 0: noise- and jitter-free (tests)

    def __post_init__(self) -> None:
        if self.episode_windows < 1 or self.n_scatterers < 0:
            raise NodeError("indoor_csi: episode_windows must be >= 1 and n_scatterers >= 0")
        positive = ("carrier_hz", "bandwidth_hz", "ap_height_m", "device_height_m", "geometry_step_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise NodeError(f"indoor_csi: {name} must be > 0, got {getattr(self, name)!r}")
        if self.bandwidth_hz >= self.carrier_hz:
            raise NodeError("indoor_csi: bandwidth_hz must be below carrier_hz")
        for name in ("scatterer_rcs_m2", "speed_m_s", "pause_s"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise NodeError(f"indoor_csi: {name} must be (low, high) with 0 < low <= high, got {(lo, hi)}")
        for name in ("pause_prob", "stay_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise NodeError(f"indoor_csi: {name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("reflection_loss_db", "body_loss_db", "agc_jitter_db", "device_gain_db", "noise_scale"):
            if not getattr(self, name) >= 0:
                raise NodeError(f"indoor_csi: {name} must be >= 0, got {getattr(self, name)!r}")


def office_floor_plan() -> FloorPlan:
    """The default site: a 20 m x 12 m office floor. An east-west corridor (y 5-7 m) with three rooms
    south of it (office_a, office_b, meeting) and three north (kitchen, office_c, lab); one door
    from each room to the corridor, and a connecting door between office_a and office_b. Concrete
    outer walls, drywall partitions, a brick kitchen wall, a glass meeting-room wall."""
    concrete, drywall = {"thickness_m": 0.3, "loss_db": 13.0}, {"thickness_m": 0.12, "loss_db": 5.0}
    brick, glass = {"thickness_m": 0.2, "loss_db": 9.0}, {"thickness_m": 0.1, "loss_db": 3.0}
    walls = (
        Wall((0, 0), (20, 0), **concrete), Wall((20, 0), (20, 12), **concrete),
        Wall((20, 12), (0, 12), **concrete), Wall((0, 12), (0, 0), **concrete),
        Wall((0, 5), (20, 5), **drywall), Wall((0, 7), (20, 7), **drywall),
        Wall((7, 0), (7, 5), **drywall), Wall((13, 0), (13, 5), **glass),
        Wall((6, 7), (6, 12), **brick), Wall((14, 7), (14, 12), **drywall),
    )
    doors = (
        Doorway((3.0, 5), (3.9, 5)), Doorway((9.5, 5), (10.4, 5)), Doorway((15.0, 5), (16.2, 5)),
        Doorway((2.5, 7), (3.5, 7)), Doorway((9.0, 7), (9.9, 7)), Doorway((16.5, 7), (17.4, 7)),
        Doorway((7, 1.5), (7, 2.4)),
    )

    def rect(name: str, x0: float, y0: float, x1: float, y1: float) -> Region:
        return Region(name, ((x0, y0), (x1, y0), (x1, y1), (x0, y1)))

    rooms = (rect("office_a", 0, 0, 7, 5), rect("office_b", 7, 0, 13, 5), rect("meeting", 13, 0, 20, 5),
             rect("corridor", 0, 5, 20, 7), rect("kitchen", 0, 7, 6, 12), rect("office_c", 6, 7, 14, 12),
             rect("lab", 14, 7, 20, 12))
    obstacles = (rect("meeting_table", 15.0, 1.8, 18.0, 3.2), rect("kitchen_counter", 0.15, 11.2, 3.0, 11.85),
                 rect("lab_bench", 18.8, 7.6, 19.85, 11.2), rect("pillar", 9.8, 9.3, 10.2, 9.7))
    return FloorPlan((0.0, 0.0, 20.0, 12.0), walls, doors, rooms, obstacles)


# ----------------------------------------------------------------------------- motion
@dataclass(frozen=True)
class Walk:
    """Piecewise-linear path of one episode: knots at increasing times (a pause repeats a point)."""

    t: np.ndarray  # [m] s, non-decreasing, t[0] = 0
    xy: np.ndarray  # [m, 2] m
    heading0: float  # rad, heading before the first move
    device_gain_db: float

    def position(self, t: np.ndarray) -> np.ndarray:
        """[n] episode times -> [n, 2] positions (held at the last knot after the end)."""
        return np.stack([np.interp(t, self.t, self.xy[:, 0]), np.interp(t, self.t, self.xy[:, 1])], axis=1)

    def heading_speed(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n] times -> heading (rad; kept through pauses) and speed (m/s) of the segment at each time."""
        step = np.diff(self.xy, axis=0)
        dt = np.diff(self.t)
        length = np.linalg.norm(step, axis=1)
        moving = length > 1e-9
        heading = np.where(moving, np.arctan2(step[:, 1], step[:, 0]), np.nan)
        last = np.maximum.accumulate(np.where(moving, np.arange(len(step)), -1))
        heading = np.where(last >= 0, heading[np.maximum(last, 0)], self.heading0)
        speed = np.where(dt > 0, length / np.maximum(dt, 1e-12), 0.0)
        seg = np.clip(np.searchsorted(self.t, t, side="right") - 1, 0, len(step) - 1)
        return heading[seg], speed[seg]


# ----------------------------------------------------------------------------- the scenario
class IndoorCsiScenario:
    """One phone walking through an office; every AP reports K subcarrier amplitudes per packet.

    Args:
        layout: the site: nodes are APs inside the floor plan's bounds; every modality uses the
            ``subcarrier_db`` transform (channels = subcarriers, sample rate = packets/s).
        seed: selects scatterers, walks and noise.
        floor_plan: a ``FloorPlan``, its ``to_dict()`` form, or the path of a JSON file with it
            (default: ``office_floor_plan()``).
        **params: any ``IndoorCsiParams`` field (lists are accepted for the tuple ones).
    """

    name = "indoor_csi"

    def __init__(self, layout: SiteLayout, seed: int = 0, *, floor_plan: Any = None, **params: Any):
        known = {f.name for f in fields(IndoorCsiParams)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise NodeError(f"indoor_csi: unknown parameter(s) {unknown}; known: floor_plan, "
                            f"{', '.join(sorted(known))}")
        self.params = IndoorCsiParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
        self.layout = layout
        self.seed = int(seed)
        self.window_s = site_window_s(layout)
        self.plan = _load_plan(floor_plan)
        self.class_names = self.plan.room_names()
        self._check_modalities()
        self._aps = _ApGeometry.build(self.plan, layout.nodes, self.params.ap_height_m)
        self._links = self.plan.door_links()
        self._check_walkable()
        self._scatterers = self._draw_scatterers()
        self._cache: OrderedDict[int, Walk] = OrderedDict()

    # ------------------------------------------------------------------ public API
    def episode_of(self, index: int) -> tuple[int, int]:
        """(episode, window within the episode) of window ``index``."""
        return divmod(check_window_index(index), self.params.episode_windows)

    def walk(self, episode: int) -> Walk:
        """The device's path during ``episode`` (pure; LRU-cached)."""
        walk = self._cache.get(episode)
        if walk is None:
            walk = self._draw_walk(episode)
            self._cache[episode] = walk
            if len(self._cache) > 16:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(episode)
        return walk

    def window(self, index: int, node_ids: tuple[str, ...] | None = None) -> SourceWindow:
        """Window ``index`` for ``node_ids`` (default: all APs). Deterministic; only the asked APs
        are computed, and each AP's samples do not depend on which others were asked."""
        episode, k = self.episode_of(index)
        walk = self.walk(episode)
        t0 = k * self.window_s
        nodes = self.layout.nodes if node_ids is None else tuple(self._node(n) for n in node_ids)
        signals: dict[tuple[str, str], np.ndarray] = {}
        for modality, spec in self.layout.modalities.items():
            members = [n.id for n in nodes if modality in n.modalities]
            if not members:
                continue
            cfg = spec.features
            t = t0 + np.arange(cfg.window_samples) / cfg.sample_rate_hz
            # one stream per (window, AP, modality): an AP's samples do not depend on the others asked
            rngs = [episode_rng(self.seed, "indoor_csi.packets", index, node_key(n), node_key(modality))
                    for n in members]
            measured = self._measure(self._aps.rows(members), cfg.channels, walk, t, rngs)
            signals.update({(n, modality): x for n, x in zip(members, measured, strict=True)})
        return SourceWindow(index=index, start_s=index * self.window_s, signals=signals,
                            truth=self._truth(walk, episode, t0 + self.window_s / 2))

    def truth(self, index: int) -> GroundTruth:
        """Ground truth of window ``index`` without rendering any CSI."""
        episode, k = self.episode_of(index)
        return self._truth(self.walk(episode), episode, k * self.window_s + self.window_s / 2)

    def subcarrier_hz(self, k: int) -> np.ndarray:
        """[k] subcarrier frequencies (Hz), evenly across the channel."""
        p = self.params
        return p.carrier_hz + p.bandwidth_hz * (np.arange(k) / max(k - 1, 1) - 0.5)

    def channel_response(self, node_id: str, points: np.ndarray, k: int = 32,
                         heading: np.ndarray | None = None) -> np.ndarray:
        """Noise-free complex channel H [n, k] from the device at ``points`` [n, 2] to AP
        ``node_id``; ``heading`` [n] (rad) adds body shadowing, None leaves it out."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        rows = self._aps.rows([self._node(node_id).id])
        gains = self._path_gains(rows, pts)
        return self._sum_paths(rows, pts, gains, heading, self.subcarrier_hz(k))[0]

    def describe(self) -> dict[str, Any]:
        """JSON-able parameters for manifests, the floor plan included."""
        return {"name": self.name, "seed": self.seed, "window_s": self.window_s,
                "class_names": list(self.class_names),
                "units": {m: "linear CSI amplitude |H| per subcarrier (received / transmitted field)"
                          for m in self.layout.modalities},
                "subcarriers": {m: spec.channels for m, spec in self.layout.modalities.items()},
                "packet_rate_hz": {m: spec.sample_rate_hz for m, spec in self.layout.modalities.items()},
                "target": "device (x, y) in metres at the window centre; label = room index",
                "floor_plan": self.plan.to_dict(),
                "scatterers": [[x, y, rcs] for x, y, rcs, _ in self._scatterers.tolist()],
                **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.params).items()}}

    # ------------------------------------------------------------------ setup
    def _check_modalities(self) -> None:
        for name, spec in self.layout.modalities.items():
            if spec.features.transform != TRANSFORM:
                raise NodeError(f"indoor_csi: modality {name!r} uses transform {spec.features.transform!r}; "
                                f"CSI needs {TRANSFORM!r} (e.g. preset 'indoor_csi')")

    def _check_walkable(self) -> None:
        """What the router relies on: every room has standing room, every door can be walked
        through, and the straight walk between two doors of one room is legal."""
        rng = episode_rng(self.seed, "indoor_csi.check")
        for room in range(len(self.class_names)):
            self._legal_points(rng, 1, room)  # NodeError naming the room when it has none
        by_room: dict[int, list[np.ndarray]] = {}
        for link in self._links:
            near, far = (np.asarray(side) for side in link.sides)
            if not self._walkable(near, far):
                raise NodeError(f"indoor_csi: floor plan: doorway {link.door} cannot be walked through "
                                f"({near} -> {far}); widen it or clear its sides")
            for room, side in zip(link.rooms, (near, far), strict=True):
                by_room.setdefault(room, []).append(side)
        for room, sides in by_room.items():
            for i in range(len(sides)):
                for j in range(i + 1, len(sides)):
                    if not self._walkable(sides[i], sides[j]):
                        raise NodeError(f"indoor_csi: floor plan: the straight walk between two doors of room "
                                        f"{self.class_names[room]!r} ({sides[i]} -> {sides[j]}) is blocked; "
                                        "move the obstacle or split the room")

    def _draw_scatterers(self) -> np.ndarray:
        """[n_scatterers, 4] (x, y, rcs m^2, phase rad) at legal points."""
        p = self.params
        rng = episode_rng(self.seed, "indoor_csi.scatterers")
        xy = self._legal_points(rng, p.n_scatterers, room=None)
        rcs = np.exp(rng.uniform(*np.log(p.scatterer_rcs_m2), size=p.n_scatterers))
        phase = rng.uniform(0, 2 * np.pi, size=p.n_scatterers)
        return np.column_stack([xy.reshape(-1, 2), rcs, phase])

    def _node(self, node_id: str) -> NodeSpec:
        for node in self.layout.nodes:
            if node.id == node_id:
                return node
        raise NodeError(f"indoor_csi: no node {node_id!r} in site {self.layout.site_id!r}")

    # ------------------------------------------------------------------ motion
    def _legal_points(self, rng: np.random.Generator, n: int, room: int | None) -> np.ndarray:
        """[n, 2] uniform legal points (with standing clearance) in ``room`` (None: anywhere)."""
        if room is None:
            x0, y0, x1, y1 = self.plan.bounds
        else:
            poly = np.asarray(self.plan.rooms[room].polygon)
            (x0, y0), (x1, y1) = poly.min(axis=0), poly.max(axis=0)
        found: list[np.ndarray] = []
        for _ in range(200):
            cand = rng.uniform((x0, y0), (x1, y1), size=(64, 2))
            ok = self.plan.is_legal(cand, _STAND_CLEARANCE_M)
            if room is not None:
                ok &= self.plan.room_of(cand) == room
            found.extend(cand[ok])
            if len(found) >= n:
                return np.asarray(found[:n]).reshape(n, 2)
        where = "anywhere" if room is None else f"in room {self.class_names[room]!r}"
        raise NodeError(f"indoor_csi: floor plan has no legal standing point {where}")

    def _walkable(self, a: np.ndarray, b: np.ndarray) -> bool:
        steps = max(2, int(np.ceil(np.linalg.norm(b - a) / 0.1)) + 1)
        pts = a[None, :] + np.linspace(0, 1, steps)[:, None] * (b - a)[None, :]
        return bool(self.plan.is_legal(pts, _WALK_CLEARANCE_M).all())

    def _route(self, start: int, goal: int) -> list[np.ndarray] | None:
        """Door-side points from room ``start`` to room ``goal`` (fewest doors), None if unreachable."""
        previous: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        frontier, seen = [start], {start}
        while frontier and goal not in seen:
            nxt = []
            for room in frontier:
                for link in self._links:
                    if room not in link.rooms:
                        continue
                    i = link.rooms.index(room)
                    other = link.rooms[1 - i]
                    if other not in seen:
                        seen.add(other)
                        previous[other] = (room, np.asarray(link.sides[i]), np.asarray(link.sides[1 - i]))
                        nxt.append(other)
            frontier = nxt
        if goal not in seen:
            return None
        points: list[np.ndarray] = []
        room = goal
        while room != start:
            room, near, far = previous[room]
            points[:0] = [near, far]
        return points

    def _draw_walk(self, episode: int) -> Walk:
        p = self.params
        rng = episode_rng(self.seed, "indoor_csi", episode)
        duration = (p.episode_windows + 1) * self.window_s
        rooms = len(self.class_names)
        here = self._legal_points(rng, 1, int(rng.integers(rooms)))[0]
        times, points = [0.0], [here]
        heading0 = float(rng.uniform(-np.pi, np.pi))
        gain_db = float(p.device_gain_db * rng.standard_normal())
        while times[-1] < duration:
            if rng.random() < p.pause_prob:
                times.append(times[-1] + rng.uniform(*p.pause_s))
                points.append(here)
            legs = self._trip(rng, here)
            if legs is None:  # nowhere reachable to go from here: wait a moment and try again
                times.append(times[-1] + 1.0)
                points.append(here)
                continue
            speed = rng.uniform(*p.speed_m_s)
            for point in legs:
                times.append(times[-1] + float(np.linalg.norm(point - points[-1])) / speed)
                points.append(point)
            here = legs[-1]
        return Walk(np.asarray(times), np.asarray(points), heading0, gain_db)

    def _trip(self, rng: np.random.Generator, here: np.ndarray) -> list[np.ndarray] | None:
        """Points walked from ``here`` to a new waypoint (through doors), None after ``_TRIES`` failures."""
        start = int(self.plan.room_of(here[None, :])[0])
        for _ in range(_TRIES):
            goal = start if rng.random() < self.params.stay_prob else int(rng.integers(len(self.class_names)))
            route = self._route(start, goal)
            if route is None:
                continue
            waypoint = self._legal_points(rng, 1, goal)[0]
            legs = [*route, waypoint]
            # walks through and between doors were checked at construction; the first and last legs are new
            ends = [here, *legs]
            first, last = (ends[0], ends[1]), (ends[-2], ends[-1])
            if np.linalg.norm(waypoint - here) > 0.2 and self._walkable(*first) and self._walkable(*last):
                return legs
        return None

    # ------------------------------------------------------------------ channel
    def _path_gains(self, rows: np.ndarray, pts: np.ndarray) -> np.ndarray:
        """[A, n, 1 + P + S] real path gains of APs ``rows`` to device points [n, 2], spreading left
        out: 10^(-loss/20) of walls (and the bounce), 0 where a reflection does not exist. Paths:
        direct, the image in each wall piece, each scatterer."""
        plan, pieces, geo = self.plan, self.plan.pieces, self._aps
        n_a, n, n_p = len(rows), len(pts), len(pieces["a"])
        ap_xy = geo.xy[rows]
        direct_db = plan.wall_loss_db(np.repeat(ap_xy, n, axis=0), np.tile(pts, (n_a, 1))).reshape(n_a, n)
        # reflection off piece j: device on the AP's side of the line, bounce point on the piece
        dev_side = ((pts[:, None, :] - pieces["a"][None]) * geo.normal[None]).sum(-1)  # [n, P]
        ap_side = geo.side[rows][:, None, :]  # [A, 1, P]
        exists = dev_side[None] * ap_side > 1e-9
        frac = np.abs(ap_side) / np.maximum(np.abs(ap_side) + np.abs(dev_side)[None], 1e-12)
        images = geo.images[rows][:, None]  # [A, 1, P, 2]
        bounce = images + frac[..., None] * (pts[None, :, None, :] - images)  # [A, n, P, 2]
        direction = pieces["b"] - pieces["a"]
        along = ((bounce - pieces["a"]) * direction).sum(-1) / (direction ** 2).sum(-1)
        exists &= (along >= 0) & (along <= 1)
        flat = bounce.reshape(-1, 2)
        leg1 = plan.crossings(np.repeat(ap_xy, n * n_p, axis=0), flat)
        leg2 = plan.crossings(flat, np.tile(np.repeat(pts, n_p, axis=0), (n_a, 1)))
        own_wall = np.tile(pieces["wall"][:, None] == pieces["wall"][None, :], (n_a * n, 1))
        crossed = (leg1 | leg2) & ~own_wall  # the reflecting wall itself is touched, not crossed
        reflect_db = (crossed.astype(np.float64) @ pieces["loss_db"]).reshape(n_a, n, n_p)
        reflect = np.where(exists, 10 ** (-(reflect_db + self.params.reflection_loss_db) / 20), 0.0)
        s_xy = self._scatterers[:, :2]
        n_s = len(s_xy)
        to_s = plan.wall_loss_db(np.repeat(ap_xy, n_s, axis=0), np.tile(s_xy, (n_a, 1))).reshape(n_a, 1, n_s)
        from_s = plan.wall_loss_db(np.repeat(pts, n_s, axis=0), np.tile(s_xy, (n, 1))).reshape(1, n, n_s)
        scatter = 10 ** (-(to_s + from_s) / 20)
        return np.concatenate([10 ** (-direct_db / 20)[..., None], reflect, np.broadcast_to(scatter, (n_a, n, n_s))],
                              axis=-1)

    def _sum_paths(self, rows: np.ndarray, pts: np.ndarray, gains: np.ndarray, heading: np.ndarray | None,
                   freqs: np.ndarray) -> np.ndarray:
        """H [A, n, K] = sum over paths of gain x spreading x body loss x exp(-j 2 pi f L / c)."""
        p, geo, sc = self.params, self._aps, self._scatterers
        n_a, n_s, n_p = len(rows), len(sc), geo.images.shape[1]
        # the last hop of every path starts at a virtual source: the AP, its images, the scatterers
        sources = np.concatenate([geo.xy[rows][:, None], geo.images[rows],
                                  np.broadcast_to(sc[:, :2], (n_a, n_s, 2))], axis=1)  # [A, paths, 2]
        dz = np.concatenate([np.repeat(geo.height[rows][:, None], 1 + n_p, axis=1) - p.device_height_m,
                             np.full((n_a, n_s), _SCATTERER_HEIGHT_M - p.device_height_m)], axis=1)
        planar = sources[:, None] - pts[None, :, None, :]  # [A, n, paths, 2] device -> virtual source
        last = np.sqrt((planar ** 2).sum(-1) + dz[:, None] ** 2)
        first = np.sqrt(((sc[None, :, :2] - geo.xy[rows][:, None]) ** 2).sum(-1)
                        + (geo.height[rows][:, None] - _SCATTERER_HEIGHT_M) ** 2)[:, None]  # [A, 1, S]
        lam = C_M_S / p.carrier_hz
        mirror = slice(0, 1 + n_p)
        scat = slice(1 + n_p, None)
        spread = np.empty_like(last)
        spread[..., mirror] = lam / (4 * np.pi * last[..., mirror])
        spread[..., scat] = lam * np.sqrt(sc[:, 2] / (4 * np.pi)) / (4 * np.pi * first * last[..., scat])
        length = last
        length[..., scat] += first
        const = np.concatenate([[1.0], -np.ones(n_p), np.exp(1j * sc[:, 3])])  # bounce sign, scatter phase
        amp = gains * spread * const
        if heading is not None and p.body_loss_db > 0:
            h = np.stack([np.cos(heading), np.sin(heading)], axis=1)[None, :, None, :]
            cos = (planar * h).sum(-1) / np.maximum(np.linalg.norm(planar, axis=-1), 1e-9)
            amp = amp * 10 ** (-p.body_loss_db * np.maximum(0.0, -cos) / 20)
        return _subcarrier_sum(amp, length, freqs)

    def _measure(self, rows: np.ndarray, k: int, walk: Walk, t: np.ndarray,
                 rngs: list[np.random.Generator]) -> np.ndarray:
        """[A, K, S] reported amplitudes of APs ``rows`` at packet times ``t`` (episode time)."""
        p = self.params
        step = p.geometry_step_s
        grid = np.arange(np.floor(t[0] / step), np.floor(t[-1] / step) + 2) * step  # covers t, aligned to step
        coarse = self._path_gains(rows, walk.position(grid))  # [A, G, paths]
        pos = (t - grid[0]) / step
        i = np.clip(pos.astype(np.int64), 0, len(grid) - 2)
        w = (pos - i)[None, :, None]
        gains = (1 - w) * coarse[:, i] + w * coarse[:, i + 1]
        heading, _ = walk.heading_speed(t)
        h = self._sum_paths(rows, walk.position(t), gains, heading, self.subcarrier_hz(k))  # [A, S, K]
        scale, sigma = p.noise_scale, 10 ** (p.noise_floor_db / 20) / np.sqrt(2)
        out = np.empty((len(rows), k, len(t)))
        for a, rng in enumerate(rngs):
            noise = sigma * (rng.standard_normal(h.shape[1:]) + 1j * rng.standard_normal(h.shape[1:]))
            gain_db = scale * (walk.device_gain_db + p.agc_jitter_db * rng.standard_normal(len(t)))
            out[a] = (np.abs(h[a] + scale * noise) * 10 ** (gain_db / 20)[:, None]).T
        return out

    def _truth(self, walk: Walk, episode: int, t: float) -> GroundTruth:
        xy = walk.position(np.array([t]))
        room = int(self.plan.room_of(xy)[0])
        heading, speed = walk.heading_speed(np.array([t]))
        aps = self._aps.xy
        los = int((self.plan.walls_crossed(aps, np.broadcast_to(xy, aps.shape)) == 0).sum())
        extras = {"speed_m_s": float(speed[0]), "heading_rad": float(heading[0]), "episode": float(episode),
                  "device_gain_db": walk.device_gain_db, "los_aps": float(los)}
        position = (float(xy[0, 0]), float(xy[0, 1]))
        return GroundTruth(label=room, targets=(Target(room, position),), extras=extras)


def _subcarrier_sum(amp: np.ndarray, length: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """H [A, n, K] = sum_p amp[A, n, p] exp(-j 2 pi f_k length[A, n, p] / c), ``freqs`` [K] evenly spaced.

    The hot loop of the scenario. Per AP only the paths within 60 dB of its strongest are kept
    (the others change |H| by < 0.01 dB). Phasors are base x step^k, built by doubling (rows
    [m, 2m) = rows [0, m) x step^m; complex64 loses < 1e-5 rad over 5 doublings) instead of
    A x n x paths x K complex exponentials.
    """
    strength = np.abs(amp).max(axis=1)  # [A, paths]
    order = np.argsort(-strength, axis=1)
    kept = int((strength >= 1e-3 * strength.max(axis=1, keepdims=True)).sum(axis=1).max())
    top = order[:, None, :kept]
    amp, cycles = np.take_along_axis(amp, top, axis=2), np.take_along_axis(length, top, axis=2) / C_M_S
    phasors = np.empty((len(freqs), *amp.shape), dtype=np.complex64)  # [K, A, n, kept]
    phasors[0] = np.exp(-2j * np.pi * np.mod(freqs[0] * cycles, 1.0))
    step = np.exp(-2j * np.pi * np.mod((freqs[1] - freqs[0] if len(freqs) > 1 else 0.0) * cycles, 1.0))
    step = step.astype(np.complex64)
    done = 1
    while done < len(freqs):
        todo = min(done, len(freqs) - done)
        np.multiply(phasors[:todo], step, out=phasors[done: done + todo])
        step = step * step
        done += todo
    out = np.einsum("kanp,anp->ank", phasors, amp.astype(np.complex64))
    return out.astype(np.complex128)


@dataclass(frozen=True)
class _ApGeometry:
    """Static geometry of the APs, rows in layout order."""

    ids: tuple[str, ...]
    xy: np.ndarray  # [N, 2] m
    height: np.ndarray  # [N] m
    normal: np.ndarray  # [P, 2] unit normal of each wall piece's line
    side: np.ndarray  # [N, P] signed distance of each AP to each piece's line
    images: np.ndarray  # [N, P, 2] each AP mirrored in each piece's line

    @classmethod
    def build(cls, plan: FloorPlan, nodes: tuple[NodeSpec, ...], default_height_m: float) -> _ApGeometry:
        x0, y0, x1, y1 = plan.bounds
        for node in nodes:
            if not (x0 <= node.position[0] <= x1 and y0 <= node.position[1] <= y1):
                raise NodeError(f"indoor_csi: AP {node.id!r} at {node.position[:2]} lies outside the floor "
                                f"plan bounds {plan.bounds}")
        xy = np.array([n.position[:2] for n in nodes], dtype=np.float64)
        height = np.array([n.position[2] if len(n.position) == 3 else default_height_m for n in nodes])
        pieces = plan.pieces
        direction = pieces["b"] - pieces["a"]
        normal = np.stack([-direction[:, 1], direction[:, 0]], axis=1) / np.linalg.norm(direction, axis=1)[:, None]
        side = ((xy[:, None, :] - pieces["a"][None]) * normal[None]).sum(-1)
        images = xy[:, None, :] - 2 * side[..., None] * normal[None]
        return cls(tuple(n.id for n in nodes), xy, height, normal, side, images)

    def rows(self, ids: list[str]) -> np.ndarray:
        """[A] row indices of the APs ``ids``."""
        return np.array([self.ids.index(i) for i in ids], dtype=np.int64)


def _load_plan(value: Any) -> FloorPlan:
    """The floor plan from a scenario parameter (None: the default office)."""
    if value is None:
        return office_floor_plan()
    if isinstance(value, FloorPlan):
        return value
    try:
        if isinstance(value, (str, Path)):
            value = json.loads(Path(value).read_text(encoding="utf-8"))
        return FloorPlan.from_dict(value)
    except (OSError, json.JSONDecodeError) as exc:
        raise NodeError(f"indoor_csi: cannot read floor plan {value!r}: {exc}") from None
    except WireError as exc:
        raise NodeError(f"indoor_csi: floor plan: {exc.detail}") from None
