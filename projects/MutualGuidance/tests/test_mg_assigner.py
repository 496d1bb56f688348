"""``MutualGuidanceAssigner`` (anchor boxes): hand cases from the paper's rules, the four switch
combinations, agreement with Detectron2's RetinaNet labels, and hypothesis equivalence with the
plain-loop reference (``reference_mg.py``).
Notation: N images, R anchors, C classes, M objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

import pytest
import torch
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, pairwise_iou
from hypothesis import given, settings
from hypothesis import strategies as st

from musu.modeling.assigners import AnchorList, Assignment
from musu_mg import MutualGuidanceAssigner

from mg_lists import implementation_lists
from reference_mg import as_lists, reference_mutual_guidance


@dataclass
class Problem:
    anchors: List[List[float]]  # R boxes
    scores: List[List[List[float]]]  # [n][r][c]
    pred_boxes: List[List[List[float]]]  # [n][r] box
    gt_boxes: List[List[List[float]]]  # [n][j] box
    gt_classes: List[List[int]]
    params: Dict[str, Any] = field(default_factory=dict)


def run(problem: Problem) -> Assignment:
    return MutualGuidanceAssigner(**problem.params)(
        AnchorList(boxes=torch.tensor(problem.anchors, dtype=torch.float32).reshape(-1, 4)),
        torch.tensor(problem.scores, dtype=torch.float32),
        torch.tensor(problem.pred_boxes, dtype=torch.float32),
        [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in problem.gt_boxes],
        [torch.tensor(c, dtype=torch.long) for c in problem.gt_classes],
    )


def reference_lists(problem: Problem) -> Dict[str, list]:
    # The reference reads float32-rounded inputs, like the implementation.
    rounded = lambda x: torch.tensor(x, dtype=torch.float32).tolist()  # noqa: E731
    return as_lists(
        reference_mutual_guidance(
            rounded(problem.anchors),
            rounded(problem.scores),
            rounded(problem.pred_boxes),
            [rounded(b) for b in problem.gt_boxes],
            problem.gt_classes,
            **problem.params,
        )
    )


def single(anchors, scores, preds, boxes, classes, **params) -> Problem:
    return Problem(anchors, [scores], [preds], [boxes], [classes], params)


# --------------------------------------------------------------------------------------------
# Hand cases.
# --------------------------------------------------------------------------------------------

# One object [0, 0, 10, 10]; anchors of IoU 1, 0.6, 0.45, 0.3, 0 -> static: a0, a1 positive
# (N_p = 2), a2 ignored (N_i = 1), a3, a4 negative.
BOAT = [0.0, 0.0, 10.0, 10.0]
ANCHORS = [[0, 0, 10, 10], [0, 0, 10, 6], [0, 0, 10, 4.5], [0, 0, 10, 3], [20, 20, 30, 30]]
# Regressed boxes: IoU_regressed = 0.2, 0, 0.8, 0.9, 1 for a0..a4.
PREDS = [[0, 0, 10, 2], [50, 50, 60, 60], [0, 0, 10, 8], [0, 0, 10, 9], [0, 0, 10, 10]]
# p of the object's class: amplified IoU (sigma 2) = 1, 0.6, sqrt(0.45) = 0.671, sqrt(0.3), 0.
SCORES = [[0.0], [0.0], [1.0], [1.0], [1.0]]


def boat(**params) -> Problem:
    return single(ANCHORS, SCORES, PREDS, [BOAT], [0], **params)


def test_static_counts_n_p_and_n_i() -> None:
    result = run(boat(l2c=False, c2l=False))
    assert result.stats["bag_size"].tolist() == [[2]] and result.stats["num_ignored"].tolist() == [
        [1]
    ]
    assert result.gt_index.tolist() == [[0, 0, -1, -1, -1]]
    assert result.ignore.tolist() == [[False, False, True, False, False]]
    assert result.reg_gt_index.tolist() == [[0, 0, -1, -1, -1]]


def test_localize_to_classify_top_n_p_positive_next_n_i_ignored() -> None:
    result = run(boat(l2c=True, c2l=False))
    # IoU_regressed order a4 (1) > a3 (0.9) > a2 (0.8) > a0 (0.2): positives a4, a3; a2 ignored.
    assert result.gt_index.tolist() == [[-1, -1, -1, 0, 0]]
    assert result.ignore.tolist() == [[False, False, True, False, False]]
    assert result.cls_weight.tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0]]
    assert result.reg_gt_index.tolist() == [[0, 0, -1, -1, -1]]  # regression stays static


def test_classify_to_localize_top_n_p_amplified() -> None:
    result = run(boat(l2c=False, c2l=True))
    # Amplified: a0 1, a2 0.671 > a1 0.6 (a1's p = 0 leaves it at IoU_anchor).
    assert result.reg_gt_index.tolist() == [[0, -1, 0, -1, -1]]
    assert result.reg_weight.tolist() == [[1.0, 0.0, 1.0, 0.0, 0.0]]
    assert result.gt_index.tolist() == [[0, 0, -1, -1, -1]]  # classification stays static
    assert result.ignore.tolist() == [[False, False, True, False, False]]


def test_mutual_guidance_both() -> None:
    result = run(boat())
    assert result.gt_index.tolist() == [[-1, -1, -1, 0, 0]]
    assert result.ignore.tolist() == [[False, False, True, False, False]]
    assert result.reg_gt_index.tolist() == [[0, -1, 0, -1, -1]]
    # a2 is ignored for classification and a regression positive: the heads are decoupled.


def test_sigma_controls_amplification() -> None:
    # sigma = 3: a2 -> 0.45 ** (2/3) = 0.587 < 0.6 (a1): the static pair comes back.
    result = run(boat(l2c=False, c2l=True, sigma=3.0))
    assert result.reg_gt_index.tolist() == [[0, 0, -1, -1, -1]]


def test_best_anchor_rule_when_no_anchor_reaches_the_threshold() -> None:
    # IoUs 0.45 and 0.3: the best anchor a0 is positive (N_p = 1), so nothing is left ignored.
    problem = single([[0, 0, 10, 4.5], [0, 0, 10, 3]], [[0.5], [0.5]], [BOAT, BOAT], [BOAT], [0])
    result = run(problem)
    assert result.stats["bag_size"].tolist() == [[1]] and result.stats["num_ignored"].tolist() == [
        [0]
    ]
    # L2C: both regressed boxes are perfect (IoU 1 tie): the lower anchor index wins.
    assert result.gt_index.tolist() == [[0, -1]]
    assert result.ignore.tolist() == [[False, False]]
    assert result.reg_gt_index.tolist() == [[0, -1]]


def test_iou_exactly_at_the_thresholds() -> None:
    # IoU 28 / 40 = 0.7 (not representable; rounds like the threshold) and 20 / 40 = 0.5.
    anchors = [[0, 0, 4, 7], [0, 0, 5, 4], [0, 0, 5, 3]]
    problem = single(anchors, [[0.0]] * 3, anchors, [[0, 0, 5, 8]], [0], pos_iou=0.7, neg_iou=0.5)
    result = run(problem)
    assert result.gt_index.tolist() == [[0, -1, -1]]
    assert result.ignore.tolist() == [[False, True, False]]  # 0.5 >= NEG_IOU; 0.375 < it


def test_object_without_overlap_gets_nothing() -> None:
    problem = single([[0, 0, 10, 10]], [[0.9]], [[0, 0, 10, 10]], [[50, 50, 60, 60]], [0])
    result = run(problem)
    assert result.stats["bag_size"].tolist() == [[0]]
    assert result.gt_index.tolist() == [[-1]] and result.reg_gt_index.tolist() == [[-1]]


def test_conflict_goes_to_higher_criterion_then_lower_index() -> None:
    # Two objects, both with N_p = 1 (their best anchors a0, a1); the regressed box of a2 overlaps
    # object 1 more than object 0, and every other regressed box misses both objects.
    boxes = [[0, 0, 10, 10], [0, 0, 10, 8]]
    anchors = [[0, 0, 10, 10], [0, 0, 10, 8], [40, 40, 50, 50]]
    preds = [[90, 90, 95, 95], [90, 90, 95, 95], [0, 0, 10, 8]]
    problem = single(anchors, [[0.0]] * 3, preds, boxes, [0, 0], c2l=False)
    result = run(problem)
    assert result.stats["bag_size"].tolist() == [[1, 1]]
    # a2: IoU_regressed 0.8 with object 0, 1.0 with object 1 -> object 1; object 0 has no other
    # overlapping regressed box, so it has no classification positive this step.
    assert result.gt_index.tolist() == [[-1, -1, 1]]
    # Duplicate objects: equal criteria, the lower object index wins.
    problem = single(anchors, [[0.0]] * 3, preds, [boxes[1], boxes[1]], [0, 0], c2l=False)
    result = run(problem)
    assert result.gt_index.tolist() == [[-1, -1, 0]]


def test_positive_claim_beats_ignore_claim() -> None:
    # Object 0 = [0, 0, 10, 10], object 1 = its lower half. Anchors: a0 = object 0 (IoU 1 / 0.5),
    # a1 = [0, 0, 10, 4.5] (0.45 / 0: ignored), a2 = object 1 (0.5 / 1): N_p = [1, 1], N_i = [1, 0].
    boxes = [[0, 0, 10, 10], [0, 5, 10, 10]]
    anchors = [[0, 0, 10, 10], [0, 0, 10, 4.5], [0, 5, 10, 10]]
    # Regressed: a0 = object 0 (IoU_regressed 1 / 0.5), a1 = object 1 (0.5 / 1), a2 misses both.
    preds = [[0, 0, 10, 10], [0, 5, 10, 10], [50, 50, 60, 60]]
    result = run(single(anchors, [[0.0]] * 3, preds, boxes, [0, 0], c2l=False))
    assert result.stats["bag_size"].tolist() == [[1, 1]] and result.stats[
        "num_ignored"
    ].tolist() == [[1, 0]]
    # Object 0: a0 positive, a1 its ignore claim; object 1: a1 positive, which wins.
    assert result.gt_index.tolist() == [[0, 1, -1]]
    assert result.ignore.tolist() == [[False, False, False]]


def test_no_objects() -> None:
    for num_images in (1, 2):
        problem = Problem(
            ANCHORS, [SCORES] * num_images, [PREDS] * num_images, [[]] * num_images,
            [[]] * num_images,
        )  # fmt: skip
        result = run(problem)
        assert result.gt_index.shape == (num_images, 5)
        assert (result.gt_index == -1).all() and (result.reg_gt_index == -1).all()
        assert not result.ignore.any()
        assert result.stats["bag_size"].shape == (num_images, 0)


def test_mixed_empty_and_nonempty_images() -> None:
    problem = Problem(ANCHORS, [SCORES] * 2, [PREDS] * 2, [[], [BOAT]], [[], [0]])
    result = run(problem)
    assert (result.gt_index[0] == -1).all() and not result.ignore[0].any()
    assert result.stats["bag_size"].tolist() == [[0], [2]]
    assert result.gt_index[1].tolist() == [-1, -1, -1, 0, 0]


def test_invalid_inputs_rejected() -> None:
    assigner = MutualGuidanceAssigner()
    anchors = torch.tensor(ANCHORS, dtype=torch.float32)
    scores = torch.tensor([SCORES], dtype=torch.float32)
    preds = torch.tensor([PREDS], dtype=torch.float32)
    gt = [torch.tensor([BOAT])]
    with pytest.raises(ValueError, match=r"boxes must have shape \(R, 4\)"):
        assigner(AnchorList(boxes=anchors[:, :2]), scores, preds, gt, [torch.tensor([0])])
    with pytest.raises(ValueError, match="anchor boxes"):
        assigner(AnchorList(anchors[:, :2]), scores, preds, gt, [torch.tensor([0])])
    grid = AnchorList(boxes=anchors)
    with pytest.raises(ValueError, match="gt_classes"):
        assigner(grid, scores, preds, gt, [torch.tensor([3])])
    with pytest.raises(ValueError, match="pred_boxes"):
        assigner(grid, scores, preds[:, :2], gt, [torch.tensor([0])])
    for kwargs in ({"sigma": 1.0}, {"pos_iou": 0.3, "neg_iou": 0.4}, {"neg_iou": 0.0}):
        with pytest.raises(ValueError):
            MutualGuidanceAssigner(**kwargs)


# --------------------------------------------------------------------------------------------
# Static labels agree with Detectron2's RetinaNet (Matcher [0.4, 0.5], low-quality matches).
# --------------------------------------------------------------------------------------------


def test_static_labels_match_detectron2_retinanet_without_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    matcher = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)
    compared = 0
    for _ in range(40):
        corner = torch.rand(60, 2, generator=gen) * 80
        anchors = torch.cat([corner, corner + 4 + torch.rand(60, 2, generator=gen) * 30], 1)
        corner = torch.rand(4, 2, generator=gen) * 80
        boxes = torch.cat([corner, corner + 4 + torch.rand(4, 2, generator=gen) * 30], 1)
        iou = pairwise_iou(Boxes(boxes), Boxes(anchors))  # (M, R)
        nearest = iou.argmax(dim=0)
        if not bool((nearest[iou.argmax(dim=1)] == torch.arange(4)).all()):
            continue  # Detectron2 would give a best anchor to another object: rule differs
        matched, labels = matcher(iou)
        result = MutualGuidanceAssigner(l2c=False, c2l=False)(
            AnchorList(boxes=anchors),
            torch.zeros(1, 60, 1),
            anchors[None],
            [boxes],
            [torch.zeros(4).long()],
        )
        expected_owner = torch.where(labels == 1, matched, -1)
        assert result.gt_index[0].tolist() == expected_owner.tolist()
        assert result.ignore[0].tolist() == (labels == -1).tolist()
        compared += 1
    assert compared >= 20


# --------------------------------------------------------------------------------------------
# The four switch combinations (Table 1 rows).
# --------------------------------------------------------------------------------------------


@st.composite
def boxes_strategy(draw, min_side: int = 0) -> List[float]:
    x, y = draw(st.integers(0, 12)), draw(st.integers(0, 12))
    w, h = draw(st.integers(min_side, 8)), draw(st.integers(min_side, 8))
    scale = draw(st.sampled_from([1.0, 0.5]))
    return [x * scale, y * scale, (x + w) * scale, (y + h) * scale]


# (POS_IOU, NEG_IOU): the paper's, wide ignore bands, no band, only perfect positives.
THRESHOLDS = [(0.5, 0.4), (0.5, 0.1), (0.7, 0.2), (0.5, 0.5), (1.0, 0.25)]
SCORE_VALUES = st.sampled_from([0.0, 0.25, 0.5, 1.0]) | st.floats(0, 1, width=32)


@st.composite
def near(draw, pool: List[List[float]]) -> List[float]:
    """A pool box with each side moved by up to 2 (IoUs around the thresholds)."""
    x0, y0, x1, y1 = draw(st.sampled_from(pool))
    d = [draw(st.integers(-2, 2)) for _ in range(4)]
    x0, y0 = x0 + d[0], y0 + d[1]
    return [x0, y0, max(x0, x1 + d[2]), max(y0, y1 + d[3])]


@st.composite
def problems(draw) -> Problem:
    """Small random cases on a coarse grid: duplicate boxes, IoUs at and around the thresholds,
    tied criteria, zero-size boxes, images without objects, one-anchor problems."""
    num_images = draw(st.integers(1, 3))
    num_anchors = draw(st.integers(1, 9))
    num_classes = draw(st.integers(1, 3))
    pool = draw(st.lists(boxes_strategy(min_side=4), min_size=1, max_size=3))
    box = near(pool) | boxes_strategy()
    anchors = draw(st.lists(box, min_size=num_anchors, max_size=num_anchors))
    gt_boxes, gt_classes, scores, preds = [], [], [], []
    for _ in range(num_images):
        boxes = draw(st.lists(st.sampled_from(pool) | box, max_size=4))
        gt_boxes.append(boxes)
        gt_classes.append(draw(st.lists(st.integers(0, num_classes - 1), min_size=len(boxes),
                                        max_size=len(boxes))))  # fmt: skip
        choices = box | st.sampled_from(anchors + pool)
        preds.append(draw(st.lists(choices, min_size=num_anchors, max_size=num_anchors)))
        scores.append(
            [draw(st.lists(SCORE_VALUES, min_size=num_classes, max_size=num_classes))
             for _ in range(num_anchors)]  # fmt: skip
        )
    pos_iou, neg_iou = draw(st.sampled_from(THRESHOLDS))
    params = {
        "l2c": draw(st.booleans()),
        "c2l": draw(st.booleans()),
        "sigma": draw(st.sampled_from([2.0, 1.5, 3.0])),
        "pos_iou": pos_iou,
        "neg_iou": neg_iou,
    }
    return Problem(anchors, scores, preds, gt_boxes, gt_classes, params)


@settings(max_examples=250, deadline=None)
@given(problem=problems())
def test_matches_reference(problem: Problem) -> None:
    assert implementation_lists(run(problem), problem.gt_boxes) == reference_lists(problem)


@settings(max_examples=60, deadline=None)
@given(problem=problems())
def test_switch_combinations(problem: Problem) -> None:
    params = problem.params
    static = run(Problem(**{**problem.__dict__, "params": {**params, "l2c": False, "c2l": False}}))
    l2c = run(Problem(**{**problem.__dict__, "params": {**params, "l2c": True, "c2l": False}}))
    c2l = run(Problem(**{**problem.__dict__, "params": {**params, "l2c": False, "c2l": True}}))
    both = run(Problem(**{**problem.__dict__, "params": {**params, "l2c": True, "c2l": True}}))
    # Static: both heads on the same anchors.
    assert torch.equal(static.gt_index, static.reg_gt_index)
    assert not bool((static.ignore & (static.gt_index >= 0)).any())
    # L2C only: regression = static positives; C2L only: classification = static labels.
    assert torch.equal(l2c.reg_gt_index, static.reg_gt_index)
    assert torch.equal(c2l.gt_index, static.gt_index) and torch.equal(c2l.ignore, static.ignore)
    # Both: classification from L2C, regression from C2L.
    assert torch.equal(both.gt_index, l2c.gt_index) and torch.equal(both.ignore, l2c.ignore)
    assert torch.equal(both.reg_gt_index, c2l.reg_gt_index)
    for result in (static, l2c, c2l, both):
        assert torch.equal(result.stats["bag_size"], static.stats["bag_size"])
        assert torch.equal(result.stats["num_ignored"], static.stats["num_ignored"])
        assert torch.equal(result.cls_weight, (result.gt_index >= 0).float())
        assert torch.equal(result.reg_weight, (result.reg_gt_index >= 0).float())
        assert not bool((result.ignore & (result.gt_index >= 0)).any())
        # No object gets more positives than its static count.
        for owner in (result.gt_index, result.reg_gt_index):
            for n in range(owner.shape[0]):
                m = result.stats["bag_size"].shape[1]
                counts = torch.bincount(owner[n][owner[n] >= 0], minlength=m)[:m]
                assert bool((counts <= result.stats["bag_size"][n]).all())
        assert int(result.ignore.sum()) <= int(result.stats["num_ignored"].sum())


def test_follows_the_assigner_protocol() -> None:
    """Called like every musu assigner, with the anchor boxes in an ``AnchorList``."""
    problem = Problem(ANCHORS, [SCORES] * 2, [PREDS] * 2, [[BOAT], []], [[0], []])
    result = run(problem)
    assert isinstance(result, Assignment)
    assert result.gt_index.shape == result.reg_gt_index.shape == result.ignore.shape == (2, 5)
    assert result.cls_weight.shape == result.reg_weight.shape == (2, 5)
    assert set(result.stats) == {"bag_size", "num_ignored"}
    assert all(value.shape == (2, 1) for value in result.stats.values())
