"""``AnchorGrid`` (points, strides, inside pairs listed per box, caches) and ``AnchorList``;
MuSuAssigner gives the same assignment on both."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from musu.modeling.assigners import AnchorGrid, AnchorList, MuSuAssigner, dense_inside_pairs
from musu.modeling.meta_arch import anchor_points

FIELDS = ("gt_index", "cls_weight", "reg_weight")
STATS = ("bag_size", "tau_cls")


@st.composite
def grids(draw) -> AnchorGrid:
    num_levels = draw(st.integers(1, 3))
    strides = draw(
        st.lists(st.sampled_from([4, 6, 8, 12, 16, 32]), min_size=num_levels, max_size=num_levels)
    )
    sizes = [(draw(st.integers(1, 9)), draw(st.integers(1, 9))) for _ in range(num_levels)]
    return AnchorGrid(tuple(sizes), tuple(strides), draw(st.integers(1, 3)))


@st.composite
def grid_batches(draw):
    grid = draw(grids())
    # Coordinates on a half-stride lattice hit point coordinates and borders exactly.
    coordinate = st.integers(-8, 90).map(lambda v: v * 1.5)
    num_images = draw(st.integers(1, 2))
    boxes = []
    for _ in range(num_images):
        count = draw(st.integers(0, 5))
        rows = []
        for _ in range(count):
            x1, y1 = draw(coordinate), draw(coordinate)
            rows.append([x1, y1, x1 + draw(coordinate) + 12, y1 + draw(coordinate) + 12])
        boxes.append(torch.tensor(rows, dtype=torch.float32).reshape(-1, 4))
    return grid, boxes


def _dense_pairs(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(P, 3) rows (image, object, anchor) by plain loops over boxes and points."""
    rows = []
    for n in range(boxes.shape[0]):
        for m in range(boxes.shape[1]):
            x1, y1, x2, y2 = boxes[n, m].tolist()
            for r, (x, y) in enumerate(points.tolist()):
                if x1 < x < x2 and y1 < y < y2:
                    rows.append((n, m, r))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)


def test_grid_points_equal_meta_arch_anchor_points() -> None:
    grid = AnchorGrid(((5, 7), (3, 4), (1, 2)), (8, 16, 32), 3)
    points, _ = anchor_points(list(grid.feature_sizes), list(grid.strides), 3, "cpu")
    assert torch.equal(grid.points(), points)


@settings(max_examples=150, deadline=None)
@given(grid_batches())
def test_grid_inside_pairs_equal_the_dense_test(batch) -> None:
    grid, box_list = batch
    max_objects = max(len(b) for b in box_list)
    boxes = torch.zeros(len(box_list), max_objects, 4)
    for n, b in enumerate(box_list):
        boxes[n, : len(b)] = b
    pairs = torch.stack(grid.inside_pairs(boxes), dim=1)  # (P, 3)
    assert torch.equal(pairs, _dense_pairs(grid.points(), boxes))
    assert torch.equal(pairs, torch.stack(dense_inside_pairs(grid.points(), boxes), dim=1))
    assert torch.equal(pairs, torch.stack(AnchorList(grid.points()).inside_pairs(boxes), dim=1))


@settings(max_examples=60, deadline=None)
@given(grid_batches(), st.integers(0, 2**31 - 1))
def test_assignment_with_grid_equals_dense(batch, seed: int) -> None:
    grid, boxes = batch
    generator = torch.Generator().manual_seed(seed)
    points = grid.points()
    num_images, num_anchors, num_classes = len(boxes), len(points), 3
    scores = torch.rand(num_images, num_anchors, num_classes, generator=generator)
    spread = torch.rand(num_images, num_anchors, 4, generator=generator) * 20
    pred = torch.cat([points - spread[..., :2], points + spread[..., 2:]], dim=-1)
    classes = [torch.randint(0, num_classes, (len(b),), generator=generator) for b in boxes]
    assigner = MuSuAssigner()
    dense = assigner(AnchorList(points), scores, pred, boxes, classes)
    listed = assigner(grid, scores, pred, boxes, classes)
    for field in FIELDS:
        assert torch.equal(getattr(dense, field), getattr(listed, field)), field
    for name in STATS:
        assert torch.equal(dense.stats[name], listed.stats[name]), name


def test_grid_tensors_are_cached_and_usable_for_training_after_inference_mode():
    grid = AnchorGrid(((3, 4), (2, 2)), (8.0, 16.0), 2)
    with torch.inference_mode():
        first = grid.points()
    assert not first.is_inference()
    assert grid.points() is first  # cached per (grid, device)
    assert torch.equal(grid.point_strides(), torch.tensor([8.0] * 24 + [16.0] * 8))
    offsets = torch.zeros(len(first), 2, requires_grad=True)
    (first * offsets).sum().backward()  # a cached grid still serves autograd
    assert torch.equal(offsets.grad, first)


def test_grid_num_slots_and_boxes() -> None:
    grid = AnchorGrid(((3, 4), (2, 2)), (8.0, 16.0), 2)
    assert grid.num_slots == len(grid.points()) == 32
    with pytest.raises(ValueError, match="AnchorList"):
        grid.boxes()


def test_anchor_list_points_strides_boxes() -> None:
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 24.0, 16.0]])
    anchors = AnchorList(boxes=boxes, strides=torch.tensor([8.0, 16.0]))
    assert anchors.num_slots == 2
    assert torch.equal(anchors.points(), torch.tensor([[4.0, 4.0], [16.0, 8.0]]))
    assert torch.equal(anchors.boxes(), boxes)
    assert torch.equal(anchors.point_strides(), torch.tensor([8.0, 16.0]))
    points_only = AnchorList(torch.tensor([[4.0, 4.0]]))
    with pytest.raises(ValueError, match="strides"):
        points_only.point_strides()
    with pytest.raises(ValueError, match="boxes"):
        points_only.boxes()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "points"),
        (dict(points=torch.zeros(3, 3)), r"points must have shape \(R, 2\)"),
        (dict(boxes=torch.zeros(3, 2)), r"boxes must have shape \(R, 4\)"),
        (dict(points=torch.zeros(3, 2), strides=torch.ones(2)), "strides must have R=3"),
    ],
)
def test_anchor_list_rejects_bad_shapes(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AnchorList(**kwargs)
