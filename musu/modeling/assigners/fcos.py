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
from typing import Sequence

import torch
from torch import Tensor

from .base import Anchors, Assignment, check_assigner_inputs, pad_ground_truth
from .geometry import points_in_boxes

__all__ = ["FCOSAssigner", "fcos_matches"]


def fcos_matches(
    points: Tensor,
    strides: Tensor,
    boxes: Tensor,
    center_sampling_radius: float,
    size_factors: tuple[float, float],
) -> Tensor:
    """(N, M_max, R) bool: rules 1-3 of the module docstring for points (R, 2) float32, strides
    (R,) float32 and boxes (N, M_max, 4) float32."""
    px, py = points[:, 0], points[:, 1]  # (R,)
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))  # (N, M_max, 1) each
    match = points_in_boxes(points, boxes)  # (N, M_max, R)
    largest = torch.stack([px - x0, py - y0, x1 - px, y1 - py], dim=-1).max(dim=-1).values
    low_factor, high_factor = size_factors
    lower = torch.where(strides == strides.min(), 0.0, strides * low_factor)  # (R,)
    upper = torch.where(strides == strides.max(), math.inf, strides * high_factor)
    match &= (largest > lower) & (largest < upper)
    if center_sampling_radius > 0:
        radius = center_sampling_radius * strides  # (R,)
        center_x, center_y = (x0 + x1) / 2, (y0 + y1) / 2  # (N, M_max, 1)
        center_dist = torch.maximum((px - center_x).abs(), (py - center_y).abs())
        match &= center_dist < radius
    return match


class FCOSAssigner:
    """Static FCOS assignment: cls_weight = reg_weight = 1 on positives, 0 elsewhere.

    Reads the points and strides of ``grid``; scores and predicted boxes only for their shapes.
    ``stats``: ``bag_size`` (N, M_max) long, each object's number of positives.
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
        grid: Anchors,
        scores: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_classes: Sequence[Tensor],
    ) -> Assignment:
        """Assign each point to at most one object by the FCOS rule (the assigner protocol of
        ``base.py``)."""
        check_assigner_inputs(grid, scores, pred_boxes, gt_boxes, gt_classes, "FCOSAssigner")
        num_images, num_points = scores.shape[:2]
        device = scores.device
        boxes, _, valid = pad_ground_truth(gt_boxes, gt_classes, torch.float32, device)
        max_objects = boxes.shape[1]
        bag_size = torch.zeros(num_images, max_objects, dtype=torch.long, device=device)
        if max_objects == 0 or num_points == 0:
            none = torch.full((num_images, num_points), -1, dtype=torch.long, device=device)
            zeros = torch.zeros(num_images, num_points, dtype=torch.float32, device=device)
            return Assignment(none, zeros, zeros.clone(), stats={"bag_size": bag_size})

        strides = grid.point_strides(device)  # (R,)
        match = fcos_matches(
            grid.points(device), strides, boxes, self.center_sampling_radius, self.size_factors
        )
        match &= valid[..., None]
        # Smallest area among matches; argmin returns the first (lowest object index) of ties.
        areas = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))[..., None]
        areas = torch.where(match, areas.expand_as(match), math.inf)  # (N, M_max, R)
        best = areas.argmin(dim=1)  # (N, R)
        matched = match.any(dim=1)  # (N, R)
        gt_index = torch.where(matched, best, -1)
        weight = matched.float()
        bag_size.scatter_add_(1, best, matched.long())
        return Assignment(gt_index, weight, weight.clone(), stats={"bag_size": bag_size})
