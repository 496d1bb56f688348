"""Assigners around assigners: crowd-region ignoring and warm-up switching.

Both follow the assigner protocol of ``base.py`` and leave the inner assigner's decisions
untouched apart from what their docstrings name.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from detectron2.utils.events import get_event_storage
from torch import Tensor

from .base import Anchors, Assigner, Assignment
from .geometry import points_in_boxes

__all__ = ["IgnoreCrowdRegions", "WarmupSwitch"]


class IgnoreCrowdRegions:
    """``assigner``'s assignment, with the unassigned anchors whose point lies inside a crowd
    box of their image marked ``ignore`` (no classification loss). Built per batch: it holds
    that batch's crowd boxes, one (K_n, 4) XYXY tensor per image."""

    def __init__(self, assigner: Assigner, crowd_boxes: Sequence[Tensor]) -> None:
        self.assigner = assigner
        self.crowd_boxes = list(crowd_boxes)

    def __repr__(self) -> str:
        return f"IgnoreCrowdRegions({self.assigner!r})"

    @torch.no_grad()
    def __call__(
        self,
        grid: Anchors,
        scores: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_classes: Sequence[Tensor],
    ) -> Assignment:
        assignment = self.assigner(grid, scores, pred_boxes, gt_boxes, gt_classes)
        if len(self.crowd_boxes) != len(gt_boxes):
            raise ValueError(
                f"IgnoreCrowdRegions: {len(self.crowd_boxes)} crowd box tensors for "
                f"{len(gt_boxes)} images"
            )
        points = grid.points(scores.device)  # (R, 2)
        inside = torch.zeros_like(assignment.gt_index, dtype=torch.bool)  # (N, R)
        for n, boxes in enumerate(self.crowd_boxes):  # crowd boxes are few: (K, R) per image
            if len(boxes):
                inside[n] = points_in_boxes(points, boxes.to(points.device)).any(dim=0)
        ignore = inside & (assignment.gt_index < 0)
        if assignment.ignore is not None:
            ignore |= assignment.ignore
        return dataclasses.replace(assignment, ignore=ignore)


class WarmupSwitch:
    """``warmup`` during the first ``iters`` iterations of the trainer's EventStorage, ``main``
    after them and outside a trainer (no EventStorage)."""

    def __init__(self, warmup: Assigner, main: Assigner, iters: int) -> None:
        if not (isinstance(iters, int) and iters >= 0):
            raise ValueError(f"WarmupSwitch: iters must be an integer >= 0, got {iters!r}")
        self.warmup = warmup
        self.main = main
        self.iters = iters

    def __repr__(self) -> str:
        return f"WarmupSwitch(warmup={self.warmup!r}, main={self.main!r}, iters={self.iters})"

    def current(self) -> Assigner:
        """The assigner that decides at the storage's current iteration."""
        try:
            iteration = get_event_storage().iter
        except AssertionError:  # no EventStorage: not inside a trainer
            return self.main
        return self.warmup if iteration < self.iters else self.main

    def __call__(
        self,
        grid: Anchors,
        scores: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_classes: Sequence[Tensor],
    ) -> Assignment:
        return self.current()(grid, scores, pred_boxes, gt_boxes, gt_classes)
