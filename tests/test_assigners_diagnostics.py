"""``assignment_diagnostics``: the logging scalars of an assignment, checked on hand-made cases.

Notation: N images, R anchors. Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch

from musu.modeling.assigners import (
    AnchorGrid,
    AnchorList,
    Assignment,
    FCOSAssigner,
    MuSuAssigner,
    assignment_diagnostics,
)

# Six anchors: three on stride 8, two on stride 16, one on stride 32.
POINTS = torch.tensor([[5.0, 5], [15, 5], [25, 5], [10, 10], [30, 10], [20, 20]])
STRIDES = torch.tensor([8.0, 8, 8, 16, 16, 32])
GT = [torch.tensor([[0.0, 0, 20, 20], [20, 0, 40, 40]])]  # two objects in one image


def _case():
    # Object 0 <- anchors 0, 1, 3; object 1 <- anchors 2, 5; anchor 4 unassigned.
    gt_index = torch.tensor([[0, 0, 1, 0, -1, 1]])
    cls_weight = torch.tensor([[0.5, 1.0, 1.0, 0.25, 0.0, 0.5]])
    reg_weight = torch.tensor([[1.0, 0.5, 0.5, 0.0, 0.0, 1.0]])
    # Predicted boxes: object 0's best IoU is anchor 1 (its exact box), object 1's is anchor 5.
    pred = torch.tensor(
        [[[0.0, 0, 10, 10], [0, 0, 20, 20], [20, 0, 30, 10], [0, 0, 5, 5], [0, 0, 1, 1],
          [20, 0, 40, 40]]]
    )  # fmt: skip
    stats = {"tau_cls": torch.tensor([[2.0, 4.0]])}
    return Assignment(gt_index, cls_weight, reg_weight, stats=stats), pred


def test_counts_weights_levels_and_best_iou() -> None:
    assignment, pred = _case()
    out = assignment_diagnostics(assignment, AnchorList(POINTS, STRIDES), pred, GT)
    assert out["objects"] == 2
    assert out["members_mean"] == 2.5  # 3 and 2 members
    # torch.quantile (linear): p10 = 2 + 0.1 * (3 - 2), p50 = 2.5, p90 = 2.9
    assert out["members_p10"] == pytest.approx(2.1)
    assert out["members_p50"] == pytest.approx(2.5)
    assert out["members_p90"] == pytest.approx(2.9)
    assert out["cls_weight_per_object"] == pytest.approx((0.5 + 1 + 0.25 + 1 + 0.5) / 2)
    assert out["reg_weight_per_object"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 2)
    # members on stride 8: anchors 0, 1, 2; stride 16: 3; stride 32: 5 (5 members in all)
    assert out["level_share_s8"] == pytest.approx(3 / 5)
    assert out["level_share_s16"] == pytest.approx(1 / 5)
    assert out["level_share_s32"] == pytest.approx(1 / 5)
    # cls weight: stride 8 holds 0.5 + 1 + 1 of 3.25
    assert out["level_cls_weight_share_s8"] == pytest.approx(2.5 / 3.25)
    assert out["level_cls_weight_share_s32"] == pytest.approx(0.5 / 3.25)
    # object 0: largest cls weight at anchor 1 = best IoU; largest reg weight at anchor 0: no.
    # object 1: largest cls weight at anchor 2 (IoU 0.125), best IoU anchor 5: no; reg top 5: yes.
    assert out["cls_top_is_best_iou"] == 0.5
    assert out["reg_top_is_best_iou"] == 0.5
    assert out["tau_cls"] == 3.0


def test_equal_weights_have_no_top_statistics_and_empty_is_empty() -> None:
    gt_index = torch.tensor([[0, 0, -1, -1, -1, -1]])
    ones = (gt_index >= 0).float()
    out = assignment_diagnostics(
        Assignment(gt_index, ones, ones), AnchorList(POINTS, STRIDES), torch.zeros(1, 6, 4), GT
    )
    assert out["members_mean"] == 2 and out["cls_weight_per_object"] == 2
    assert "cls_top_is_best_iou" not in out and "reg_top_is_best_iou" not in out
    assert math.isclose(sum(v for k, v in out.items() if k.startswith("level_share_")), 1.0)
    nobody = torch.full((1, 6), -1)
    zeros = torch.zeros(1, 6)
    assert assignment_diagnostics(Assignment(nobody, zeros, zeros), AnchorList(POINTS, STRIDES),
                                  torch.zeros(1, 6, 4), GT) == {}  # fmt: skip


def test_musu_and_fcos_rule_on_one_grid() -> None:
    """Both real assigners on one FPN grid: members match their own counts, shares sum to 1."""
    grid = AnchorGrid(((8, 8), (4, 4), (2, 2)), (8, 16, 32), 1)
    points, strides = grid.points(), grid.point_strides()
    pred = torch.cat([points - strides[:, None], points + strides[:, None]], dim=1)[None]
    scores = torch.full((1, grid.num_slots, 2), 0.01)
    gt_boxes, gt_classes = [torch.tensor([[4.0, 4, 40, 44], [30, 20, 60, 60]])], [
        torch.tensor([0, 1])
    ]
    for assigner in (MuSuAssigner(), FCOSAssigner(center_sampling_radius=1.5)):
        assignment = assigner(grid, scores, pred, gt_boxes, gt_classes)
        out = assignment_diagnostics(assignment, grid, pred, gt_boxes)
        members = int((assignment.gt_index >= 0).sum())
        assert out["members_mean"] * out["objects"] == pytest.approx(members)
        shares = sum(v for k, v in out.items() if k.startswith("level_share_"))
        assert shares == pytest.approx(1.0)
        if isinstance(assigner, MuSuAssigner):
            assert out["bag_size"] == out["members_mean"] and out["tau_cls"] > 0
            assert "cls_top_is_best_iou" in out
