"""The MuSu candidate-bag / ranking assigner (paper Procedure 1, Eqs. 1-6), vectorized.

Naming convention for shapes: N images, M objects (padded to M_max per batch), R anchor slots
(all levels, A slots per location), C classes, P (image, object, anchor) pairs whose anchor point
lies inside the object's box.

Everything here is computed under ``torch.no_grad`` from detached inputs, batched over images,
with no Python loop over images, objects, anchors or candidate bags. The inside pairs are found
either by listing each box's grid points (given an :class:`AnchorGrid`; memory O(P)) or by one
boolean (N, M_max, R) test; all later work is done on the P inside pairs only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "AnchorGrid",
    "Assignment",
    "MuSuAssigner",
    "CRITERIA",
    "assignment_stats",
    "check_assigner_inputs",
    "dense_inside_pairs",
    "pad_ground_truth",
    "rank_within_groups",
]

CRITERIA = ("mutual", "cls", "iou")


@dataclass
class Assignment:
    """Per-anchor supervision decided by an assigner, separately for the two heads.

    Attributes:
        gt_index: (N, R) long, the object (index into that image's ground truth) whose candidate
            bag the anchor is in, else -1.
        cls_weight: (N, R) float in [0, 1], classification weight; 0 where gt_index == -1.
        reg_weight: (N, R) float in [0, 1], regression weight; 0 where the regression target
            (``reg_gt_index``, else ``gt_index``) is -1.
        bag_size: (N, M_max) long, |C_j| per object (0 for padding and objects with empty bags).
        tau_cls: (N, M_max) float, classification temperature per object (0 where bag_size == 0).
        ignore: optional (N, R) bool, anchors that get no classification loss at all (e.g. the
            IoU band between negative and positive thresholds of static assigners); None: none.
        reg_gt_index: optional (N, R) long, the regression target object when it differs from
            gt_index (assigners that pick the two heads' samples separately); None: gt_index.
    """

    gt_index: Tensor
    cls_weight: Tensor
    reg_weight: Tensor
    bag_size: Tensor
    tau_cls: Tensor
    ignore: Optional[Tensor] = None
    reg_gt_index: Optional[Tensor] = None


def _check_range(name: str, value: float, low: float, high: float, closed: bool) -> None:
    ok = low <= value <= high if closed else low < value < high
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        interval = f"[{low}, {high}]" if closed else f"({low}, {high})"
        raise ValueError(f"MuSuAssigner: {name} must lie in {interval}, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"MuSuAssigner: {name} must be a finite number > 0, got {value!r}")


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


def _pair_iou(pred: Tensor, gt: Tensor) -> Tensor:
    """IoU of matching rows of two (P, 4) XYXY float64 tensors: inter / union."""
    inter_w = (torch.minimum(pred[:, 2], gt[:, 2]) - torch.maximum(pred[:, 0], gt[:, 0])).clamp(0)
    inter_h = (torch.minimum(pred[:, 3], gt[:, 3]) - torch.maximum(pred[:, 1], gt[:, 1])).clamp(0)
    inter = inter_w * inter_h
    area_pred = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_gt = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    union = area_pred + area_gt - inter
    return inter / union.clamp(min=torch.finfo(torch.float64).tiny)


@dataclass(frozen=True)
class AnchorGrid:
    """Layout of anchor points on FPN grids: level l has an H_l x W_l grid of stride s_l, point
    (j, i) at ((j + 0.5) * s_l, (i + 0.5) * s_l), repeated for A slots; flattened in
    (level, H, W, A) order, as the head outputs are. Lets the assigner list the points inside
    each box directly instead of testing every (object, point) pair.
    """

    feature_sizes: Tuple[Tuple[int, int], ...]
    strides: Tuple[float, ...]
    num_anchors: int

    def points(self, device: torch.device | str = "cpu") -> Tensor:
        """(R, 2) float32 points (x, y) in (level, H, W, A) order.

        Cached per (grid, device): repeated calls return the same tensor, so treat it as
        read-only (clone before modifying it in place).
        """
        return _grid_tensors(self, torch.device(device))[0]

    def point_strides(self, device: torch.device | str = "cpu") -> Tensor:
        """(R,) float32 stride of every point, same order and caching as :meth:`points`."""
        return _grid_tensors(self, torch.device(device))[1]

    @staticmethod
    def _coordinates(index: Tensor, stride: float) -> Tensor:
        """Float32 coordinate (index + 0.5) * stride, computed exactly as in points()."""
        return (index.to(torch.float32) + 0.5) * float(stride)


@functools.lru_cache(maxsize=64)
def _grid_tensors(grid: AnchorGrid, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Points (R, 2) and strides (R,) of a grid, built once per (grid, device).

    Built as normal tensors even under ``torch.inference_mode`` so that a grid first seen during
    evaluation can still serve training.
    """
    with torch.inference_mode(False):
        return _build_grid_tensors(grid, device)


def _build_grid_tensors(grid: AnchorGrid, device: torch.device) -> Tuple[Tensor, Tensor]:
    points, strides = [], []
    for (height, width), stride in zip(grid.feature_sizes, grid.strides):
        xs = AnchorGrid._coordinates(torch.arange(width, device=device), stride)  # (W,)
        ys = AnchorGrid._coordinates(torch.arange(height, device=device), stride)  # (H,)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
        level = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)  # (H*W, 2)
        points.append(level.repeat_interleave(grid.num_anchors, dim=0))
        count = height * width * grid.num_anchors
        strides.append(torch.full((count,), float(stride), device=device))
    if not points:
        return torch.zeros(0, 2, device=device), torch.zeros(0, device=device)
    return torch.cat(points), torch.cat(strides)


@functools.lru_cache(maxsize=64)
def _grid_levels(grid: AnchorGrid, device: torch.device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per level (L,): heights, widths (long), strides (float32), offset of its first slot."""
    with torch.inference_mode(False):
        heights = torch.tensor([h for h, _ in grid.feature_sizes], device=device)
        widths = torch.tensor([w for _, w in grid.feature_sizes], device=device)
        strides = torch.tensor(grid.strides, dtype=torch.float32, device=device)
        slots_per_level = heights * widths * grid.num_anchors
        level_offset = torch.cumsum(slots_per_level, 0) - slots_per_level
    return heights, widths, strides, level_offset


def _grid_index_range(
    low: Tensor, high: Tensor, stride: Tensor, size: Tensor
) -> Tuple[Tensor, Tensor]:
    """Smallest and largest grid index whose coordinate lies strictly inside (low, high).

    low, high: (N, M, 1) float32; stride, size: (L,). Returns (N, M, L) long, first > last when
    empty. The float64 estimate is corrected by one step each way against the float32 coordinates
    of AnchorGrid.points, so the result equals a direct comparison with those points.
    """
    stride64 = stride.to(torch.float64)
    first = torch.floor(low.double() / stride64 - 0.5).long() + 1  # (N, M, L)
    last = torch.ceil(high.double() / stride64 - 0.5).long() - 1
    coordinate = lambda index: (index.to(torch.float32) + 0.5) * stride  # noqa: E731
    first = first - (coordinate(first - 1) > low).long()
    first = first + (coordinate(first) <= low).long()
    last = last + (coordinate(last + 1) < high).long()
    last = last - (coordinate(last) >= high).long()
    return first.clamp(min=0), torch.minimum(last, size - 1)


def _grid_inside_pairs(grid: AnchorGrid, boxes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(image, object, anchor) index triples of points strictly inside boxes, listed per box.

    boxes: (N, M_max, 4) float32 (padding boxes of zeros contain no point). Memory and time grow
    with the number of pairs P, not with M x R. Order: (image, object, anchor) ascending, the
    same as ``inside.nonzero()`` over a dense (N, M_max, R) mask.
    """
    device = boxes.device
    num_images, max_objects = boxes.shape[:2]
    slots = grid.num_anchors
    heights, widths, strides, level_offset = _grid_levels(grid, device)  # (L,) each
    x_first, x_last = _grid_index_range(boxes[..., 0:1], boxes[..., 2:3], strides, widths)
    y_first, y_last = _grid_index_range(boxes[..., 1:2], boxes[..., 3:4], strides, heights)
    num_x = (x_last - x_first + 1).clamp(min=0)  # (N, M, L)
    num_y = (y_last - y_first + 1).clamp(min=0)
    counts = (num_x * num_y * slots).reshape(-1)  # (G,) one group per (image, object, level)
    group = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)  # (P,)
    start = torch.cumsum(counts, 0) - counts
    local = torch.arange(len(group), device=device) - start[group]  # (P,) index inside group
    slot, cell = local % slots, local // slots
    row_length = num_x.reshape(-1)[group]
    row = y_first.reshape(-1)[group] + cell // row_length
    column = x_first.reshape(-1)[group] + cell % row_length
    num_levels = len(grid.feature_sizes)
    level = group % num_levels
    anchor = level_offset[level] + (row * widths[level] + column) * slots + slot
    return group // (num_levels * max_objects), (group // num_levels) % max_objects, anchor


def rank_within_groups(group: Tensor, value: Tensor) -> Tensor:
    """Rank (0-based) of each element inside its group, by descending value.

    Ties keep the input order: callers pass elements sorted by anchor index within a group (or
    a value that is unique inside a group).
    Args:
        group: (K,) long group id per element.
        value: (K,) value per element (any dtype ``torch.sort`` orders).
    Returns:
        (K,) long rank.
    """
    order = torch.sort(value, descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]  # by group, then value desc
    sorted_group = group[order]
    position = torch.arange(len(order), device=group.device)
    is_start = torch.ones_like(sorted_group, dtype=torch.bool)
    is_start[1:] = sorted_group[1:] != sorted_group[:-1]
    group_start = torch.cummax(torch.where(is_start, position, 0), dim=0).values
    rank = torch.empty_like(position)
    rank[order] = position - group_start
    return rank


def check_assigner_inputs(
    anchors: Tensor,
    scores: Tensor,
    pred_boxes: Tensor,
    gt_boxes: Sequence[Tensor],
    gt_classes: Sequence[Tensor],
    name: str = "MuSuAssigner",
    anchor_width: int = 2,
) -> None:
    """ValueError, prefixed by ``name``, for inputs of an assigner call that do not fit together:
    anchors (R, anchor_width) (points: 2, boxes: 4), scores (N, R, C), pred_boxes (N, R, 4), one
    (M_n, 4) box and (M_n,) class tensor per image, classes in [0, C)."""
    if anchors.dim() != 2 or anchors.shape[1] != anchor_width:
        raise ValueError(
            f"{name}: anchors must have shape (R, {anchor_width}), got {tuple(anchors.shape)}"
        )
    num_anchors = anchors.shape[0]
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
    all_classes = torch.cat([c.reshape(-1) for c in gt_classes]) if gt_classes else None
    if all_classes is not None and len(all_classes):
        low, high = (int(v) for v in torch.aminmax(all_classes))
        if low < 0 or high >= num_classes:
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


def dense_inside_pairs(points: Tensor, boxes32: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(image, object, anchor) triples with the point strictly inside the box, from one
    (N, M_max, R) boolean test, in that order. points (R, 2); boxes32 (N, M_max, 4) float32
    (zero-padded boxes contain no point)."""
    px, py = points[:, 0].float(), points[:, 1].float()  # (R,)
    inside = px > boxes32[..., 0, None]  # (N, M_max, R)
    inside &= py > boxes32[..., 1, None]
    inside &= px < boxes32[..., 2, None]
    inside &= py < boxes32[..., 3, None]
    return inside.nonzero(as_tuple=True)


class MuSuAssigner:
    """Mutual Supervision assignment: cls samples ranked by IoU, reg samples by score.

    Guarantees (paper Procedure 1): each anchor belongs to at most one candidate bag; every
    non-empty bag has one member of rank 0 (weight 1 in soft mode); anchors outside every bag get
    gt_index -1 and zero weights. IoU, q, P and v are computed in float64 and rounded to float32;
    all comparisons act on the float32 values and ties go to the lower object / anchor index.
    """

    def __init__(
        self,
        theta: float = 4.0,
        bag_threshold: float = 0.1,
        alpha: float = 1 / 3,
        tau_ratio: float = 2.0,
        temperature: Optional[float] = None,
        soft: bool = True,
        criterion: str = "mutual",
    ) -> None:
        _check_positive("theta", theta)
        _check_range("bag_threshold", bag_threshold, 0.0, 1.0, closed=False)
        _check_range("alpha", alpha, 0.0, 1.0, closed=True)
        _check_positive("tau_ratio", tau_ratio)
        if temperature is not None:
            _check_positive("temperature", temperature)
        if criterion not in CRITERIA:
            raise ValueError(
                f"MuSuAssigner: criterion must be one of {CRITERIA}, got {criterion!r}"
            )
        self.theta = float(theta)
        self.bag_threshold = float(bag_threshold)
        self.alpha = float(alpha)
        self.tau_ratio = float(tau_ratio)
        self.temperature = None if temperature is None else float(temperature)
        self.soft = bool(soft)
        self.criterion = criterion

    def __repr__(self) -> str:
        return (
            f"MuSuAssigner(theta={self.theta}, bag_threshold={self.bag_threshold}, "
            f"alpha={self.alpha}, tau_ratio={self.tau_ratio}, temperature={self.temperature}, "
            f"soft={self.soft}, criterion={self.criterion!r})"
        )

    @torch.no_grad()
    def __call__(
        self,
        points: Tensor,
        scores: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_classes: Sequence[Tensor],
        grid: Optional[AnchorGrid] = None,
    ) -> Assignment:
        """Assign anchors to objects and weight them for each head.

        Args:
            points: (R, 2) anchor point (x, y) of every anchor slot.
            scores: (N, R, C) class probabilities in [0, 1].
            pred_boxes: (N, R, 4) predicted boxes, XYXY, image pixels.
            gt_boxes: N tensors (M_n, 4), XYXY.
            gt_classes: N long tensors (M_n,).
            grid: optional layout that generated ``points`` (checked); with it the inside pairs
                are listed per box (memory O(pairs)) instead of by a dense (N, M, R) test.
        Returns:
            The :class:`Assignment` of the batch.
        """
        check_assigner_inputs(points, scores, pred_boxes, gt_boxes, gt_classes)
        device = scores.device
        num_images, num_anchors, _ = scores.shape
        boxes, classes, _ = pad_ground_truth(gt_boxes, gt_classes, torch.float64, device)
        max_objects = boxes.shape[1]

        gt_index = torch.full((num_images, num_anchors), -1, dtype=torch.long, device=device)
        cls_weight = torch.zeros(num_images, num_anchors, dtype=torch.float32, device=device)
        reg_weight = torch.zeros_like(cls_weight)
        bag_size = torch.zeros(num_images, max_objects, dtype=torch.long, device=device)
        tau_cls = torch.zeros(num_images, max_objects, dtype=torch.float32, device=device)
        result = Assignment(gt_index, cls_weight, reg_weight, bag_size, tau_cls)
        if max_objects == 0 or num_anchors == 0:
            return result

        # 1. Inside pairs: (image, object, anchor) with the point strictly inside the box. Boxes
        # are compared in float32, like the points; padded all-zero boxes contain no point.
        boxes32 = boxes.float()
        if grid is not None:
            if not torch.equal(grid.points(device), points.float()):
                raise ValueError("grid does not describe points (see AnchorGrid.points)")
            pair_img, pair_obj, pair_anchor = _grid_inside_pairs(grid, boxes32)  # (P,) each
        else:
            pair_img, pair_obj, pair_anchor = dense_inside_pairs(points, boxes32)
        if len(pair_img) == 0:
            return result

        # 2. A_j: each anchor keeps the containing object of highest IoU (ties: lowest index).
        anchor_key = pair_img * num_anchors + pair_anchor  # (P,) one id per (image, anchor)
        object_key = pair_img * max_objects + pair_obj  # (P,) one id per (image, object)
        pair_pred = pred_boxes.reshape(-1, 4).index_select(0, anchor_key).to(torch.float64)
        pair_gt = boxes.reshape(-1, 4).index_select(0, object_key)
        iou64 = _pair_iou(pair_pred, pair_gt)  # (P,) float64, feeds q
        iou = iou64.to(torch.float32)  # (P,) rounded, compared across objects
        del pair_pred, pair_gt
        flat_size = num_images * num_anchors
        best_iou = torch.full((flat_size,), -1.0, device=device)
        best_iou.scatter_reduce_(0, anchor_key, iou, reduce="amax")
        is_best = iou == best_iou[anchor_key]
        first_obj = torch.full((flat_size,), max_objects, dtype=torch.long, device=device)
        first_obj.scatter_reduce_(0, anchor_key[is_best], pair_obj[is_best], reduce="amin")
        keep = (is_best & (pair_obj == first_obj[anchor_key])).nonzero().squeeze(1)
        img, obj, anchor, object_key, iou64 = (
            t.index_select(0, keep) for t in (pair_img, pair_obj, pair_anchor, object_key, iou64)
        )
        # (K,) members of all A_j, in (image, object, anchor) order as produced by nonzero().

        # 3. Joint likelihood P = p * IoU**theta (Eq. 1) and the candidate bag C_j (Eq. 2).
        p64 = scores[img, anchor, classes[img, obj]].to(torch.float64)  # (K,)
        q64 = iou64.pow(self.theta)
        joint = (p64 * q64).to(torch.float32)
        max_joint = torch.zeros(num_images * max_objects, device=device)
        max_joint.scatter_reduce_(0, object_key, joint, reduce="amax")
        bag_max = max_joint[object_key].to(torch.float64)
        in_bag = (joint.to(torch.float64) > self.bag_threshold * bag_max) | (bag_max == 0)
        members = in_bag.nonzero().squeeze(1)
        img, obj, anchor, object_key, p64, q64 = (
            t.index_select(0, members) for t in (img, obj, anchor, object_key, p64, q64)
        )

        # 4. Criteria (Eq. 3) and ranks inside each bag (descending, ties: lower anchor index).
        if self.criterion == "mutual":
            v_cls = (q64 * p64.pow(self.alpha)).to(torch.float32)
            v_reg = (p64 * q64.pow(self.alpha)).to(torch.float32)
        else:
            v_cls = v_reg = (p64 if self.criterion == "cls" else q64).to(torch.float32)
        rank_cls = rank_within_groups(object_key, v_cls).to(torch.float32)
        rank_reg = rank_cls if v_reg is v_cls else rank_within_groups(object_key, v_reg)
        rank_reg = rank_reg.to(torch.float32)

        # 5. Temperatures (Eq. 6) and rank-to-weight (Eq. 4).
        counts = torch.bincount(object_key, minlength=num_images * max_objects)  # (N * M_max,)
        if self.temperature is None:
            tau_per_object = counts.to(torch.float32).sqrt()
        else:
            tau_per_object = torch.where(counts > 0, self.temperature, 0.0).to(torch.float32)
        tau_c = tau_per_object[object_key]  # (K,)
        tau_r = tau_c / self.tau_ratio
        if self.soft:
            w_cls, w_reg = torch.exp(-rank_cls / tau_c), torch.exp(-rank_reg / tau_r)
        else:
            w_cls, w_reg = (rank_cls < tau_c).float(), (rank_reg < tau_r).float()

        gt_index[img, anchor] = obj
        cls_weight[img, anchor] = w_cls
        reg_weight[img, anchor] = w_reg
        bag_size.view(-1).copy_(counts)
        tau_cls.view(-1).copy_(tau_per_object)
        return result


def assignment_stats(assignment: Assignment) -> dict[str, float]:
    """Summary scalars for logging: mean bag size, mean tau_cls, mean cls/reg weight per object.

    Objects with an empty bag are excluded; all values are 0 when no object has a bag.
    """
    has_bag = assignment.bag_size > 0  # (N, M_max)
    num_objects = int(has_bag.sum())
    if num_objects == 0:
        return {
            "bag_size": 0.0,
            "tau_cls": 0.0,
            "cls_weight_per_object": 0.0,
            "reg_weight_per_object": 0.0,
            "objects_with_bag": 0.0,
        }
    return {
        "bag_size": float(assignment.bag_size[has_bag].float().mean()),
        "tau_cls": float(assignment.tau_cls[has_bag].mean()),
        "cls_weight_per_object": float(assignment.cls_weight.sum()) / num_objects,
        "reg_weight_per_object": float(assignment.reg_weight.sum()) / num_objects,
        "objects_with_bag": float(num_objects),
    }
