"""The two box tests assigners share: strict point-in-box and IoU of matched box rows."""

from __future__ import annotations

import torch
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou
from torch import Tensor

__all__ = ["matched_box_iou", "points_in_boxes"]


def points_in_boxes(points: Tensor, boxes: Tensor) -> Tensor:
    """(..., R) bool: point r lies strictly inside the box, for points (R, 2) and boxes (..., 4)
    XYXY, compared in float32 (zero-padded and empty boxes contain no point)."""
    px, py = points[:, 0].float(), points[:, 1].float()  # (R,)
    boxes = boxes.float()
    inside = px > boxes[..., 0, None]  # (..., R)
    inside &= py > boxes[..., 1, None]
    inside &= px < boxes[..., 2, None]
    inside &= py < boxes[..., 3, None]
    return inside


def matched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(P,) IoU of matching rows of two (P, 4) XYXY tensors, in their dtype (Detectron2's
    ``matched_pairwise_iou``); 0 where the boxes do not overlap, also for empty or inverted boxes
    (whose union may be 0)."""
    iou = matched_pairwise_iou(_boxes(boxes1), _boxes(boxes2))
    return torch.nan_to_num(iou, nan=0.0)


def _boxes(tensor: Tensor) -> Boxes:
    """``Boxes`` around ``tensor`` keeping its dtype (float64 IoUs stay float64)."""
    boxes = Boxes.__new__(Boxes)
    boxes.tensor = tensor
    return boxes
