"""Mutual Guidance for anchor points (the paper's supplement, Sec. 2), vectorized, as a MuSu
assigner: ``MODEL.MUSU.ASSIGNER: "build_mg_anchor_free_assigner"`` on META_ARCH "MuSu".

Shapes: N images, M objects (padded to M_max), R anchor slots (points repeated A times), C classes.

1. Static reference: the FCOS rule (``musu.modeling.assigners.FCOSAssigner``: inside the box,
   centre sampling, per-level size ranges, smallest area wins); N_p(j) = its positives of j. FCOS
   has no ignore band, so N_i = 0: nothing is ever ignored.
2. Localize to Classify: among the slots whose point lies strictly inside object j (any level),
   the N_p(j) of highest IoU(regressed box, object) > 0 are classification positives (ties:
   lowest slot index); all other slots are negatives.
3. Classify to Localize: centerness(point, j) = sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))
   (> 0 exactly for inside points), amplified as centerness ** ((sigma - p) / sigma) with p the
   predicted probability of j's class; the N_p(j) highest are regression positives.
A slot claimed by several objects goes to the highest criterion (ties: lowest object index).
Criteria are computed in float64 and compared as float32.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from musu.modeling.assigners import (
    ASSIGNER_REGISTRY,
    Anchors,
    Assignment,
    FCOSAssigner,
    check_assigner_inputs,
    matched_box_iou,
    pad_ground_truth,
)

from .assigner import amplified
from .selection import top_ranked_owners

__all__ = ["MGAnchorFreeAssigner", "build_mg_anchor_free_assigner", "centerness"]


def centerness(points: Tensor, boxes: Tensor) -> Tensor:
    """FCOS centerness sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) in float64 of matching
    rows of points (P, 2) inside boxes (P, 4) (both read as float32); 0 for points not strictly
    inside."""
    points = points.float().to(torch.float64)
    boxes = boxes.float().to(torch.float64)
    left, top = points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1]
    right, bottom = boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]
    inside = (left > 0) & (top > 0) & (right > 0) & (bottom > 0)
    ratio_x = torch.minimum(left, right) / torch.maximum(left, right).clamp(min=1e-300)
    ratio_y = torch.minimum(top, bottom) / torch.maximum(top, bottom).clamp(min=1e-300)
    return torch.where(inside, (ratio_x * ratio_y).clamp(min=0).sqrt(), 0.0)


class MGAnchorFreeAssigner:
    """Mutual Guidance on anchor points with the FCOS rule as the static reference.

    ``l2c=False, c2l=False`` is exactly the FCOS rule (both heads on its positives).
    """

    def __init__(
        self,
        l2c: bool = True,
        c2l: bool = True,
        sigma: float = 2.0,
        center_sampling_radius: float = 1.5,
    ) -> None:
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 1):
            raise ValueError(f"MGAnchorFreeAssigner: sigma must be > 1, got {sigma!r}")
        self.l2c = bool(l2c)
        self.c2l = bool(c2l)
        self.sigma = float(sigma)
        self.fcos = FCOSAssigner(center_sampling_radius=center_sampling_radius)

    def __repr__(self) -> str:
        return (
            f"MGAnchorFreeAssigner(l2c={self.l2c}, c2l={self.c2l}, sigma={self.sigma}, "
            f"center_sampling_radius={self.fcos.center_sampling_radius})"
        )

    @torch.no_grad()
    def __call__(
        self,
        grid: Anchors,
        scores: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_classes: Sequence[Tensor],
    ) -> Assignment:
        """Label the slots of a batch for both heads (musu's assigner protocol).

        Returns:
            Assignment with ``reg_gt_index``, ``ignore`` all False and ``stats``: N_p in
            ``bag_size``, ``num_ignored`` zeros, (N, M_max) long.
        """
        check_assigner_inputs(
            grid, scores, pred_boxes, gt_boxes, gt_classes, "MGAnchorFreeAssigner"
        )
        static = self.fcos(grid, scores, pred_boxes, gt_boxes, gt_classes)
        num_images, num_anchors, _ = scores.shape
        device = scores.device
        num_pos = static.stats["bag_size"]  # (N, M_max)
        cls_owner = reg_owner = static.gt_index
        boxes, classes, _ = pad_ground_truth(gt_boxes, gt_classes, torch.float32, device)
        max_objects = boxes.shape[1]
        shape = (num_images, max_objects, num_anchors)
        if self.l2c or self.c2l:
            image, obj, anchor = grid.inside_pairs(boxes)  # (P,) candidates
            if self.l2c:
                iou = matched_box_iou(
                    pred_boxes[image, anchor].to(torch.float64), boxes[image, obj].to(torch.float64)
                ).float()
                cls_owner = top_ranked_owners(image, obj, anchor, iou, num_pos, shape)
            if self.c2l:
                ctr = centerness(grid.points(device)[anchor], boxes[image, obj])  # (P,) float64
                amp = amplified(ctr, scores[image, anchor, classes[image, obj]], self.sigma)
                reg_owner = top_ranked_owners(image, obj, anchor, amp, num_pos, shape)
        return Assignment(
            gt_index=cls_owner,
            cls_weight=(cls_owner >= 0).float(),
            reg_weight=(reg_owner >= 0).float(),
            ignore=torch.zeros(num_images, num_anchors, dtype=torch.bool, device=device),
            reg_gt_index=reg_owner,
            stats={"bag_size": num_pos, "num_ignored": torch.zeros_like(num_pos)},
        )


@ASSIGNER_REGISTRY.register()
def build_mg_anchor_free_assigner(cfg) -> MGAnchorFreeAssigner:
    """Mutual Guidance on MuSu's anchor points from ``MODEL.MG`` (L2C, C2L, SIGMA) and
    ``MODEL.MUSU.FCOS_CENTER_SAMPLING_RADIUS`` (the FCOS rule that gives N_p)."""
    return MGAnchorFreeAssigner(
        l2c=cfg.MODEL.MG.L2C,
        c2l=cfg.MODEL.MG.C2L,
        sigma=cfg.MODEL.MG.SIGMA,
        center_sampling_radius=cfg.MODEL.MUSU.FCOS_CENTER_SAMPLING_RADIUS,
    )
