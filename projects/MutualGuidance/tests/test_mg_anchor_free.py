"""``MGAnchorFreeAssigner`` (supplement: Mutual Guidance on FCOS points): hand cases, the FCOS
rule when both components are off, and hypothesis equivalence with ``reference_mg.py``.
Notation: N images, R points (slots), C classes, M objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from musu.modeling.assigners import ASSIGNER_REGISTRY, AnchorGrid, Assignment, FCOSAssigner
from musu_mg import MGAnchorFreeAssigner, build_mg_anchor_free_assigner, centerness

from mg_lists import implementation_lists
from reference_mg import as_lists, point_centerness, reference_anchor_free


@dataclass
class Problem:
    grid: AnchorGrid
    scores: List[List[List[float]]]  # [n][r][c]
    pred_boxes: List[List[List[float]]]  # [n][r] box
    gt_boxes: List[List[List[float]]]
    gt_classes: List[List[int]]
    params: Dict[str, Any] = field(default_factory=dict)


def grid_strides(grid: AnchorGrid) -> List[float]:
    return [
        float(s)
        for (h, w), s in zip(grid.feature_sizes, grid.strides)
        for _ in range(h * w * grid.num_anchors)
    ]


def run(problem: Problem) -> Assignment:
    return MGAnchorFreeAssigner(**problem.params)(
        problem.grid,
        torch.tensor(problem.scores, dtype=torch.float32),
        torch.tensor(problem.pred_boxes, dtype=torch.float32),
        [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in problem.gt_boxes],
        [torch.tensor(c, dtype=torch.long) for c in problem.gt_classes],
    )


def reference_lists(problem: Problem) -> Dict[str, list]:
    rounded = lambda x: torch.tensor(x, dtype=torch.float32).tolist()  # noqa: E731
    params = dict(problem.params)
    radius = params.pop("center_sampling_radius", 1.5)
    return as_lists(
        reference_anchor_free(
            [tuple(p) for p in problem.grid.points().tolist()],
            grid_strides(problem.grid),
            rounded(problem.scores),
            rounded(problem.pred_boxes),
            [rounded(b) for b in problem.gt_boxes],
            problem.gt_classes,
            radius=radius,
            **params,
        )
    )


# --------------------------------------------------------------------------------------------
# Hand cases: one level of stride 1, a 4 x 4 grid of points at 0.5 .. 3.5, object [0, 0, 4, 4].
# FCOS (radius 1.5): the 4 centre points 5, 6, 9, 10 (max(|dx|, |dy|) = 0.5 < 1.5): N_p = 4.
# --------------------------------------------------------------------------------------------

GRID = AnchorGrid(((4, 4),), (1.0,), 1)
OBJECT = [0.0, 0.0, 4.0, 4.0]


def hand_problem(scores, preds, **params) -> Problem:
    return Problem(GRID, [scores], [preds], [[OBJECT]], [[0]], params)


def centerness_map(box: List[float]) -> torch.Tensor:
    """(16,) centerness of the 16 grid points w.r.t. one box."""
    points = GRID.points()
    return centerness(points, torch.tensor([box]).expand(len(points), 4))


def test_centerness_values() -> None:
    ctr = centerness_map(OBJECT)
    assert ctr[5].item() == math.sqrt(0.6 * 0.6)  # (1.5, 1.5): l 1.5, r 2.5
    assert math.isclose(ctr[0].item(), 1 / 7)  # (0.5, 0.5): l 0.5, r 3.5
    assert math.isclose(ctr[4].item(), math.sqrt(0.6 / 7))  # (0.5, 1.5)
    outside = centerness_map([1.0, 1.0, 2.0, 2.0])
    assert (outside == 0).sum() == 15 and outside[5] == 1.0  # only (1.5, 1.5) is inside
    assert centerness_map([1.5, 0.0, 4.0, 4.0])[5] == 0  # on the border: outside


def test_fcos_count_and_static_when_both_off() -> None:
    preds = [[0.0, 0.0, 2.0, 2.0]] * 16
    result = run(hand_problem([[0.0]] * 16, preds, l2c=False, c2l=False))
    assert result.stats["bag_size"].tolist() == [[4]] and result.stats["num_ignored"].tolist() == [
        [0]
    ]
    expected = [0 if r in (5, 6, 9, 10) else -1 for r in range(16)]
    assert result.gt_index[0].tolist() == expected and result.reg_gt_index[0].tolist() == expected
    assert not result.ignore.any()


def test_localize_to_classify_on_points() -> None:
    # IoU_regressed: point 0 -> 1, point 10 -> 0.875, point 15 -> 0.75, every other 0.25 (tie:
    # the lowest index, point 1, takes the fourth place).
    preds = [[0.0, 0.0, 2.0, 2.0]] * 16
    preds[0], preds[10], preds[15] = OBJECT, [0.0, 0.0, 4.0, 3.5], [0.0, 0.0, 4.0, 3.0]
    result = run(hand_problem([[0.0]] * 16, preds, c2l=False))
    assert (result.gt_index[0] == 0).nonzero().flatten().tolist() == [0, 1, 10, 15]
    assert (result.reg_gt_index[0] == 0).nonzero().flatten().tolist() == [5, 6, 9, 10]
    assert torch.equal(result.cls_weight, (result.gt_index >= 0).float())


def test_classify_to_localize_on_points() -> None:
    # sigma 1.5, p = 1 at point 4 (0.5, 1.5): sqrt(0.6 / 7) ** (1/3) = 0.664 beats the centre
    # points' 0.6 (p = 0); the four tied centres keep their index order: 5, 6, 9 stay, 10 drops.
    scores = [[0.0]] * 16
    scores[4] = [1.0]
    result = run(hand_problem(scores, [[0.0, 0.0, 2.0, 2.0]] * 16, l2c=False, sigma=1.5))
    assert (result.reg_gt_index[0] == 0).nonzero().flatten().tolist() == [4, 5, 6, 9]
    assert (result.gt_index[0] == 0).nonzero().flatten().tolist() == [5, 6, 9, 10]


def test_points_outside_the_object_are_never_positive() -> None:
    # Object [0, 0, 2, 2] contains only point 0 (0.5, 0.5) and 1, 4, 5; a point outside with a
    # perfect regressed box is not a candidate.
    preds = [[0.0, 0.0, 0.5, 0.5]] * 16
    preds[15] = [0.0, 0.0, 2.0, 2.0]
    problem = Problem(GRID, [[[0.0]] * 16], [preds], [[[0.0, 0.0, 2.0, 2.0]]], [[0]], {})
    result = run(problem)
    assert result.stats["bag_size"].tolist() == [[4]]
    assert result.gt_index[0, 15] == -1 and result.reg_gt_index[0, 15] == -1
    assert set((result.gt_index[0] == 0).nonzero().flatten().tolist()) == {0, 1, 4, 5}


def test_registered_builder_reads_mg_keys() -> None:
    from detectron2.config import get_cfg

    import musu
    from musu_mg import add_mg_config

    cfg = get_cfg()
    musu.add_musu_config(cfg)
    add_mg_config(cfg)
    cfg.MODEL.MG.L2C, cfg.MODEL.MG.SIGMA = False, 3.0
    cfg.MODEL.MUSU.FCOS_CENTER_SAMPLING_RADIUS = 2.5
    assert ASSIGNER_REGISTRY.get("build_mg_anchor_free_assigner") is build_mg_anchor_free_assigner
    assigner = build_mg_anchor_free_assigner(cfg)
    assert (assigner.l2c, assigner.c2l, assigner.sigma) == (False, True, 3.0)
    assert assigner.fcos.center_sampling_radius == 2.5


def test_reference_centerness_agrees() -> None:
    box = [0.5, 0.25, 3.75, 3.0]
    expected = [point_centerness(x, y, box) for x, y in GRID.points().tolist()]
    assert centerness_map(box).tolist() == expected


# --------------------------------------------------------------------------------------------
# Generated cases: strides 1, 2, 4 over an 8 x 8 image, 1 or 2 slots per point.
# --------------------------------------------------------------------------------------------

SCORE_VALUES = st.sampled_from([0.0, 0.25, 0.5, 1.0]) | st.floats(0, 1, width=32)


@st.composite
def object_boxes(draw) -> List[float]:
    x, y = draw(st.integers(-2, 8)), draw(st.integers(-2, 8))
    w, h = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    scale = draw(st.sampled_from([1.0, 0.5]))
    return [x * scale, y * scale, (x + w) * scale, (y + h) * scale]


@st.composite
def problems(draw) -> Problem:
    num_images = draw(st.integers(1, 2))
    num_classes = draw(st.integers(1, 2))
    num_slots = draw(st.integers(1, 2))
    levels = draw(st.sampled_from([(1,), (1, 2), (1, 2, 4)]))
    sizes = tuple((max(6 // s, 1), max(6 // s, 1)) for s in levels)
    grid = AnchorGrid(sizes, tuple(float(s) for s in levels), num_slots)
    num_points = len(grid.points())
    pool = draw(st.lists(object_boxes(), min_size=1, max_size=3))
    gt_boxes, gt_classes, scores, preds = [], [], [], []
    for _ in range(num_images):
        boxes = draw(st.lists(st.sampled_from(pool) | object_boxes(), max_size=3))
        gt_boxes.append(boxes)
        gt_classes.append(draw(st.lists(st.integers(0, num_classes - 1), min_size=len(boxes),
                                        max_size=len(boxes))))  # fmt: skip
        # Per point: one of a few boxes (the objects' boxes among them) and one of a few scores,
        # drawn as indices (cheap to generate, and many ties).
        choices = pool + draw(st.lists(object_boxes(), min_size=1, max_size=3))
        index = st.integers(0, len(choices) - 1)
        preds.append([choices[i] for i in draw(st.lists(index, min_size=num_points,
                                                         max_size=num_points))])  # fmt: skip
        values = draw(st.lists(SCORE_VALUES, min_size=1, max_size=4))
        flat = draw(st.lists(st.integers(0, len(values) - 1), min_size=num_points * num_classes,
                             max_size=num_points * num_classes))  # fmt: skip
        scores.append(
            [[values[flat[r * num_classes + c]] for c in range(num_classes)]
             for r in range(num_points)]  # fmt: skip
        )
    params = {
        "l2c": draw(st.booleans()),
        "c2l": draw(st.booleans()),
        "sigma": draw(st.sampled_from([2.0, 1.5])),
        "center_sampling_radius": draw(st.sampled_from([1.5, 0.0, 2.5])),
    }
    return Problem(grid, scores, preds, gt_boxes, gt_classes, params)


@settings(max_examples=80, deadline=None)
@given(problem=problems())
def test_matches_reference(problem: Problem) -> None:
    assert implementation_lists(run(problem), problem.gt_boxes) == reference_lists(problem)


@settings(max_examples=30, deadline=None)
@given(problem=problems())
def test_static_is_the_fcos_rule_and_switches_are_independent(problem: Problem) -> None:
    radius = problem.params["center_sampling_radius"]
    fcos = FCOSAssigner(center_sampling_radius=radius)(
        problem.grid,
        torch.tensor(problem.scores, dtype=torch.float32),
        torch.tensor(problem.pred_boxes, dtype=torch.float32),
        [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in problem.gt_boxes],
        [torch.tensor(c, dtype=torch.long) for c in problem.gt_classes],
    )
    results = {}
    for l2c in (False, True):
        for c2l in (False, True):
            params = {**problem.params, "l2c": l2c, "c2l": c2l}
            results[l2c, c2l] = run(Problem(**{**problem.__dict__, "params": params}))
    static = results[False, False]
    assert torch.equal(static.gt_index, fcos.gt_index)
    assert torch.equal(static.reg_gt_index, fcos.gt_index)
    assert torch.equal(static.stats["bag_size"], fcos.stats["bag_size"])
    assert torch.equal(results[True, False].reg_gt_index, fcos.gt_index)
    assert torch.equal(results[False, True].gt_index, fcos.gt_index)
    assert torch.equal(results[True, True].gt_index, results[True, False].gt_index)
    assert torch.equal(results[True, True].reg_gt_index, results[False, True].reg_gt_index)
    for result in results.values():
        assert not result.ignore.any()
