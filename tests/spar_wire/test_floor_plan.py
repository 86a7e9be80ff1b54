"""FloorPlan: legality, rooms, wall crossings, room graph, legal grid, dict round trip, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spar_wire.errors import WireError
from spar_wire.floor_plan import Doorway, FloorPlan, LegalGrid, Region, Wall, floor_plan_from_source


def rect(name: str, x0: float, y0: float, x1: float, y1: float) -> Region:
    return Region(name, ((x0, y0), (x1, y0), (x1, y1), (x0, y1)))


@pytest.fixture(scope="module")
def plan() -> FloorPlan:
    """10 m x 6 m, split at x = 5 by a 0.2 m wall with a door at y 2..3; a table in the east room."""
    outer = {"thickness_m": 0.2, "loss_db": 10.0}
    walls = (Wall((0, 0), (10, 0), **outer), Wall((10, 0), (10, 6), **outer),
             Wall((10, 6), (0, 6), **outer), Wall((0, 6), (0, 0), **outer),
             Wall((5, 0), (5, 6), thickness_m=0.2, loss_db=4.0))
    return FloorPlan((0, 0, 10, 6), walls, (Doorway((5, 2), (5, 3)),),
                     (rect("west", 0, 0, 5, 6), rect("east", 5, 0, 10, 6)), (rect("table", 7, 4, 8, 5),))


def test_legal_positions(plan):
    points = [(2, 2), (5, 1), (5, 2.5), (0.05, 3), (7.5, 4.5), (11, 3), (5.15, 4), (8.5, 4.5)]
    expected = [True, False, True, False, False, False, True, True]
    assert plan.is_legal(np.array(points)).tolist() == expected
    # clearance: 0.4 m from the outer wall's face is legal, not with 0.5 m of clearance
    near_wall = np.array([[0.5, 3.0], [1.0, 3.0]])
    assert plan.is_legal(near_wall).tolist() == [True, True]
    assert plan.is_legal(near_wall, clearance_m=0.5).tolist() == [False, True]
    assert plan.is_legal(np.array([[8.3, 4.5]]), clearance_m=0.5).tolist() == [False]  # 0.3 m from the table
    assert plan.is_legal(np.array([2.0, 2.0])).tolist() == [True]  # a single point is accepted


def test_rooms(plan):
    assert plan.room_names() == ("west", "east")
    assert plan.room_of(np.array([[2, 2], [8, 1], [11, 1], [7.5, 4.5]])).tolist() == [0, 1, -1, 1]


def test_walls_crossed_on_hand_checkable_segments(plan):
    a = np.array([[2, 1], [2, 2.5], [2, 4], [-1, 2.5], [5, 0.5], [2, 1]])
    b = np.array([[8, 1], [8, 2.5], [8, 4], [11, 2.5], [5, 1.5], [4, 5]])
    # below the door, through the door, above it, through both outer walls and the door,
    # along the wall's centreline (not a crossing), inside the west room
    assert plan.walls_crossed(a, b).tolist() == [1, 0, 1, 2, 0, 0]
    np.testing.assert_allclose(plan.wall_loss_db(a, b), [4, 0, 4, 20, 0, 0])
    assert plan.crossings(a, b).shape == (6, len(plan.pieces["a"]))
    # a segment ending on a wall is not charged for it (reflection points lie on walls)
    assert plan.walls_crossed(np.array([[2, 1]]), np.array([[5, 1]])).tolist() == [0]
    with pytest.raises(WireError, match="shape"):
        plan.crossings(a, b[:2])


def test_doorways_cut_walls_into_pieces(plan):
    pieces = plan.pieces
    inner = pieces["wall"] == 4
    np.testing.assert_allclose(sorted(pieces["a"][inner][:, 1].tolist() + pieces["b"][inner][:, 1].tolist()),
                               [0, 2, 3, 6])
    assert len(pieces["a"]) == 6 and pieces["thickness"][inner].tolist() == [0.2, 0.2]


def test_door_links_join_the_rooms(plan):
    (link,) = plan.door_links()
    assert link.door == 0 and sorted(link.rooms) == [0, 1]
    sides = dict(zip(link.rooms, link.sides, strict=True))
    np.testing.assert_allclose(sides[0], (4.5, 2.5))  # 0.1 m half wall + 0.4 m step
    np.testing.assert_allclose(sides[1], (5.5, 2.5))


def test_legal_grid(plan):
    grid = plan.legal_grid(0.1)
    assert grid.shape == (60, 100) and grid.origin == (0.0, 0.0) and grid.cell_m == 0.1
    centres = grid.centres().reshape(-1, 2)
    np.testing.assert_array_equal(grid.mask.ravel(), plan.is_legal(centres))
    assert grid.mask[20, 20] and not grid.mask[5, 49] and not grid.mask[5, 50] and grid.mask[25, 50]  # door
    assert not grid.mask[0].any() and grid.mask[1, 1:49].all()  # outer wall half thickness is 0.1 m
    assert grid.lookup(np.array([[2, 2], [5, 1], [-1, 1]])).tolist() == [True, False, False]
    distance = grid.distance_to_legal()
    assert (distance[grid.mask] == 0).all() and (distance[~grid.mask] > 0).all()
    assert distance[44, 74] == pytest.approx(0.5)  # table cell (7.45, 4.45): 0.5 m to x = 6.95
    assert distance[10, 50] == pytest.approx(0.1)  # wall cell (5.05, 1.05): legal at 5.15


def test_legal_grid_round_trip_and_errors(plan):
    grid = plan.legal_grid(0.25)
    again = LegalGrid.from_dict(json.loads(json.dumps(grid.to_dict())))
    np.testing.assert_array_equal(again.mask, grid.mask)
    assert (again.origin, again.cell_m) == (grid.origin, grid.cell_m)
    for bad in ({"origin": [0, 0], "cell_m": 0.1, "rows": ["01", "1"]},
                {"origin": [0, 0], "cell_m": 0.1, "rows": ["0x"]},
                {"origin": [0, 0], "cell_m": -1, "rows": ["01"]},
                {"origin": [0], "cell_m": 0.1, "rows": ["01"]},
                {"cell_m": 0.1, "rows": ["01"]}):
        with pytest.raises(WireError, match="legal grid"):
            LegalGrid.from_dict(bad)
    with pytest.raises(WireError, match="cell_m"):
        plan.legal_grid(0.0)


def test_dict_round_trip(plan):
    data = json.loads(json.dumps(plan.to_dict()))
    again = FloorPlan.from_dict(data)
    assert again == plan and again.to_dict() == plan.to_dict()
    assert floor_plan_from_source({"name": "indoor_csi", "floor_plan": data}) == plan
    assert floor_plan_from_source({"format": "x", "source": {"floor_plan": data}}) == plan  # a whole manifest
    assert floor_plan_from_source({"name": "parking_lot"}) is None
    with pytest.raises(WireError, match="bounds"):
        floor_plan_from_source({"floor_plan": {**data, "bounds": [0, 0, 1]}})


def _broken(plan: FloorPlan, **changes) -> dict:
    return {**plan.to_dict(), **changes}


@pytest.mark.parametrize("change, message", [
    ({"bounds": [10, 0, 0, 6]}, "x0 < x1"),
    ({"bounds": "big"}, "bounds"),
    ({"walls": [{"a": [0, 0], "b": [0, 0]}]}, "zero length"),
    ({"walls": [{"a": [0, 0], "b": [1, 0], "thickness_m": -0.1}]}, "thickness_m"),
    ({"walls": [{"a": [0, 0], "b": [1, 0], "loss_db": "a lot"}]}, "loss_db"),
    ({"walls": [{"a": [0, 0], "b": [20, 0]}]}, "outside the bounds"),
    ({"walls": [{"a": [0, 0], "b": [1, 0], "colour": "red"}]}, "unknown field"),
    ({"walls": [{"a": [0, "x"], "b": [1, 0]}]}, r"walls\[0\]\.a"),
    ({"doorways": [{"a": [2, 2], "b": [3, 2]}]}, "does not lie on any wall"),
    ({"rooms": []}, "at least one room"),
    ({"rooms": [{"name": "a", "polygon": [[0, 0], [1, 0], [1, 1]]}] * 2}, "unique"),
    ({"rooms": [{"name": "a", "polygon": [[0, 0], [1, 0]]}]}, ">= 3 vertices"),
    ({"rooms": [{"name": "a", "polygon": [[0, 0], [1, 0], [2, 0]]}]}, "zero area"),
    ({"rooms": [{"name": "", "polygon": [[0, 0], [1, 0], [1, 1]]}]}, "name"),
    ({"obstacles": [{"name": "x", "polygon": [[0, 0], [11, 0], [11, 1]]}]}, "outside the bounds"),
    ({"furniture": []}, "unknown field"),
])
def test_bad_plans_are_rejected_with_a_clear_message(plan, change, message):
    with pytest.raises(WireError, match=message) as info:
        FloorPlan.from_dict(_broken(plan, **change))
    assert info.value.reason == "bad_floor_plan"


def test_bad_inputs_to_queries(plan):
    with pytest.raises(WireError, match=r"\[n, 2\]"):
        plan.is_legal(np.zeros((3, 3)))
    with pytest.raises(WireError, match="expected an object"):
        FloorPlan.from_dict([1, 2])
    with pytest.raises(WireError, match="missing"):
        FloorPlan.from_dict({"walls": []})
