"""The shared box tests: strict point-in-box and matched-row IoU (Detectron2's)."""

from __future__ import annotations

import torch
from detectron2.structures import Boxes, pairwise_iou

from musu.modeling.assigners import matched_box_iou, points_in_boxes


def test_points_in_boxes_is_strict() -> None:
    points = torch.tensor([[5.0, 5.0], [0.0, 5.0], [10.0, 10.0], [9.5, 0.5]])
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]]])  # (1, 2, 4)
    inside = points_in_boxes(points, boxes)
    assert inside.shape == (1, 2, 4)
    assert inside.tolist() == [[[True, False, False, True], [False] * 4]]


def test_matched_box_iou_equals_the_diagonal_of_pairwise_iou() -> None:
    gen = torch.Generator().manual_seed(0)
    corner = torch.rand(20, 2, generator=gen) * 50
    boxes1 = torch.cat([corner, corner + 1 + torch.rand(20, 2, generator=gen) * 40], 1)
    corner = torch.rand(20, 2, generator=gen) * 50
    boxes2 = torch.cat([corner, corner + 1 + torch.rand(20, 2, generator=gen) * 40], 1)
    expected = pairwise_iou(Boxes(boxes1), Boxes(boxes2)).diagonal()
    torch.testing.assert_close(matched_box_iou(boxes1, boxes2), expected)


def test_matched_box_iou_keeps_float64_and_is_zero_for_empty_unions() -> None:
    a = torch.tensor([[0.0, 0.0, 3.0, 3.0], [5.0, 5.0, 5.0, 5.0], [2.0, 2.0, 1.0, 1.0]]).double()
    b = torch.tensor([[1.0, 1.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0], [1.0, 1.0, 2.0, 2.0]]).double()
    iou = matched_box_iou(a, b)
    assert iou.dtype == torch.float64
    assert iou.tolist() == [4.0 / 14.0, 0.0, 0.0]
