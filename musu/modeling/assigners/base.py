"""The assigner protocol, its result type and the input checks every assigner shares.

An assigner decides who supervises which anchor. It is a callable

    assigner(grid, scores, pred_boxes, gt_boxes, gt_classes) -> Assignment

(:class:`Assigner`) that runs under ``torch.no_grad`` on detached tensors and never sees a
config:

- ``grid`` (:class:`Anchors`): the R anchors of the batch: their points (R, 2), their strides
  (R,), boxes (R, 4) for anchor-box detectors, and the listing of the (image, object, anchor)
  triples whose point lies inside a box. :class:`~musu.modeling.assigners.AnchorGrid` describes
  FPN grids (the MuSu detector), :class:`~musu.modeling.assigners.AnchorList` explicit anchors.
- ``scores``: (N, R, C) class probabilities; ``pred_boxes``: (N, R, 4) predicted XYXY boxes.
- ``gt_boxes``: N tensors (M_n, 4) XYXY; ``gt_classes``: N long tensors (M_n,) in [0, C).

It returns one :class:`Assignment`: per anchor the object it is assigned to (or -1) and separate
weights for the classification and the regression head, plus optional per-object statistics for
logging. Wrappers (``wrappers.py``) are assigners around assigners; builders registered in
``ASSIGNER_REGISTRY`` (``build.py``) turn a config into one.

Shapes: N images, M objects (padded to M_max per batch), R anchors, C classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "Anchors",
    "Assigner",
    "Assignment",
    "check_assigner_inputs",
    "pad_ground_truth",
]


@runtime_checkable
class Anchors(Protocol):
    """The anchors an assigner is called with (the ``grid`` argument)."""

    @property
    def num_slots(self) -> int:
        """R, the number of anchors."""
        ...

    def points(self, device: torch.device | str = "cpu") -> Tensor:
        """(R, 2) float32 anchor points (x, y)."""
        ...

    def point_strides(self, device: torch.device | str = "cpu") -> Tensor:
        """(R,) float32 stride of every anchor."""
        ...

    def boxes(self, device: torch.device | str = "cpu") -> Tensor:
        """(R, 4) float32 anchor boxes, XYXY (anchor-box detectors)."""
        ...

    def inside_pairs(self, boxes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(image, object, anchor) long triples, each (P,), of anchor points strictly inside
        ``boxes`` (N, M_max, 4) float32, in ascending (image, object, anchor) order."""
        ...


@dataclass
class Assignment:
    """Per-anchor supervision decided by an assigner, separately for the two heads.

    Attributes:
        gt_index: (N, R) long, the object (index into that image's ground truth) the anchor's
            classification target comes from, else -1.
        cls_weight: (N, R) float in [0, 1], classification weight; 0 where gt_index == -1.
        reg_weight: (N, R) float in [0, 1], regression weight; 0 where the regression target
            (``reg_gt_index``, else ``gt_index``) is -1.
        ignore: optional (N, R) bool, anchors that get no classification loss at all (e.g. the
            IoU band between negative and positive thresholds of static assigners); None: none.
        reg_gt_index: optional (N, R) long, the regression target object when it differs from
            gt_index (assigners that pick the two heads' samples separately); None: gt_index.
        stats: per-object statistics, each (N, M_max), for logging and normalizers, e.g.
            ``bag_size`` (long, number of anchors that supervise the object; MuSu's |C_j|, the
            static positives N_p of Mutual Guidance) or ``tau_cls`` (MuSu's temperature).
    """

    gt_index: Tensor
    cls_weight: Tensor
    reg_weight: Tensor
    ignore: Optional[Tensor] = None
    reg_gt_index: Optional[Tensor] = None
    stats: Dict[str, Tensor] = field(default_factory=dict)

    @property
    def reg_target_index(self) -> Tensor:
        """(N, R) long, the object each anchor regresses to (-1: none): ``reg_gt_index`` where
        the assigner set it, else ``gt_index``."""
        return self.gt_index if self.reg_gt_index is None else self.reg_gt_index


class Assigner(Protocol):
    """``(grid, scores, pred_boxes, gt_boxes, gt_classes) -> Assignment`` (module docstring)."""

    def __call__(
        self,
        grid: Anchors,
        scores: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_classes: Sequence[Tensor],
    ) -> Assignment: ...


def pad_ground_truth(
    gt_boxes: Sequence[Tensor],
    gt_classes: Sequence[Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """Zero-padded (N, M_max, 4) boxes, (N, M_max) classes and (N, M_max) validity mask."""
    num_images = len(gt_boxes)
    counts = [len(b) for b in gt_boxes]
    max_objects = max(counts, default=0)
    boxes = torch.zeros(num_images, max_objects, 4, dtype=dtype, device=device)
    classes = torch.zeros(num_images, max_objects, dtype=torch.long, device=device)
    valid = torch.zeros(num_images, max_objects, dtype=torch.bool, device=device)
    for n, (b, c) in enumerate(zip(gt_boxes, gt_classes)):  # padding only: O(N) copies
        boxes[n, : len(b)] = b.to(device=device, dtype=dtype)
        classes[n, : len(c)] = c.to(device=device, dtype=torch.long)
        valid[n, : len(b)] = True
    return boxes, classes, valid


def check_assigner_inputs(
    grid: Anchors,
    scores: Tensor,
    pred_boxes: Tensor,
    gt_boxes: Sequence[Tensor],
    gt_classes: Sequence[Tensor],
    name: str,
) -> None:
    """ValueError, prefixed by ``name``, for inputs of an assigner call that do not fit together:
    scores (N, R, C) with R = ``grid.num_slots``, pred_boxes (N, R, 4), one (M_n, 4) box and
    (M_n,) class tensor per image, classes in [0, C)."""
    num_anchors = grid.num_slots
    if scores.dim() != 3 or scores.shape[1] != num_anchors:
        raise ValueError(
            f"{name}: scores must have shape (N, R={num_anchors}, C), got {tuple(scores.shape)}"
        )
    num_images, _, num_classes = scores.shape
    if pred_boxes.shape != (num_images, num_anchors, 4):
        raise ValueError(
            f"{name}: pred_boxes must have shape (N={num_images}, R={num_anchors}, 4), "
            f"got {tuple(pred_boxes.shape)}"
        )
    if len(gt_boxes) != num_images or len(gt_classes) != num_images:
        raise ValueError(
            f"{name}: gt_boxes and gt_classes must hold one tensor per image ({num_images}), "
            f"got {len(gt_boxes)} and {len(gt_classes)}"
        )
    for n, (boxes, classes) in enumerate(zip(gt_boxes, gt_classes)):
        if boxes.dim() != 2 or boxes.shape[1] != 4 or classes.shape != (boxes.shape[0],):
            raise ValueError(
                f"{name}: image {n}: gt_boxes must be (M, 4) and gt_classes (M,), "
                f"got {tuple(boxes.shape)} and {tuple(classes.shape)}"
            )
    _check_class_range(gt_classes, num_classes, name)


def _check_class_range(gt_classes: Sequence[Tensor], num_classes: int, name: str) -> None:
    """ValueError naming the first image with a class outside [0, num_classes)."""
    all_classes = torch.cat([c.reshape(-1) for c in gt_classes]) if gt_classes else None
    if all_classes is None or not len(all_classes):
        return
    low, high = (int(v) for v in torch.aminmax(all_classes))
    if 0 <= low and high < num_classes:
        return
    image = next(
        n
        for n, c in enumerate(gt_classes)
        if len(c) and (int(c.min()) < 0 or int(c.max()) >= num_classes)
    )
    classes = gt_classes[image]
    raise ValueError(
        f"{name}: image {image}: gt_classes must lie in [0, {num_classes}), "
        f"got values in [{int(classes.min())}, {int(classes.max())}]"
    )
