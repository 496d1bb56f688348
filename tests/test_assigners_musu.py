"""Tests of ``MuSuAssigner`` (Procedure 1, Eqs. 1-4 and 6 of the MuSu paper).

Hand-computed cases run against both the implementation and the plain reference in
``reference_musu.py`` (so the reference is itself checked by hand); property tests then compare the
implementation with the reference on random batches built on a coarse integer grid, where points
on box borders, IoU ties, duplicate boxes and score ties are frequent.

Notation: N images, M objects, R anchors, C classes, A anchor slots per location.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from musu.modeling.assigners import AnchorList

from reference_musu import CRITERIA, point_in_box, reference_assign

DEFAULTS: Dict[str, Any] = dict(
    theta=4.0,
    bag_threshold=0.1,
    alpha=1 / 3,
    tau_ratio=2.0,
    temperature=None,
    soft=True,
    criterion="mutual",
)
KINDS = ("implementation", "reference")

E1 = math.exp(-1 / math.sqrt(2))  # rank 1 in a bag of 2, tau_cls = sqrt(2)
E2 = math.exp(-math.sqrt(2))  # rank 1 in a bag of 2, tau_reg = sqrt(2) / 2


@dataclass
class Problem:
    """One assigner input batch plus hyper-parameters."""

    points: torch.Tensor  # (R, 2)
    scores: torch.Tensor  # (N, R, C)
    pred_boxes: torch.Tensor  # (N, R, 4)
    gt_boxes: List[torch.Tensor]  # N x (M_n, 4)
    gt_classes: List[torch.Tensor]  # N x (M_n,)
    params: Dict[str, Any]


@dataclass
class Result:
    """Assignment normalized for comparison (weights and tau as float64)."""

    gt_index: torch.Tensor  # (N, R) long
    cls_weight: torch.Tensor  # (N, R) float64
    reg_weight: torch.Tensor  # (N, R) float64
    bag_size: torch.Tensor  # (N, M_max) long
    tau_cls: torch.Tensor  # (N, M_max) float64


def make_assigner(**overrides: Any):
    """MuSuAssigner with all hyper-parameters given explicitly (defaults of the contract)."""
    from musu.modeling.assigners import MuSuAssigner

    return MuSuAssigner(**{**DEFAULTS, **overrides})


def assign(kind: str, problem: Problem) -> Result:
    """Run the implementation or the reference on ``problem``."""
    args = (
        problem.points,
        problem.scores,
        problem.pred_boxes,
        problem.gt_boxes,
        problem.gt_classes,
    )
    if kind == "implementation":
        out = make_assigner(**problem.params)(AnchorList(problem.points), *args[1:])
        bag_size, tau_cls = out.stats["bag_size"], out.stats["tau_cls"]
        assert out.gt_index.dtype == torch.long
        assert bag_size.dtype == torch.long
        assert out.cls_weight.is_floating_point() and out.reg_weight.is_floating_point()
        assert tau_cls.is_floating_point()
    else:
        out = reference_assign(*args, **{**DEFAULTS, **problem.params})
        bag_size, tau_cls = out.bag_size, out.tau_cls
    return Result(
        gt_index=out.gt_index,
        cls_weight=out.cls_weight.double(),
        reg_weight=out.reg_weight.double(),
        bag_size=bag_size,
        tau_cls=tau_cls.double(),
    )


def single_image(
    points: Sequence[Sequence[float]],
    scores: Sequence[Sequence[float]],
    preds: Sequence[Sequence[float]],
    boxes: Sequence[Sequence[float]],
    classes: Sequence[int],
    **params: Any,
) -> Problem:
    """Problem with N = 1 from plain lists: points (R, 2), scores (R, C), preds (R, 4)."""
    return Problem(
        points=torch.tensor(points, dtype=torch.float32).reshape(-1, 2),
        scores=torch.tensor(scores, dtype=torch.float32).reshape(1, len(points), -1),
        pred_boxes=torch.tensor(preds, dtype=torch.float32).reshape(1, -1, 4),
        gt_boxes=[torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)],
        gt_classes=[torch.tensor(classes, dtype=torch.long)],
        params=params,
    )


def check(
    result: Result,
    gt_index: Sequence[int],
    cls_weight: Sequence[float],
    reg_weight: Sequence[float],
    bag_size: Sequence[int],
    tau_cls: Sequence[float],
) -> None:
    """Compare an N = 1 result with hand-computed values."""
    assert result.gt_index.tolist() == [list(gt_index)]
    assert result.bag_size.tolist() == [list(bag_size)]

    def expect(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor([list(values)], dtype=torch.float64)

    torch.testing.assert_close(result.cls_weight, expect(cls_weight), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.reg_weight, expect(reg_weight), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.tau_cls, expect(tau_cls).reshape(1, -1), rtol=1e-5, atol=1e-6)


def assert_same(got: Result, ref: Result) -> None:
    """Discrete fields exactly equal, weights and tau close."""
    assert got.gt_index.shape == ref.gt_index.shape
    assert got.bag_size.shape == ref.bag_size.shape
    assert torch.equal(got.gt_index, ref.gt_index), (got.gt_index, ref.gt_index)
    assert torch.equal(got.bag_size, ref.bag_size), (got.bag_size, ref.bag_size)
    torch.testing.assert_close(got.cls_weight, ref.cls_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.reg_weight, ref.reg_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.tau_cls, ref.tau_cls, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Hand-computed cases (each runs on the implementation and on the reference)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("a1_pred_object", [0, 1])
def test_overlapping_boxes_resolved_by_iou(kind: str, a1_pred_object: int) -> None:
    # Box 0 = [0,0,10,10], box 1 = [4,4,14,14], one class, all scores 1.
    # a0 (2,2) is inside box 0 only, a2 (12,12) inside box 1 only, a1 (7,7) inside both.
    # a1 predicts one of the two boxes exactly: IoU 1 with it, and with the other
    # inter = 6*6 = 36, union = 100 + 100 - 36 = 164, IoU = 0.22, so a1 goes to the predicted box.
    # Every anchor then has p = q = 1, P = 1: nothing is cut from the bags, and inside the bag of
    # two all v tie, so the lower anchor index gets rank 0 and the other rank 1:
    # w_cls = exp(-1/sqrt(2)), w_reg = exp(-1/(sqrt(2)/2)) = exp(-sqrt(2)).
    boxes = [[0, 0, 10, 10], [4, 4, 14, 14]]
    problem = single_image(
        points=[[2, 2], [7, 7], [12, 12]],
        scores=[[1.0], [1.0], [1.0]],
        preds=[boxes[0], boxes[a1_pred_object], boxes[1]],
        boxes=boxes,
        classes=[0, 0],
    )
    result = assign(kind, problem)
    if a1_pred_object == 1:
        s2 = math.sqrt(2)
        check(result, [0, 1, 1], [1, 1, E1], [1, 1, E2], [1, 2], [1, s2])
    else:
        check(result, [0, 0, 1], [1, E1, 1], [1, E2, 1], [2, 1], [math.sqrt(2), 1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("swap", [False, True])
def test_iou_tie_goes_to_lowest_object_index(kind: str, swap: bool) -> None:
    # Boxes [0,0,10,10] and [2,0,12,10]; the point (5,5) is inside both and predicts
    # [1,0,11,10]: with either box inter = 9*10 = 90, union = 100 + 100 - 90 = 110, IoU = 9/11.
    # The tie goes to object 0 whichever box is listed first; object 1 gets an empty bag.
    boxes = [[0, 0, 10, 10], [2, 0, 12, 10]]
    if swap:
        boxes = boxes[::-1]
    problem = single_image([[5, 5]], [[0.5]], [[1, 0, 11, 10]], boxes, [0, 0])
    check(assign(kind, problem), [0], [1], [1], [1, 0], [1, 0])


@pytest.mark.parametrize("kind", KINDS)
def test_duplicate_boxes(kind: str) -> None:
    # Two identical boxes (different classes): every IoU ties, so all anchors go to object 0 and
    # object 1 (class 1, whose scores are higher) gets nothing. Both anchors share the same
    # prediction and score, so v ties and anchor order decides the ranks.
    box = [0, 0, 10, 10]
    problem = single_image(
        points=[[3, 3], [6, 6]],
        scores=[[0.5, 0.9], [0.5, 0.9]],
        preds=[[2, 2, 8, 8], [2, 2, 8, 8]],
        boxes=[box, box],
        classes=[0, 1],
    )
    check(assign(kind, problem), [0, 0], [1, E1], [1, E2], [2, 0], [math.sqrt(2), 0])


@pytest.mark.parametrize("kind", KINDS)
def test_points_on_border_are_outside(kind: str) -> None:
    # Box [0,0,10,10]: a point on any edge or corner has one distance equal to 0, so it is not
    # inside; only (5,5) is. Each anchor predicts the box itself (IoU 1).
    points = [[0, 5], [10, 5], [5, 0], [5, 10], [0, 0], [10, 10], [5, 5]]
    box = [0, 0, 10, 10]
    problem = single_image(points, [[1.0]] * 7, [box] * 7, [box], [0])
    check(assign(kind, problem), [-1] * 6 + [0], [0] * 6 + [1], [0] * 6 + [1], [1], [1])


@pytest.mark.parametrize("kind", KINDS)
def test_border_point_goes_to_the_box_containing_it(kind: str) -> None:
    # (10,5) lies on the right edge of box 0 = [0,0,10,10] and inside box 1 = [-5,-5,20,20].
    # Its prediction equals box 0 (IoU 1 vs 100/625 with box 1), but box 0 does not contain the
    # point, so the anchor goes to box 1.
    problem = single_image(
        [[10, 5]], [[1.0]], [[0, 0, 10, 10]], [[0, 0, 10, 10], [-5, -5, 20, 20]], [0, 0]
    )
    check(assign(kind, problem), [1], [1], [1], [0, 1], [0, 1])


@pytest.mark.parametrize("kind", KINDS)
def test_object_containing_no_point(kind: str) -> None:
    # Box 1 = [20,20,30,30] contains no point: bag_size 0 and tau_cls 0. (15,15) is in no box.
    problem = single_image(
        points=[[5, 5], [15, 15]],
        scores=[[0.7], [0.7]],
        preds=[[0, 0, 10, 10], [20, 20, 30, 30]],
        boxes=[[0, 0, 10, 10], [20, 20, 30, 30]],
        classes=[0, 0],
    )
    check(assign(kind, problem), [0, -1], [1, 0], [1, 0], [1, 0], [1, 0])


@pytest.mark.parametrize("kind", KINDS)
def test_anchor_slots_at_one_point_can_go_to_different_objects(kind: str) -> None:
    # A = 2 slots at (7,7), inside both boxes; slot 0 predicts box 0 and slot 1 predicts box 1.
    boxes = [[0, 0, 10, 10], [4, 4, 14, 14]]
    problem = single_image([[7, 7], [7, 7]], [[0.3], [0.3]], boxes, boxes, [0, 0])
    check(assign(kind, problem), [0, 1], [1, 1], [1, 1], [1, 1], [1, 1])


@pytest.mark.parametrize("kind", KINDS)
def test_bag_threshold_excludes_weak_anchor(kind: str) -> None:
    # One box of class 1; every prediction equals the box (q = 1), so P = p = class-1 score:
    # P = [0.9, 0.05, 0.5]; threshold 0.1 * 0.9 = 0.09 drops a1 (its class-0 score 1.0 must be
    # ignored). Bag {a0, a2}: v_cls = p^(1/3), v_reg = p, a0 has rank 0 and a2 rank 1 for both.
    box = [0, 0, 10, 10]
    problem = single_image(
        points=[[2, 2], [5, 5], [8, 8]],
        scores=[[0.0, 0.9], [1.0, 0.05], [0.0, 0.5]],
        preds=[box] * 3,
        boxes=[box],
        classes=[1],
    )
    check(assign(kind, problem), [0, -1, 0], [1, 0, E1], [1, 0, E2], [2], [math.sqrt(2)])


@pytest.mark.parametrize("kind", KINDS)
def test_bag_threshold_is_strict(kind: str) -> None:
    # b = 0.5, q = 1, P = [1.0, 0.5, 0.75]: 0.5 > 0.5 * 1.0 is false, so a1 is out; 0.75 is in.
    box = [0, 0, 10, 10]
    problem = single_image(
        [[2, 2], [5, 5], [8, 8]], [[1.0], [0.5], [0.75]], [box] * 3, [box], [0], bag_threshold=0.5
    )
    check(assign(kind, problem), [0, -1, 0], [1, 0, E1], [1, 0, E2], [2], [math.sqrt(2)])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("theta", [1.0, 4.0])
def test_theta_scales_iou_in_bag_threshold(kind: str, theta: float) -> None:
    # p = 1 for both anchors; a0 predicts the box (IoU 1), a1 predicts [0,0,10,5] (IoU 0.5).
    # theta = 1: P = [1, 0.5], both above 0.1. theta = 4: P = [1, 0.0625] and a1 is dropped.
    box = [0, 0, 10, 10]
    problem = single_image(
        [[5, 2], [5, 7]], [[1.0], [1.0]], [box, [0, 0, 10, 5]], [box], [0], theta=theta
    )
    if theta == 1.0:
        check(assign(kind, problem), [0, 0], [1, E1], [1, E2], [2], [math.sqrt(2)])
    else:
        check(assign(kind, problem), [0, -1], [1, 0], [1, 0], [1], [1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "criterion, alpha, cls_ranks, reg_ranks",
    [
        # All scores 0, so P = 0 everywhere and C_j = A_j (all three anchors), tau_cls = sqrt(3).
        # IoUs [0.25, 1, 0.5] (theta = 1, q = IoU).
        ("iou", 1 / 3, [2, 0, 1], [2, 0, 1]),  # v = q: a1, a2, a0
        ("mutual", 1 / 3, [0, 1, 2], [0, 1, 2]),  # v_cls = q * 0 = 0, v_reg = 0: index order
        ("mutual", 0.0, [2, 0, 1], [0, 1, 2]),  # v_cls = q * 0**0 = q (alpha = 0: v_cls = q)
        ("cls", 1 / 3, [0, 1, 2], [0, 1, 2]),  # v = p = 0: index order
    ],
)
def test_zero_max_p_keeps_whole_candidate_set(
    kind: str, criterion: str, alpha: float, cls_ranks: List[int], reg_ranks: List[int]
) -> None:
    box = [0, 0, 10, 10]
    problem = single_image(
        points=[[2, 2], [5, 5], [8, 8]],
        scores=[[0.0], [0.0], [0.0]],
        preds=[[0, 0, 5, 5], box, [0, 0, 10, 5]],
        boxes=[box],
        classes=[0],
        theta=1.0,
        criterion=criterion,
        alpha=alpha,
    )
    tau = math.sqrt(3)
    check(
        assign(kind, problem),
        [0, 0, 0],
        [math.exp(-r / tau) for r in cls_ranks],
        [math.exp(-r / (tau / 2)) for r in reg_ranks],
        [3],
        [tau],
    )


@pytest.mark.parametrize("kind", KINDS)
def test_zero_iou_keeps_whole_candidate_set(kind: str) -> None:
    # All predictions miss the box (IoU 0, q = 0), so P = 0 and C_j = A_j despite p > 0.
    # criterion 'cls': v = p = [0.2, 0.9, 0.5] gives ranks [2, 0, 1].
    box = [0, 0, 10, 10]
    far = [20, 20, 30, 30]
    problem = single_image(
        [[2, 2], [5, 5], [8, 8]], [[0.2], [0.9], [0.5]], [far] * 3, [box], [0], criterion="cls"
    )
    tau = math.sqrt(3)
    ranks = [2, 0, 1]
    check(
        assign(kind, problem),
        [0, 0, 0],
        [math.exp(-r / tau) for r in ranks],
        [math.exp(-2 * r / tau) for r in ranks],
        [3],
        [tau],
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "criterion, alpha, cls_first, reg_first",
    [
        # theta = 1. a0: p = 0.8, IoU 0.5; a1: p = 0.4, IoU 1. P = [0.4, 0.4], both in the bag.
        # alpha 1/3: v_cls = [0.5 * 0.8^(1/3), 0.4^(1/3)] = [0.464, 0.737] -> a1 first;
        #            v_reg = [0.8 * 0.5^(1/3), 0.4]      = [0.635, 0.4]   -> a0 first.
        ("mutual", 1 / 3, 1, 0),
        ("mutual", 0.0, 1, 0),  # v_cls = q = [0.5, 1], v_reg = p = [0.8, 0.4]
        ("mutual", 1.0, 0, 0),  # v = p * q = [0.4, 0.4] in float32: tie, index order
        ("cls", 1 / 3, 0, 0),  # v = p
        ("iou", 1 / 3, 1, 1),  # v = q
    ],
)
def test_mutual_rankings(
    kind: str, criterion: str, alpha: float, cls_first: int, reg_first: int
) -> None:
    box = [0, 0, 10, 10]
    problem = single_image(
        points=[[5, 2], [5, 7]],
        scores=[[0.8], [0.4]],
        preds=[[0, 0, 10, 5], box],
        boxes=[box],
        classes=[0],
        theta=1.0,
        criterion=criterion,
        alpha=alpha,
    )
    cls_w = [1.0, E1] if cls_first == 0 else [E1, 1.0]
    reg_w = [1.0, E2] if reg_first == 0 else [E2, 1.0]
    check(assign(kind, problem), [0, 0], cls_w, reg_w, [2], [math.sqrt(2)])


@pytest.mark.parametrize("kind", KINDS)
def test_bag_threshold_compares_float32_p_in_float64(kind: str) -> None:
    # q = 1, P = [1.0, float32(0.1)] and b = 0.1: float32(0.1) = 0.10000000149 > 0.1 * 1.0 in
    # float64, so a1 stays in the bag (a float32 product 0.1 * 1.0 would round to 0.10000000149
    # and drop it).
    box = [0, 0, 10, 10]
    problem = single_image([[2, 2], [5, 5]], [[1.0], [0.1]], [box] * 2, [box], [0])
    check(assign(kind, problem), [0, 0], [1, E1], [1, E2], [2], [math.sqrt(2)])


@pytest.mark.parametrize("kind", KINDS)
def test_p_is_computed_from_float64_q(kind: str) -> None:
    # Box [3,3,4,5] (area 2), both anchors predict [1,4,4,6] (area 6): inter 1, union 7,
    # IoU = 1/7; theta = 1, so q = 1/7 = 0.14285714285714285 in float64.
    # P = p * q rounded to float32, p = [float32(0.05), 0.5]:
    #   P0 = float32(0.0500000007450580597 / 7) = 0.0071428571827709675
    #   P1 = float32(0.5 / 7)                   = 0.0714285746216774
    # b * P1 = 0.0071428574621677406 > P0, so a0 is out of the bag.
    # (Taking q from the float32 IoU 0.142857149 instead would give P0 = 0.0071428576484 and
    # keep a0.)
    box = [3, 3, 4, 5]
    pred = [1, 4, 4, 6]
    problem = single_image(
        [[3.5, 3.5], [3.5, 4.5]], [[0.05], [0.5]], [pred, pred], [box], [0], theta=1.0
    )
    check(assign(kind, problem), [-1, 0], [0, 1], [0, 1], [1], [1])


# IoU(PRED_T, BOX_A) = 0.99902088875 < IoU(PRED_T, BOX_B) = 0.99902089493 in float64, but both
# round to the same float32 value, so the comparisons of the contract see a tie.
PRED_T = [0, 0, 2067, 2016]
BOX_A = [0, 0, 2068, 2015]
BOX_B = [0, 0, 2068, 2017]


@pytest.mark.parametrize("kind", KINDS)
def test_iou_compared_after_float32_rounding(kind: str) -> None:
    # The point is inside both boxes; the float32 IoUs tie, so object 0 (BOX_A) wins although
    # BOX_B has the larger float64 IoU.
    problem = single_image([[1000, 1000]], [[1.0]], [PRED_T], [BOX_A, BOX_B], [0, 0])
    check(assign(kind, problem), [0], [1], [1], [1, 0], [1, 0])


@pytest.mark.parametrize("kind", KINDS)
def test_ranking_compares_float32_values(kind: str) -> None:
    # One box PRED_T; a0 predicts BOX_A, a1 predicts BOX_B (IoU is symmetric, values above).
    # theta = 1, criterion 'iou': v = q = IoU ties in float32, so a0 (lower index) ranks first.
    problem = single_image(
        [[1000, 1000], [1000, 1001]],
        [[1.0], [1.0]],
        [BOX_A, BOX_B],
        [PRED_T],
        [0],
        theta=1.0,
        criterion="iou",
    )
    check(assign(kind, problem), [0, 0], [1, E1], [1, E2], [2], [math.sqrt(2)])


# Five anchors inside one box, q = 1, scores [0.6, 0.9, 0.5, 0.8, 0.7]: every P > 0.09, bag of 5,
# and both v_cls = p^(1/3) and v_reg = p order them the same way: ranks R = [3, 0, 4, 1, 2].
RANKS5 = [3, 0, 4, 1, 2]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "soft, temperature, tau_ratio, tau_cls, cls_w, reg_w",
    [
        # sqrt(5) = 2.236, tau_reg = 1.118
        (True, None, 2.0, 5**0.5, [math.exp(-r / 5**0.5) for r in RANKS5], None),
        # hard: cls R < 2.236 -> R in {0,1,2}; reg R < 1.118 -> R in {0,1}
        (False, None, 2.0, 5**0.5, [0, 1, 0, 1, 1], [0, 1, 0, 1, 0]),
        # fixed tau_cls = 4, tau_reg = 4 / 4 = 1
        (True, 4.0, 4.0, 4.0, [math.exp(-r / 4) for r in RANKS5], [math.exp(-r) for r in RANKS5]),
        # hard: cls R < 4 -> all but rank 4; reg R < 1 -> rank 0 only
        (False, 4.0, 4.0, 4.0, [1, 1, 0, 1, 1], [0, 1, 0, 0, 0]),
        # hard with tau = 2 for both heads: R < 2 is strict, rank 2 gets 0
        (False, 2.0, 1.0, 2.0, [0, 1, 0, 1, 0], [0, 1, 0, 1, 0]),
        # tau_ratio below 1: tau_reg = 2 / 0.5 = 4
        (
            True,
            2.0,
            0.5,
            2.0,
            [math.exp(-r / 2) for r in RANKS5],
            [math.exp(-r / 4) for r in RANKS5],
        ),
    ],
)
def test_weights_soft_hard_temperature_and_ratio(
    kind: str,
    soft: bool,
    temperature: Optional[float],
    tau_ratio: float,
    tau_cls: float,
    cls_w: List[float],
    reg_w: Optional[List[float]],
) -> None:
    box = [0, 0, 10, 10]
    problem = single_image(
        points=[[1, 1], [3, 3], [5, 5], [7, 7], [9, 9]],
        scores=[[0.6], [0.9], [0.5], [0.8], [0.7]],
        preds=[box] * 5,
        boxes=[box],
        classes=[0],
        soft=soft,
        temperature=temperature,
        tau_ratio=tau_ratio,
    )
    if reg_w is None:
        reg_w = [math.exp(-r / (tau_cls / tau_ratio)) for r in RANKS5]
    check(assign(kind, problem), [0] * 5, cls_w, reg_w, [5], [tau_cls])


# ----------------------------------------------------------------------------------------------
# Empty ground truth and batches
# ----------------------------------------------------------------------------------------------


def batch_problem(
    boxes_per_image: Sequence[Sequence[Sequence[float]]], num_anchors: int = 4, num_classes: int = 2
) -> Problem:
    """A batch whose anchors lie on a diagonal, each predicting [0,0,10,10], all scores 0.5."""
    num_images = len(boxes_per_image)
    points = torch.tensor([[2.0 + 2 * r, 2.0 + 2 * r] for r in range(num_anchors)])  # (R, 2)
    return Problem(
        points=points,
        scores=torch.full((num_images, num_anchors, num_classes), 0.5),
        pred_boxes=torch.tensor([0.0, 0.0, 10.0, 10.0]).repeat(num_images, num_anchors, 1),
        gt_boxes=[torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes_per_image],
        gt_classes=[torch.zeros(len(b), dtype=torch.long) for b in boxes_per_image],
        params={},
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_images", [1, 3])
def test_no_objects_in_any_image(kind: str, num_images: int) -> None:
    result = assign(kind, batch_problem([[]] * num_images))
    assert result.gt_index.tolist() == [[-1] * 4] * num_images
    assert result.cls_weight.abs().sum() == 0 and result.reg_weight.abs().sum() == 0
    assert result.bag_size.shape == (num_images, 0)
    assert result.tau_cls.shape == (num_images, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_some_images_without_objects(kind: str) -> None:
    # Points (2,2), (4,4), (6,6), (8,8), all predicting [0,0,10,10] with score 0.5.
    # Image 0: no objects. Image 1: box [0,0,5,5] holds anchors 0-1 (IoU 0.25 each, equal P),
    # M_max = 2 so its second column is padding. Image 2: (4,4) is inside both boxes (IoU 1 with
    # box 0 = [0,0,10,10], 9/100 with box 1 = [3,3,6,6]) and (6,6) is on the border of box 1,
    # so all four anchors go to box 0 and box 1 is left empty.
    result = assign(kind, batch_problem([[], [[0, 0, 5, 5]], [[0, 0, 10, 10], [3, 3, 6, 6]]]))
    assert result.gt_index.tolist() == [[-1] * 4, [0, 0, -1, -1], [0, 0, 0, 0]]
    assert result.bag_size.tolist() == [[0, 0], [2, 0], [4, 0]]
    torch.testing.assert_close(
        result.tau_cls, torch.tensor([[0.0, 0.0], [2**0.5, 0.0], [2.0, 0.0]], dtype=torch.float64)
    )
    # Image 2: all v tie, ranks = anchor index, tau_cls = 2, tau_reg = 1.
    torch.testing.assert_close(
        result.cls_weight[2], torch.tensor([math.exp(-r / 2) for r in range(4)]).double()
    )
    torch.testing.assert_close(
        result.reg_weight[2], torch.tensor([math.exp(-r) for r in range(4)]).double()
    )
    assert result.cls_weight[0].abs().sum() == 0


# ----------------------------------------------------------------------------------------------
# Random batches: implementation == reference, and invariants
# ----------------------------------------------------------------------------------------------

GRID = 6
COORDS = tuple(range(GRID + 1))  # box coordinates; sampled_from draws about uniformly
POINT_COORDS = tuple(k / 2 for k in range(2 * GRID + 1))  # integers lie on box borders
SCORE_VALUES = (0.0, 0.05, 0.1, 0.25, 0.5, 0.5, 0.9, 1.0, 1.0)


@st.composite
def gt_box(draw: st.DrawFn) -> List[int]:
    """A box with positive area on the integer grid [0, GRID]."""
    x1 = draw(st.sampled_from(COORDS[: GRID - 1]))
    y1 = draw(st.sampled_from(COORDS[: GRID - 1]))
    x2 = draw(st.sampled_from(COORDS[x1 + 1 :]))
    return [x1, y1, x2, draw(st.sampled_from(COORDS[y1 + 1 :]))]


@st.composite
def pred_box(draw: st.DrawFn, boxes: List[List[int]]) -> List[int]:
    """A ground-truth box (IoU 1, frequent ties), a nudged one, or a grid box (zero area allowed)."""
    kind = draw(st.integers(0, 3)) if boxes else 3
    if kind <= 1:
        return draw(st.sampled_from(boxes))
    if kind == 2:
        x1, y1, x2, y2 = (c + draw(st.integers(-1, 1)) for c in draw(st.sampled_from(boxes)))
        return [x1, y1, max(x1, x2), max(y1, y2)]
    x1 = draw(st.integers(-1, GRID))
    y1 = draw(st.integers(-1, GRID))
    return [x1, y1, draw(st.integers(x1, GRID + 1)), draw(st.integers(y1, GRID + 1))]


@st.composite
def problems(draw: st.DrawFn, max_anchors: int = 40) -> Problem:
    """Random batch: N 1-3, M 0-6 per image, R <= 40 with A 1-3 slots per point, C 1-4."""
    num_images = draw(st.integers(1, 3))
    num_classes = draw(st.integers(1, 4))
    slots = draw(st.integers(1, 3))
    num_locations = draw(st.integers(1, max_anchors // slots))
    locations = draw(
        st.lists(
            st.tuples(st.sampled_from(POINT_COORDS), st.sampled_from(POINT_COORDS)),
            min_size=num_locations,
            max_size=num_locations,
        )
    )
    points = torch.tensor(locations, dtype=torch.float32).repeat_interleave(slots, dim=0)
    num_anchors = points.shape[0]  # R = locations * A

    gt_boxes, gt_classes, preds, scores = [], [], [], []
    for _ in range(num_images):
        num_objects = draw(st.integers(0, 6))
        boxes: List[List[int]] = []
        for _ in range(num_objects):
            if boxes and draw(st.integers(0, 3)) == 0:
                boxes.append(draw(st.sampled_from(boxes)))  # duplicate box
            else:
                boxes.append(draw(gt_box()))
        classes = draw(
            st.lists(st.integers(0, num_classes - 1), min_size=num_objects, max_size=num_objects)
        )
        gt_boxes.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        gt_classes.append(torch.tensor(classes, dtype=torch.long))
        preds.append([draw(pred_box(boxes)) for _ in range(num_anchors)])
        scores.append(
            draw(
                st.lists(
                    st.lists(
                        st.sampled_from(SCORE_VALUES), min_size=num_classes, max_size=num_classes
                    ),
                    min_size=num_anchors,
                    max_size=num_anchors,
                )
            )
        )
    params = dict(
        theta=draw(st.sampled_from([1.0, 4.0])),
        bag_threshold=draw(st.sampled_from([0.1, 0.5])),
        alpha=draw(st.sampled_from([0.0, 1 / 3, 1.0])),
        tau_ratio=draw(st.sampled_from([1.0, 1.5, 2.0])),
        temperature=draw(st.sampled_from([None, None, 0.5, 2.0, 5.0])),
        soft=draw(st.booleans()),
        criterion=draw(st.sampled_from(CRITERIA)),
    )
    return Problem(
        points=points,
        scores=torch.tensor(scores, dtype=torch.float32).reshape(
            num_images, num_anchors, num_classes
        ),
        pred_boxes=torch.tensor(preds, dtype=torch.float32).reshape(num_images, num_anchors, 4),
        gt_boxes=gt_boxes,
        gt_classes=gt_classes,
        params=params,
    )


@settings(max_examples=200, deadline=None)
@given(problem=problems())
def test_matches_reference(problem: Problem) -> None:
    assert_same(assign("implementation", problem), assign("reference", problem))


@settings(max_examples=100, deadline=None)
@given(problem=problems())
def test_invariants(problem: Problem) -> None:
    result = assign("implementation", problem)
    params = {**DEFAULTS, **problem.params}
    num_images, num_anchors = problem.scores.shape[:2]
    m_max = max(len(b) for b in problem.gt_boxes)
    assert result.gt_index.shape == (num_images, num_anchors)
    assert result.cls_weight.shape == result.reg_weight.shape == (num_images, num_anchors)
    assert result.bag_size.shape == result.tau_cls.shape == (num_images, m_max)

    for w in (result.cls_weight, result.reg_weight):
        assert ((w >= 0) & (w <= 1)).all()
        assert (w[result.gt_index == -1] == 0).all()

    for n in range(num_images):
        boxes = problem.gt_boxes[n].tolist()
        index = result.gt_index[n]
        assert ((index >= -1) & (index < len(boxes))).all()
        assert (result.bag_size[n, len(boxes) :] == 0).all()
        for j in range(m_max):
            members = (index == j).nonzero().flatten().tolist()
            size = int(result.bag_size[n, j])
            assert size == len(members)
            tau = float(result.tau_cls[n, j])
            if size == 0:
                assert tau == 0
                continue
            # Bag members lie strictly inside their box.
            for i in members:
                assert point_in_box(*problem.points[i].tolist(), boxes[j])
            expected_tau = (
                math.sqrt(size) if params["temperature"] is None else params["temperature"]
            )
            assert math.isclose(tau, expected_tau, rel_tol=1e-6)
            for w, t in ((result.cls_weight, tau), (result.reg_weight, tau / params["tau_ratio"])):
                bag_w = sorted(w[n, members].tolist(), reverse=True)
                if params["soft"]:
                    # Ranks are a permutation of 0..|C|-1: the weights are exp(-k / tau).
                    expected = [math.exp(-k / t) for k in range(size)]
                    assert bag_w[0] == 1.0 and (size == 1 or bag_w[1] < 1.0)
                else:
                    # Hard: weight 1 for ranks k < tau, i.e. min(|C|, ceil(tau)) ones.
                    expected = [1.0 if k < t else 0.0 for k in range(size)]
                torch.testing.assert_close(
                    torch.tensor(bag_w, dtype=torch.float64),
                    torch.tensor(expected, dtype=torch.float64),
                    rtol=1e-5,
                    atol=1e-6,
                )
            if params["soft"] and params["temperature"] is None:
                assert (result.cls_weight[n, members] > 0).all()
                assert (result.reg_weight[n, members] > 0).all()

        # Anchors whose point is inside no box are never assigned.
        for i in range(num_anchors):
            if not any(point_in_box(*problem.points[i].tolist(), b) for b in boxes):
                assert index[i] == -1


@settings(max_examples=50, deadline=None)
@given(problem=problems())
def test_images_are_assigned_independently(problem: Problem) -> None:
    whole = assign("implementation", problem)
    m_max = whole.bag_size.shape[1]
    for n in range(problem.scores.shape[0]):
        alone = assign(
            "implementation",
            Problem(
                points=problem.points,
                scores=problem.scores[n : n + 1],
                pred_boxes=problem.pred_boxes[n : n + 1],
                gt_boxes=[problem.gt_boxes[n]],
                gt_classes=[problem.gt_classes[n]],
                params=problem.params,
            ),
        )
        m_n = alone.bag_size.shape[1]
        assert m_n == len(problem.gt_boxes[n])
        assert torch.equal(alone.gt_index[0], whole.gt_index[n])
        assert torch.equal(alone.bag_size[0], whole.bag_size[n, :m_n])
        assert (whole.bag_size[n, m_n:m_max] == 0).all()
        torch.testing.assert_close(alone.cls_weight[0], whole.cls_weight[n])
        torch.testing.assert_close(alone.reg_weight[0], whole.reg_weight[n])
        torch.testing.assert_close(alone.tau_cls[0], whole.tau_cls[n, :m_n])


@pytest.mark.parametrize("kind", KINDS)
def test_degenerate_boxes_give_finite_empty_bags(kind: str) -> None:
    # Object 0 = [5,0,5,10] has zero width (contains no point) and anchor 1 predicts a zero-area
    # box [5,5,5,5]; a naive IoU would be 0/0 for that pair. Object 1 = [0,0,10,10] takes both
    # anchors: IoU [1, 0] (theta 4: q = [1, 0]), P = [0.5, 0], so anchor 1 is dropped.
    problem = single_image(
        points=[[2, 2], [5, 5]],
        scores=[[0.5], [0.5]],
        preds=[[0, 0, 10, 10], [5, 5, 5, 5]],
        boxes=[[5, 0, 5, 10], [0, 0, 10, 10]],
        classes=[0, 0],
    )
    result = assign(kind, problem)
    check(result, [1, -1], [1, 0], [1, 0], [0, 1], [0, 1])


# ----------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("alpha", -0.1),
        ("alpha", 1.5),
        ("bag_threshold", 0.0),
        ("bag_threshold", 1.0),
        ("bag_threshold", -0.2),
        ("bag_threshold", 1.2),
        ("criterion", "both"),
        ("theta", 0.0),
        ("theta", -1.0),
        ("tau_ratio", 0.0),
        ("tau_ratio", -2.0),
        ("temperature", 0.0),
        ("temperature", -1.0),
    ],
)
def test_invalid_hyper_parameters(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        make_assigner(**{name: value})


@pytest.mark.parametrize(
    "overrides",
    [dict(alpha=0.0), dict(alpha=1.0), dict(temperature=5.0), dict(criterion="iou")],
)
def test_valid_boundary_hyper_parameters(overrides: Dict[str, Any]) -> None:
    make_assigner(**overrides)


def _valid_inputs() -> Dict[str, Any]:
    """N = 2, R = 3, C = 2 with one object per image."""
    return dict(
        points=torch.tensor([[2.0, 2.0], [5.0, 5.0], [8.0, 8.0]]),  # (R, 2)
        scores=torch.full((2, 3, 2), 0.5),  # (N, R, C)
        pred_boxes=torch.tensor([0.0, 0.0, 10.0, 10.0]).repeat(2, 3, 1),  # (N, R, 4)
        gt_boxes=[torch.tensor([[0.0, 0.0, 10.0, 10.0]])] * 2,
        gt_classes=[torch.tensor([1])] * 2,
    )


@pytest.mark.parametrize(
    "field, bad",
    [
        ("points", torch.zeros(4, 2)),  # R mismatch
        ("points", torch.zeros(3, 3)),  # not (R, 2)
        ("scores", torch.full((1, 3, 2), 0.5)),  # N mismatch
        ("scores", torch.full((2, 4, 2), 0.5)),  # R mismatch
        ("pred_boxes", torch.zeros(2, 3, 3)),  # not (..., 4)
        ("pred_boxes", torch.zeros(2, 2, 4)),  # R mismatch
        ("gt_boxes", [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]),  # one image missing
        ("gt_boxes", [torch.zeros(1, 3)] * 2),  # not (M, 4)
        ("gt_classes", [torch.tensor([1])]),  # one image missing
        ("gt_classes", [torch.tensor([1, 0])] * 2),  # M mismatch with gt_boxes
    ],
)
def test_mismatched_shapes(field: str, bad: Any) -> None:
    inputs = _valid_inputs()
    order = ("points", "scores", "pred_boxes", "gt_boxes", "gt_classes")
    make_assigner()(AnchorList(inputs["points"]), *(inputs[k] for k in order[1:]))  # accepted
    inputs[field] = bad
    with pytest.raises(ValueError):
        make_assigner()(AnchorList(inputs["points"]), *(inputs[k] for k in order[1:]))
