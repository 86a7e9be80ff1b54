"""Floor plans for indoor scenarios: walls with doorways, named rooms, obstacles, legal positions.

A ``FloorPlan`` is 2-D, in metres of the site frame (x east, y north). Walls are centreline segments
with a thickness and a penetration loss; a doorway is a gap cut out of a wall (its two end points lie
on the wall's centreline). Rooms (corridors included) are named polygons that tile the walkable area;
obstacles (tables, counters, pillars) are polygons nobody can stand in.

A position is *legal* when a person carrying a device can be there: inside the bounds, inside some
room, clear of every wall piece (farther than half its thickness from the centreline) and outside
every obstacle. ``legal_grid`` rasterises that rule for training losses that push predictions back
into the walkable area (AEMP's map-legality penalty), and ``to_dict`` makes the plan JSON-able so a
dataset manifest can carry it (``floor_plan_from_source`` reads it back).

Pure numpy; every check of outside input raises ``WireError("bad_floor_plan", ...)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from spar_wire.errors import WireError

REASON = "bad_floor_plan"
_ON_WALL_TOL_M = 1e-3  # a doorway end point this close to a wall's centreline lies on it
_DOOR_STEP_M = 0.4  # door "sides": this far beyond the wall face, one on each side


@dataclass(frozen=True)
class Wall:
    """A straight wall: centreline from ``a`` to ``b`` (m), ``thickness_m``, and the one-way
    penetration loss ``loss_db`` of a radio wave crossing it (at 5 GHz: glass ~3, drywall ~4-6,
    brick ~8-12, concrete 12-20 dB)."""

    a: tuple[float, float]
    b: tuple[float, float]
    thickness_m: float = 0.12
    loss_db: float = 5.0


@dataclass(frozen=True)
class Doorway:
    """A gap in a wall between ``a`` and ``b`` (both on the wall's centreline)."""

    a: tuple[float, float]
    b: tuple[float, float]


@dataclass(frozen=True)
class Region:
    """A named polygon (room, corridor or obstacle); vertices in order, not closed."""

    name: str
    polygon: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class DoorLink:
    """A doorway joining two rooms, and a point on each side of it (``_DOOR_STEP_M`` past the wall
    face) that a walker passes through."""

    door: int
    rooms: tuple[int, int]
    sides: tuple[tuple[float, float], tuple[float, float]]  # sides[i] lies in rooms[i]


@dataclass(frozen=True, eq=False)
class LegalGrid:
    """Rasterised legality: ``mask[i, j]`` is the cell whose centre is
    (x0 + (j + 0.5) cell_m, y0 + (i + 0.5) cell_m); row 0 is the southern edge (y = y0)."""

    mask: np.ndarray  # [H, W] bool
    origin: tuple[float, float]  # (x0, y0) of the grid's lower-left corner, m
    cell_m: float

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if mask.ndim != 2 or mask.dtype != bool or 0 in mask.shape:
            raise WireError(REASON, f"legal grid mask must be a non-empty 2-D bool array, got {mask.dtype} "
                                    f"{mask.shape}")
        if not (_finite_number(self.cell_m) and self.cell_m > 0):
            raise WireError(REASON, f"legal grid cell_m must be > 0, got {self.cell_m!r}")
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "origin", _point(self.origin, "legal grid origin"))
        object.__setattr__(self, "cell_m", float(self.cell_m))

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape

    def centres(self) -> np.ndarray:
        """[H, W, 2] float64 cell centres (x, y) in metres."""
        h, w = self.shape
        xs = self.origin[0] + (np.arange(w) + 0.5) * self.cell_m
        ys = self.origin[1] + (np.arange(h) + 0.5) * self.cell_m
        gx, gy = np.meshgrid(xs, ys)
        return np.stack([gx, gy], axis=-1)

    def cell_of(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """points [n, 2] -> (row [n] int64, col [n] int64, inside [n] bool); rows/cols of points
        outside the grid are clipped to the edge and flagged by ``inside``."""
        p = _points(points)
        col = np.floor((p[:, 0] - self.origin[0]) / self.cell_m).astype(np.int64)
        row = np.floor((p[:, 1] - self.origin[1]) / self.cell_m).astype(np.int64)
        h, w = self.shape
        inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
        return np.clip(row, 0, h - 1), np.clip(col, 0, w - 1), inside

    def lookup(self, points: np.ndarray) -> np.ndarray:
        """[n, 2] -> [n] bool: the legality of each point's cell (False outside the grid)."""
        row, col, inside = self.cell_of(points)
        return inside & self.mask[row, col]

    def distance_to_legal(self, chunk: int = 4096) -> np.ndarray:
        """[H, W] float64: metres from each cell centre to the nearest legal cell centre (0 on legal
        cells, inf when no cell is legal). Exact: the nearest legal cell of an illegal one always
        has an illegal 8-neighbour, so only those boundary cells are searched."""
        mask = self.mask
        out = np.zeros(mask.shape)
        if not mask.any():
            return np.full(mask.shape, np.inf)
        padded = np.pad(~mask, 1, constant_values=False)
        near_illegal = np.zeros_like(mask)
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                near_illegal |= padded[1 + di: 1 + di + mask.shape[0], 1 + dj: 1 + dj + mask.shape[1]]
        border = np.argwhere(mask & near_illegal).astype(np.float64)  # [B, 2] (row, col)
        illegal = np.argwhere(~mask)
        for start in range(0, len(illegal), chunk):
            cells = illegal[start: start + chunk].astype(np.float64)
            d2 = ((cells[:, None, :] - border[None, :, :]) ** 2).sum(-1)
            out[illegal[start: start + chunk, 0], illegal[start: start + chunk, 1]] = np.sqrt(d2.min(1))
        return out * self.cell_m

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the mask as one string of '0'/'1' per row (row 0 = southern edge)."""
        rows = ["".join("1" if v else "0" for v in row) for row in self.mask]
        return {"origin": list(self.origin), "cell_m": self.cell_m, "rows": rows}

    @classmethod
    def from_dict(cls, data: Any) -> LegalGrid:
        if not isinstance(data, dict) or set(data) != {"origin", "cell_m", "rows"}:
            raise WireError(REASON, "legal grid: expected an object with origin, cell_m and rows")
        rows = data["rows"]
        if not isinstance(rows, list) or not rows or not all(isinstance(r, str) for r in rows):
            raise WireError(REASON, "legal grid rows: expected a non-empty list of '0'/'1' strings")
        if len({len(r) for r in rows}) != 1 or any(set(r) - {"0", "1"} for r in rows):
            raise WireError(REASON, "legal grid rows: every row must be a '0'/'1' string of the same length")
        mask = np.array([[c == "1" for c in r] for r in rows], dtype=bool)
        return cls(mask, data["origin"], data["cell_m"])


@dataclass(frozen=True)
class FloorPlan:
    """Walls, doorways, rooms and obstacles of one floor (metres, site frame)."""

    bounds: tuple[float, float, float, float]  # (x0, y0, x1, y1)
    walls: tuple[Wall, ...]
    doorways: tuple[Doorway, ...] = ()
    rooms: tuple[Region, ...] = ()
    obstacles: tuple[Region, ...] = field(default=())

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------ wall pieces
    @cached_property
    def pieces(self) -> dict[str, np.ndarray]:
        """Walls with the doorways cut out. Arrays of P pieces: ``a``/``b`` [P, 2] end points,
        ``thickness`` [P], ``loss_db`` [P], ``wall`` [P] index of the wall each piece belongs to."""
        a, b, wall = [], [], []
        for w_index, w in enumerate(self.walls):
            for t0, t1 in _solid_intervals(w, [d for d in self.doorways if _door_on_wall(d, w)]):
                start, end = np.asarray(w.a), np.asarray(w.b)
                a.append(start + t0 * (end - start))
                b.append(start + t1 * (end - start))
                wall.append(w_index)
        wall_arr = np.array(wall, dtype=np.int64)
        return {"a": np.array(a).reshape(-1, 2), "b": np.array(b).reshape(-1, 2), "wall": wall_arr,
                "thickness": np.array([self.walls[i].thickness_m for i in wall], dtype=np.float64),
                "loss_db": np.array([self.walls[i].loss_db for i in wall], dtype=np.float64)}

    # ------------------------------------------------------------------ queries
    def room_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rooms)

    def room_of(self, points: np.ndarray) -> np.ndarray:
        """points [n, 2] -> [n] int64 index of the first room containing each point, -1 for none."""
        p = _points(points)
        out = np.full(len(p), -1, dtype=np.int64)
        for index in range(len(self.rooms) - 1, -1, -1):  # reversed: the first room wins on shared edges
            out[_in_polygon(p, self._room_arrays[index])] = index
        return out

    def is_legal(self, points: np.ndarray, clearance_m: float = 0.0) -> np.ndarray:
        """points [n, 2] -> [n] bool: inside bounds and a room, farther than half a wall's thickness
        plus ``clearance_m`` from every wall piece, outside (and ``clearance_m`` clear of) every
        obstacle."""
        p = _points(points)
        x0, y0, x1, y1 = self.bounds
        ok = (p[:, 0] >= x0) & (p[:, 0] <= x1) & (p[:, 1] >= y0) & (p[:, 1] <= y1)
        ok &= self.room_of(p) >= 0
        pieces = self.pieces
        if len(pieces["a"]):
            gap = _segment_distance(p, pieces["a"], pieces["b"]) - pieces["thickness"][None, :] / 2
            ok &= (gap > clearance_m).all(axis=1)
        for poly in self._obstacle_arrays:
            ok &= ~_in_polygon(p, poly)
            if clearance_m > 0:
                edges_a, edges_b = poly, np.roll(poly, -1, axis=0)
                ok &= (_segment_distance(p, edges_a, edges_b) > clearance_m).all(axis=1)
        return ok

    def crossings(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Segments a[n, 2] -> b[n, 2] against every wall piece: [n, P] bool, True where the
        segment properly crosses the piece's centreline (touching or running along it does not
        count, so a path ending on a wall is not charged for that wall)."""
        pa, pb = _points(a), _points(b)
        if pa.shape != pb.shape:
            raise WireError(REASON, f"segment ends differ in shape: {pa.shape} vs {pb.shape}")
        return _proper_intersections(pa, pb, self.pieces["a"], self.pieces["b"])

    def walls_crossed(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """[n] int64: wall pieces crossed by each segment a[n, 2] -> b[n, 2]."""
        return self.crossings(a, b).sum(axis=1).astype(np.int64)

    def wall_loss_db(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """[n] float64: summed penetration loss (dB) of the walls each segment crosses."""
        return self.crossings(a, b).astype(np.float64) @ self.pieces["loss_db"]

    def door_links(self) -> tuple[DoorLink, ...]:
        """Doorways that join two different rooms (the edges of the room graph)."""
        links = []
        for index, door in enumerate(self.doorways):
            wall = next(w for w in self.walls if _door_on_wall(door, w))
            a, b = np.asarray(door.a), np.asarray(door.b)
            direction = (b - a) / np.linalg.norm(b - a)
            normal = np.array([-direction[1], direction[0]])
            mid = (a + b) / 2
            offset = wall.thickness_m / 2 + _DOOR_STEP_M
            sides = np.stack([mid + offset * normal, mid - offset * normal])
            rooms = self.room_of(sides)
            if rooms[0] >= 0 and rooms[1] >= 0 and rooms[0] != rooms[1]:
                links.append(DoorLink(index, (int(rooms[0]), int(rooms[1])),
                                      (tuple(sides[0].tolist()), tuple(sides[1].tolist()))))
        return tuple(links)

    def legal_grid(self, cell_m: float, clearance_m: float = 0.0) -> LegalGrid:
        """Legality at the centres of ``cell_m`` square cells covering the bounds."""
        if not (_finite_number(cell_m) and cell_m > 0):
            raise WireError(REASON, f"cell_m must be > 0, got {cell_m!r}")
        x0, y0, x1, y1 = self.bounds
        w, h = math.ceil((x1 - x0) / cell_m - 1e-9), math.ceil((y1 - y0) / cell_m - 1e-9)
        if w * h > 4_000_000:
            raise WireError(REASON, f"cell_m {cell_m} gives a {h} x {w} grid; use larger cells")
        grid = LegalGrid(np.zeros((h, w), dtype=bool), (x0, y0), float(cell_m))
        centres = grid.centres().reshape(-1, 2)
        mask = np.concatenate([self.is_legal(centres[i: i + 8192], clearance_m)
                               for i in range(0, len(centres), 8192)])
        return LegalGrid(mask.reshape(h, w), (x0, y0), float(cell_m))

    # ------------------------------------------------------------------ identity
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists, floats, strings); ``from_dict`` reads it back."""
        def region(r: Region) -> dict[str, Any]:
            return {"name": r.name, "polygon": [list(v) for v in r.polygon]}

        return {
            "bounds": list(self.bounds),
            "walls": [{"a": list(w.a), "b": list(w.b), "thickness_m": w.thickness_m, "loss_db": w.loss_db}
                      for w in self.walls],
            "doorways": [{"a": list(d.a), "b": list(d.b)} for d in self.doorways],
            "rooms": [region(r) for r in self.rooms],
            "obstacles": [region(r) for r in self.obstacles],
        }

    @classmethod
    def from_dict(cls, data: Any) -> FloorPlan:
        """Build and validate a plan from ``to_dict``'s format; WireError names the bad entry."""
        _require_keys(data, {"bounds", "walls"}, {"doorways", "rooms", "obstacles"}, "floor plan")
        bounds = data["bounds"]
        if not isinstance(bounds, list) or len(bounds) != 4 or not all(_finite_number(v) for v in bounds):
            raise WireError(REASON, f"floor plan bounds: expected [x0, y0, x1, y1], got {bounds!r}")
        walls = tuple(_parse_wall(w, f"walls[{i}]") for i, w in enumerate(_list(data, "walls")))
        doors = tuple(_parse_door(d, f"doorways[{i}]") for i, d in enumerate(_list(data, "doorways")))
        rooms = tuple(_parse_region(r, f"rooms[{i}]") for i, r in enumerate(_list(data, "rooms")))
        obstacles = tuple(_parse_region(r, f"obstacles[{i}]") for i, r in enumerate(_list(data, "obstacles")))
        return cls(tuple(float(v) for v in bounds), walls, doors, rooms, obstacles)

    # ------------------------------------------------------------------ internals
    @cached_property
    def _room_arrays(self) -> list[np.ndarray]:
        return [np.asarray(r.polygon, dtype=np.float64) for r in self.rooms]

    @cached_property
    def _obstacle_arrays(self) -> list[np.ndarray]:
        return [np.asarray(r.polygon, dtype=np.float64) for r in self.obstacles]


def floor_plan_from_source(source: Any) -> FloorPlan | None:
    """The floor plan a dataset carries: ``source`` is the manifest's ``source`` description (a
    scenario's ``describe()``) or the whole manifest. None when it has no ``floor_plan``; WireError
    when the plan is malformed."""
    if not isinstance(source, dict):
        raise WireError(REASON, f"source description must be an object, got {type(source).__name__}")
    if "floor_plan" not in source and isinstance(source.get("source"), dict):
        source = source["source"]
    plan = source.get("floor_plan")
    return None if plan is None else FloorPlan.from_dict(plan)


# --------------------------------------------------------------------------- geometry (vectorised)
def _in_polygon(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """[n, 2] points, [V, 2] polygon -> [n] bool (even-odd ray casting towards +x)."""
    x, y = points[:, 0:1], points[:, 1:2]
    xa, ya = poly[None, :, 0], poly[None, :, 1]
    nxt = np.concatenate([poly[1:], poly[:1]])
    xb, yb = nxt[None, :, 0], nxt[None, :, 1]
    straddles = (ya > y) != (yb > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = xa + (y - ya) * (xb - xa) / (yb - ya)
    return np.logical_xor.reduce(straddles & (x < x_cross), axis=1)


def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, 2] points to [P] segments a->b: [n, P] distances."""
    ab = b - a  # [P, 2]
    length2 = np.maximum((ab ** 2).sum(axis=1), 1e-18)
    ap = points[:, None, :] - a[None, :, :]  # [n, P, 2]
    t = np.clip((ap * ab[None]).sum(-1) / length2[None], 0.0, 1.0)
    closest = a[None] + t[..., None] * ab[None]
    return np.sqrt(((points[:, None, :] - closest) ** 2).sum(-1))


def _cross(o: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """z of (u - o) x (v - o), broadcasting over leading axes."""
    return (u[..., 0] - o[..., 0]) * (v[..., 1] - o[..., 1]) - (u[..., 1] - o[..., 1]) * (v[..., 0] - o[..., 0])


def _proper_intersections(p: np.ndarray, q: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Segments p->q [n, 2] vs a->b [P, 2]: [n, P] bool, strict (end points on a line do not count).

    The four orientation tests are each linear in one end point, so they are [n, 2] @ [2, P]
    products instead of broadcast temporaries (the scenario calls this on every packet batch).
    """
    u = b - a  # [P, 2]
    u_perp = np.stack([-u[:, 1], u[:, 0]])  # [2, P]: cross(a, b, x) = (x - a) . u_perp
    c_u = (a * u_perp.T).sum(axis=1)  # [P]
    d1, d2 = p @ u_perp - c_u, q @ u_perp - c_u  # sides of p and q relative to each piece
    v = q - p  # [n, 2]
    v_perp = np.stack([-v[:, 1], v[:, 0]], axis=1)  # [n, 2]
    c_v = (p * v_perp).sum(axis=1)[:, None]  # [n, 1]
    d3, d4 = v_perp @ a.T - c_v, v_perp @ b.T - c_v  # sides of each piece's ends relative to p->q
    eps = 1e-12
    return (d1 * d2 < -eps) & (d3 * d4 < -eps)


def _door_on_wall(door: Doorway, wall: Wall) -> bool:
    return all(_distance_to_line(pt, wall) <= _ON_WALL_TOL_M and -1e-9 <= _along(pt, wall) <= 1 + 1e-9
               for pt in (door.a, door.b))


def _along(point: tuple[float, float], wall: Wall) -> float:
    """Position of ``point`` projected on the wall, 0 at ``a`` and 1 at ``b``."""
    a, b = np.asarray(wall.a), np.asarray(wall.b)
    return float((np.asarray(point) - a) @ (b - a) / ((b - a) @ (b - a)))


def _distance_to_line(point: tuple[float, float], wall: Wall) -> float:
    a, b = np.asarray(wall.a), np.asarray(wall.b)
    return float(abs(_cross(a, b, np.asarray(point))) / np.linalg.norm(b - a))


def _solid_intervals(wall: Wall, doors: list[Doorway]) -> list[tuple[float, float]]:
    """[t0, t1] parts of the wall (0 = a, 1 = b) left once the doorway gaps are cut out."""
    gaps = sorted(sorted((_along(d.a, wall), _along(d.b, wall))) for d in doors)
    out, start = [], 0.0
    for lo, hi in gaps:
        if lo > start + 1e-9:
            out.append((start, lo))
        start = max(start, hi)
    if start < 1.0 - 1e-9:
        out.append((start, 1.0))
    return out


# --------------------------------------------------------------------------- validation
def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _point(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_finite_number(v) for v in value):
        raise WireError(REASON, f"{where}: expected [x, y] in metres, got {value!r}")
    return float(value[0]), float(value[1])


def _points(points: Any) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim == 1 and p.shape == (2,):
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] != 2:
        raise WireError(REASON, f"points must have shape [n, 2], got {p.shape}")
    return p


def _list(data: dict, key: str) -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise WireError(REASON, f"floor plan {key}: expected a list, got {type(value).__name__}")
    return value


def _require_keys(data: Any, required: set[str], optional: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise WireError(REASON, f"{where}: expected an object, got {type(data).__name__}")
    missing, unknown = sorted(required - set(data)), sorted(set(data) - required - optional)
    if missing:
        raise WireError(REASON, f"{where}: missing field(s) {', '.join(missing)}")
    if unknown:
        raise WireError(REASON, f"{where}: unknown field(s) {', '.join(unknown)}; known: "
                                f"{', '.join(sorted(required | optional))}")


def _parse_wall(data: Any, where: str) -> Wall:
    _require_keys(data, {"a", "b"}, {"thickness_m", "loss_db"}, where)
    extra = {k: data[k] for k in ("thickness_m", "loss_db") if k in data}
    return Wall(_point(data["a"], f"{where}.a"), _point(data["b"], f"{where}.b"), **extra)


def _parse_door(data: Any, where: str) -> Doorway:
    _require_keys(data, {"a", "b"}, set(), where)
    return Doorway(_point(data["a"], f"{where}.a"), _point(data["b"], f"{where}.b"))


def _parse_region(data: Any, where: str) -> Region:
    _require_keys(data, {"name", "polygon"}, set(), where)
    polygon = data["polygon"]
    if not isinstance(polygon, list):
        raise WireError(REASON, f"{where}.polygon: expected a list of [x, y] vertices")
    return Region(data["name"], tuple(_point(v, f"{where}.polygon[{i}]") for i, v in enumerate(polygon)))


def _validate(plan: FloorPlan) -> None:
    if len(plan.bounds) != 4 or not all(_finite_number(v) for v in plan.bounds):
        raise WireError(REASON, f"bounds: expected 4 finite numbers, got {plan.bounds!r}")
    x0, y0, x1, y1 = plan.bounds
    if not (x0 < x1 and y0 < y1):
        raise WireError(REASON, f"bounds: need x0 < x1 and y0 < y1, got {plan.bounds!r}")
    for i, wall in enumerate(plan.walls):
        _validate_wall(plan, i, wall)
    for i, door in enumerate(plan.doorways):
        _point(door.a, f"doorways[{i}].a"), _point(door.b, f"doorways[{i}].b")
        if math.dist(door.a, door.b) <= 0:
            raise WireError(REASON, f"doorways[{i}]: zero width")
        if not any(_door_on_wall(door, w) for w in plan.walls):
            raise WireError(REASON, f"doorways[{i}] {door.a}-{door.b}: does not lie on any wall's centreline")
    if not plan.rooms:
        raise WireError(REASON, "at least one room is required (rooms define where a device can be)")
    names = [r.name for r in plan.rooms]
    if len(set(names)) != len(names):
        raise WireError(REASON, f"room names must be unique, got {names}")
    for kind, regions in (("rooms", plan.rooms), ("obstacles", plan.obstacles)):
        for i, region in enumerate(regions):
            _validate_region(plan, f"{kind}[{i}]", region)


def _validate_wall(plan: FloorPlan, index: int, wall: Wall) -> None:
    where = f"walls[{index}]"
    a, b = _point(wall.a, f"{where}.a"), _point(wall.b, f"{where}.b")
    if math.dist(a, b) <= 0:
        raise WireError(REASON, f"{where}: zero length")
    if not (_finite_number(wall.thickness_m) and wall.thickness_m > 0):
        raise WireError(REASON, f"{where}.thickness_m: must be > 0, got {wall.thickness_m!r}")
    if not (_finite_number(wall.loss_db) and wall.loss_db >= 0):
        raise WireError(REASON, f"{where}.loss_db: must be >= 0, got {wall.loss_db!r}")
    if not all(_within(plan.bounds, p) for p in (a, b)):
        raise WireError(REASON, f"{where}: end points {a}, {b} lie outside the bounds {plan.bounds}")


def _validate_region(plan: FloorPlan, where: str, region: Region) -> None:
    if not isinstance(region.name, str) or not region.name.strip():
        raise WireError(REASON, f"{where}.name: expected a non-empty string, got {region.name!r}")
    poly = [_point(v, f"{where}.polygon") for v in region.polygon]
    if len(poly) < 3:
        raise WireError(REASON, f"{where} ({region.name}): a polygon needs >= 3 vertices, got {len(poly)}")
    arr = np.asarray(poly)
    area = 0.5 * abs(float(np.sum(arr[:, 0] * np.roll(arr[:, 1], -1) - np.roll(arr[:, 0], -1) * arr[:, 1])))
    if area <= 0:
        raise WireError(REASON, f"{where} ({region.name}): polygon has zero area")
    if not all(_within(plan.bounds, p) for p in poly):
        raise WireError(REASON, f"{where} ({region.name}): vertices outside the bounds {plan.bounds}")


def _within(bounds: tuple[float, float, float, float], p: tuple[float, float]) -> bool:
    x0, y0, x1, y1 = bounds
    tol = 1e-6
    return x0 - tol <= p[0] <= x1 + tol and y0 - tol <= p[1] <= y1 + tol
