"""The FCOS assignment rule (Tian et al., ICCV 2019) as Detectron2's ``FCOS`` implements it.

A point p of stride s is a positive of object g when
  1. p lies strictly inside g;
  2. (center sampling, radius r > 0) max(|p_x - c_x|, |p_y - c_y|) < r * s for g's centre c;
  3. the largest of p's distances (l, t, r, b) to g's sides lies in (4 s, 8 s), the lower
     bound being 0 on the finest level and the upper bound infinite on the coarsest, i.e.
     [0, 64], [64, 128], ..., [512, inf) for strides 8..128;
and among several such objects it takes the one of smallest area (ties: the lowest index).
Shapes: N images, R points, M_max objects per image after padding.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .assigner import Assignment, pad_ground_truth
from .build import ASSIGNER_REGISTRY

__all__ = ["FCOSAssigner", "build_fcos_assigner", "strides_from_points"]


def strides_from_points(points: Tensor) -> Tensor:
    """Strides (R,) of points placed at ((j + 0.5) s, (i + 0.5) s) with power-of-two strides s.

    Such a coordinate times 2 is (2j + 1) s, so s is the largest power of two dividing 2x (and
    2y). Raises ValueError for points that do not follow this layout.
    """
    doubled = points.detach() * 2  # (R, 2)
    as_int = doubled.round().to(torch.int64)
    if not bool((as_int == doubled).all()) or bool((as_int <= 0).any()):
        raise ValueError(
            "FCOSAssigner: cannot infer strides: points must lie at ((j + 0.5) s, (i + 0.5) s) "
            "with power-of-two strides s (MuSu's anchor_points); pass point_strides instead"
        )
    lowest_bit = as_int & -as_int  # (R, 2) largest power of two dividing 2x, 2y
    if not bool((lowest_bit[:, 0] == lowest_bit[:, 1]).all()):
        raise ValueError("FCOSAssigner: x and y of a point imply different strides")
    return lowest_bit[:, 0].to(points.dtype)


class FCOSAssigner:
    """Static FCOS assignment: cls_weight = reg_weight = 1 on positives, 0 elsewhere.

    ``bag_size`` counts each object's positives; ``tau_cls`` is 0 (no temperature).
    """

    def __init__(self, center_sampling_radius: float = 1.5, size_factors=(4.0, 8.0)) -> None:
        radius = center_sampling_radius
        if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius >= 0):
            raise ValueError(
                f"FCOSAssigner: center_sampling_radius must be >= 0 (0: off), got {radius!r}"
            )
        low, high = size_factors
        if not (0 < low < high):
            raise ValueError(
                f"FCOSAssigner: size_factors must be 0 < low < high, got {size_factors}"
            )
        self.center_sampling_radius = float(radius)
        self.size_factors = (float(low), float(high))

    def __repr__(self) -> str:
        return (
            f"FCOSAssigner(center_sampling_radius={self.center_sampling_radius}, "
            f"size_factors={self.size_factors})"
        )

    @torch.no_grad()
    def __call__(
        self,
        points: Tensor,
        scores: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_classes: Sequence[Tensor],
        point_strides: Optional[Tensor] = None,
    ) -> Assignment:
        """Assign each point to at most one object by the FCOS rule.

        Args:
            points: (R, 2) anchor points (x, y), levels in increasing stride order.
            scores: (N, R, C) and pred_boxes: (N, R, 4): read for their shapes only.
            gt_boxes: N tensors (M_n, 4), XYXY; gt_classes: N long tensors (M_n,).
            point_strides: (R,) stride of each point; default: inferred from ``points``
                (:func:`strides_from_points`).
        Returns:
            The :class:`Assignment` of the batch.
        """
        num_images, num_points = scores.shape[0], points.shape[0]
        if pred_boxes.shape[:2] != (num_images, num_points) or len(gt_boxes) != num_images:
            raise ValueError(
                f"FCOSAssigner: inconsistent inputs: points {tuple(points.shape)}, scores "
                f"{tuple(scores.shape)}, pred_boxes {tuple(pred_boxes.shape)}, "
                f"{len(gt_boxes)} gt_boxes"
            )
        device = scores.device
        boxes, _, valid = pad_ground_truth(gt_boxes, gt_classes, torch.float32, device)
        max_objects = boxes.shape[1]
        gt_index = torch.full((num_images, num_points), -1, dtype=torch.long, device=device)
        ones = torch.zeros(num_images, num_points, dtype=torch.float32, device=device)
        bag_size = torch.zeros(num_images, max_objects, dtype=torch.long, device=device)
        tau_cls = torch.zeros(num_images, max_objects, dtype=torch.float32, device=device)
        if max_objects == 0 or num_points == 0:
            return Assignment(gt_index, ones, ones.clone(), bag_size, tau_cls)

        points = points.to(device=device, dtype=torch.float32)
        if point_strides is None:
            point_strides = strides_from_points(points)
        point_strides = point_strides.to(device=device, dtype=torch.float32)  # (R,)
        px, py = points[:, 0], points[:, 1]  # (R,)
        x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))  # (N, M_max, 1) each
        distances = torch.stack([px - x0, py - y0, x1 - px, y1 - py], dim=-1)  # (N, M_max, R, 4)
        match = distances.min(dim=-1).values > 0  # (N, M_max, R) inside
        largest = distances.max(dim=-1).values  # (N, M_max, R)
        del distances
        low_factor, high_factor = self.size_factors
        lower = point_strides * low_factor  # (R,)
        upper = point_strides * high_factor
        lower = torch.where(point_strides == point_strides.min(), 0.0, lower)
        upper = torch.where(point_strides == point_strides.max(), math.inf, upper)
        match &= (largest > lower) & (largest < upper)
        if self.center_sampling_radius > 0:
            radius = self.center_sampling_radius * point_strides  # (R,)
            center_x, center_y = (x0 + x1) / 2, (y0 + y1) / 2  # (N, M_max, 1)
            center_dist = torch.maximum((px - center_x).abs(), (py - center_y).abs())
            match &= center_dist < radius
        match &= valid[..., None]

        # Smallest area among matches; argmin returns the first (lowest object index) of ties.
        areas = ((x1 - x0) * (y1 - y0)).expand_as(match)  # (N, M_max, R)
        areas = torch.where(match, areas, math.inf)
        best = areas.argmin(dim=1)  # (N, R)
        matched = match.any(dim=1)  # (N, R)
        gt_index = torch.where(matched, best, -1)
        weight = matched.float()
        bag_size.scatter_add_(1, best, matched.long())
        return Assignment(gt_index, weight, weight.clone(), bag_size, tau_cls)


@ASSIGNER_REGISTRY.register()
def build_fcos_assigner(cfg) -> FCOSAssigner:
    """FCOS rule with ``MODEL.MUSU.FCOS_CENTER_SAMPLING_RADIUS`` (default 1.5, Detectron2's FCOS
    default; 0 turns center sampling off)."""
    return FCOSAssigner(center_sampling_radius=cfg.MODEL.MUSU.FCOS_CENTER_SAMPLING_RADIUS)
