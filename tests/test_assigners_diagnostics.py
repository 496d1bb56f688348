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
from musu.size_bands import SIZE_BANDS

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
        bands = [b for b, _, _ in SIZE_BANDS if f"objects_{b}" in out]
        assert sum(out[f"objects_{b}"] for b in bands) == out["objects"]
        for band in bands:
            band_shares = [v for k, v in out.items() if k.startswith("members_share_s")
                           and k.endswith(f"_{band}")]  # fmt: skip
            assert len(band_shares) == 3 and sum(band_shares) == pytest.approx(1.0)
            assert 0 <= out[f"member_iou_{band}"] <= 1
        if isinstance(assigner, MuSuAssigner):
            assert out["bag_size"] == out["members_mean"] and out["tau_cls"] > 0
            assert "cls_top_is_best_iou" in out
            assert all(f"reg_top_iou_{b}" in out for b in bands)
        else:
            assert not [k for k in out if k.startswith("reg_top_")]


# Size bands: one small (20 x 20), one medium (60 x 60) box in image 0, one large (200 x 200)
# in image 1 (image 1 has one object: padding to M_max = 2 must not mix the images up).
BAND_POINTS = torch.tensor(
    [[10.0, 10], [14, 10], [70, 30], [95, 50], [60, 30], [100, 200], [150, 250], [20, 120],
     [300, 300]]
)  # fmt: skip
BAND_STRIDES = torch.tensor([8.0, 8, 16, 16, 32, 32, 32, 64, 8])
BAND_GT = [
    torch.tensor([[0.0, 0, 20, 20], [40, 0, 100, 60]]),
    torch.tensor([[0.0, 100, 200, 300]]),
]


def _band_case(reg_weight_0, reg_weight_1):
    # small <- anchors 0, 1; medium <- anchors 2, 3, 4; large <- anchors 5, 6, 7; 8 unassigned
    gt_index = torch.tensor([[0, 0, 1, 1, 1, -1, -1, -1, -1], [-1, -1, -1, -1, -1, 0, 0, 0, -1]])
    cls_weight = torch.tensor(
        [[1.0, 0.5, 0.8, 0.4, 0.2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0.6, 0.3, 0.1, 0]]
    )
    reg_weight = torch.tensor([reg_weight_0, reg_weight_1])
    far = [0.0, 0, 1, 1]
    pred = torch.tensor(
        [
            # small: IoU 1 and 0.5; medium: 0.5, 1, 0
            [[0.0, 0, 20, 20], [0, 0, 10, 20], [40, 0, 100, 30], [40, 0, 100, 60], far, far, far,
             far, far],
            # large: IoU 0.5, 0.5, 1
            [far, far, far, far, far, [0, 100, 100, 300], [0, 100, 200, 200], [0, 100, 200, 300],
             far],
        ]
    )  # fmt: skip
    return Assignment(gt_index, cls_weight, reg_weight), pred


def test_size_bands_by_hand() -> None:
    # Largest reg weight: small at anchor 1, medium at anchor 3, large at anchor 5.
    assignment, pred = _band_case(
        [0.25, 0.75, 0.2, 0.9, 0.1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1.0, 0.5, 0.25, 0]
    )
    out = assignment_diagnostics(assignment, AnchorList(BAND_POINTS, BAND_STRIDES), pred, BAND_GT)
    assert out["objects"] == 3
    for band, members, cls, reg in (
        ("small", 2, 1.0 + 0.5, 0.25 + 0.75),
        ("medium", 3, 0.8 + 0.4 + 0.2, 0.2 + 0.9 + 0.1),
        ("large", 3, 0.6 + 0.3 + 0.1, 1.0 + 0.5 + 0.25),
    ):
        assert out[f"objects_{band}"] == 1
        assert out[f"members_mean_{band}"] == members
        assert out[f"cls_weight_per_object_{band}"] == pytest.approx(cls)
        assert out[f"reg_weight_per_object_{band}"] == pytest.approx(reg)
    # Members per stride: small: two on 8; medium: two on 16, one on 32; large: two on 32, one
    # on 64. Every level of the grid is listed for every band.
    shares = {
        "small": {8: 1.0, 16: 0.0, 32: 0.0, 64: 0.0},
        "medium": {8: 0.0, 16: 2 / 3, 32: 1 / 3, 64: 0.0},
        "large": {8: 0.0, 16: 0.0, 32: 2 / 3, 64: 1 / 3},
    }
    for band, by_stride in shares.items():
        for stride, share in by_stride.items():
            assert out[f"members_share_s{stride}_{band}"] == pytest.approx(share)
    # Mean IoU of all members: small (1 + 0.5) / 2, medium (0.5 + 1 + 0) / 3, large 2 / 3.
    assert out["member_iou_small"] == pytest.approx(0.75)
    assert out["member_iou_medium"] == pytest.approx(0.5)
    assert out["member_iou_large"] == pytest.approx(2 / 3)
    # The rank-0 regression sample's IoU: anchor 1: 0.5, anchor 3: 1, anchor 5: 0.5.
    assert out["reg_top_iou_small"] == pytest.approx(0.5)
    assert out["reg_top_iou_medium"] == pytest.approx(1.0)
    assert out["reg_top_iou_large"] == pytest.approx(0.5)
    # Its point against the box centre:
    # small: (14, 10) vs (10, 10), half size 10, stride 8: 4 < 12 -> near; offset 4 / 10
    # medium: (95, 50) vs (70, 30), half size 30, stride 16: 25 >= 24 -> not near; 25 / 30
    # large: (100, 200) vs (100, 200), stride 32: at the centre, offset 0
    assert out["reg_top_centre_small"] == 1.0
    assert out["reg_top_centre_medium"] == 0.0
    assert out["reg_top_centre_large"] == 1.0
    assert out["reg_top_offset_small"] == pytest.approx(0.4)
    assert out["reg_top_offset_medium"] == pytest.approx(25 / 30)
    assert out["reg_top_offset_large"] == 0.0


def test_size_bands_equal_weights_and_missing_bands() -> None:
    # Equal weights (the FCOS rule): member IoU, no rank-0 statistics.
    ones = [1.0, 1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1, 0]
    assignment, pred = _band_case(*ones)
    assignment.cls_weight = (assignment.gt_index >= 0).float()
    out = assignment_diagnostics(assignment, AnchorList(BAND_POINTS, BAND_STRIDES), pred, BAND_GT)
    assert out["member_iou_medium"] == pytest.approx(0.5)
    assert out["cls_weight_per_object_large"] == 3 and out["reg_weight_per_object_small"] == 2
    assert not [k for k in out if k.startswith("reg_top_")]
    # Only the small object has members: no medium or large keys.
    assignment.gt_index[0, 2:] = -1
    assignment.gt_index[1] = -1
    assignment.cls_weight = (assignment.gt_index >= 0).float()
    assignment.reg_weight = assignment.cls_weight.clone()
    out = assignment_diagnostics(assignment, AnchorList(BAND_POINTS, BAND_STRIDES), pred, BAND_GT)
    assert out["objects_small"] == 1
    assert not [k for k in out if k.endswith("_medium") or k.endswith("_large")]


def test_size_band_thresholds_on_sqrt_area() -> None:
    # sqrt(w * h): 31.5 x 31.5 small; 32 x 32 and 16 x 64 (area 32^2) medium; 95 x 95 medium;
    # 96 x 96 and 48 x 192 (area 96^2) large. One member each, at its own anchor.
    gt = [
        torch.tensor(
            [[0.0, 0, 31.5, 31.5], [0, 0, 32, 32], [0, 0, 16, 64], [0, 0, 95, 95],
             [0, 0, 96, 96], [0, 0, 48, 192]]
        )
    ]  # fmt: skip
    gt_index = torch.arange(6)[None]
    ones = torch.ones(1, 6)
    out = assignment_diagnostics(
        Assignment(gt_index, ones, ones), AnchorList(POINTS, STRIDES), torch.zeros(1, 6, 4), gt
    )
    assert (out["objects_small"], out["objects_medium"], out["objects_large"]) == (1, 3, 2)


def test_regression_weight_follows_the_regression_target() -> None:
    # reg_gt_index sends anchor 8 (unassigned for cls) to the small object with the largest
    # reg weight: the small object's reg statistics count it, its cls statistics do not.
    assignment, pred = _band_case(
        [0.25, 0.75, 0.2, 0.9, 0.1, 0, 0, 0, 1.0], [0, 0, 0, 0, 0, 1.0, 0.5, 0.25, 0]
    )
    assignment.reg_gt_index = assignment.gt_index.clone()
    assignment.reg_gt_index[0, 8] = 0
    pred[0, 8] = torch.tensor([0.0, 0, 20, 10])  # IoU 0.5 with the small box
    out = assignment_diagnostics(assignment, AnchorList(BAND_POINTS, BAND_STRIDES), pred, BAND_GT)
    assert out["members_mean_small"] == 2 and out["cls_weight_per_object_small"] == 1.5
    assert out["reg_weight_per_object_small"] == pytest.approx(2.0)
    # anchor 8 at (300, 300), stride 8: far outside; offset max(290, 290) / 10
    assert out["reg_top_centre_small"] == 0.0
    assert out["reg_top_offset_small"] == pytest.approx(29.0)
    assert out["reg_top_iou_small"] == pytest.approx(0.5)
