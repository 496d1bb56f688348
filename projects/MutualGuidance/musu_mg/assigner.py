"""Mutual Guidance for anchor boxes (Zhang et al., ACCV 2020, Sec. 3), vectorized.

Shapes: N images, M objects (padded to M_max), R anchors, C classes.

1. Static reference (Sec. 3): anchor r goes to the object j*(r) of highest IoU(anchor, object)
   (ties: lowest object index). It is positive when that IoU >= POS_IOU, ignored when it lies in
   [NEG_IOU, POS_IOU), negative otherwise. Every object also claims its best anchor (highest IoU,
   ties: lowest anchor index; only when that IoU > 0); an anchor claimed by several objects goes to
   the claim of highest IoU (ties: lowest object index), so a threshold positive always stays with
   j*(r). N_p(j) = static positives of j, N_i(j) = static ignored anchors with j*(r) = j.
2. Localize to Classify (Sec. 3.1): per object, rank the anchors with IoU(regressed box, object)
   > 0 by that IoU (descending, ties: lowest anchor index); ranks 0 .. N_p - 1 claim a
   classification positive, ranks N_p .. N_p + N_i - 1 an ignore. Positive claims on one anchor:
   highest IoU_regressed wins (ties: lowest object index); a positive claim beats any ignore claim.
   Off: the static labels.
3. Classify to Localize (Sec. 3.2): IoU_amplified = IoU_anchor ** ((sigma - p) / sigma), p the
   predicted probability of the object's class at the anchor; per object the N_p anchors of
   highest IoU_amplified (> 0) claim a regression positive, ties and conflicts as in 2.
   Off: the static positives.

Numerics: IoUs and IoU_amplified are computed in float64 and rounded to float32; every comparison
acts on the float32 values, against thresholds rounded to float32 too (an IoU of exactly 0.7
passes POS_IOU 0.7). Cost: one boolean (N, M_max, R) overlap test per criterion (Detectron2's
RetinaNet matcher builds a float (M, R) IoU matrix per image), then O(P) work on the P
overlapping (image, object, anchor) pairs only.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

from musu.modeling.assigners import (
    Anchors,
    Assignment,
    check_assigner_inputs,
    matched_box_iou,
    pad_ground_truth,
)

from .selection import (
    count_per_object,
    intersecting_pairs,
    rank_within_objects,
    resolve_claims,
    select_ranks,
    top_ranked_owners,
)

__all__ = ["MutualGuidanceAssigner", "amplified"]


def amplified(value64: Tensor, p: Tensor, sigma: float) -> Tensor:
    """Eq. 1 in float64, rounded to float32: value ** ((sigma - p) / sigma).

    Args:
        value64: (P,) float64 IoU_anchor (or centerness) in [0, 1]; p: (P,) probabilities of the
            object's class at the anchor.
    """
    p64 = p.to(torch.float64)
    return value64.clamp(min=0).pow((sigma - p64) / sigma).to(torch.float32)


def _static_labels(
    image: Tensor,
    obj: Tensor,
    anchor: Tensor,
    iou: Tensor,
    shape: Tuple[int, int, int],
    pos_iou: float,
    neg_iou: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The static IoU_anchor labels (module docstring, step 1) from the overlapping pairs.

    Args:
        image, obj, anchor: (P,) long pairs with IoU > 0; iou: (P,) float32 IoU(anchor, object);
        shape: (N, M_max, R).
    Returns:
        owner (N, R) long (positive's object, else -1), ignore (N, R) bool, N_p and N_i (N, M_max).
    """
    num_images, max_objects, num_anchors = shape
    device = iou.device
    sentinel = torch.iinfo(torch.long).max
    # Per anchor: highest IoU and its lowest-index object j*(r) (-1 without overlap).
    anchor_key = image * num_anchors + anchor
    max_iou = torch.zeros(num_images * num_anchors, device=device)
    max_iou.scatter_reduce_(0, anchor_key, iou, reduce="amax")
    at_max = iou == max_iou[anchor_key]
    nearest = torch.full((num_images * num_anchors,), sentinel, dtype=torch.long, device=device)
    nearest.scatter_reduce_(0, anchor_key[at_max], obj[at_max], reduce="amin")
    nearest = torch.where(nearest == sentinel, -1, nearest)
    # Per object: highest IoU and its lowest-index anchor.
    object_key = image * max_objects + obj
    best_iou = torch.zeros(num_images * max_objects, device=device)
    best_iou.scatter_reduce_(0, object_key, iou, reduce="amax")
    at_best = (iou == best_iou[object_key]) & (iou > 0)
    best_anchor = torch.full((num_images * max_objects,), sentinel, dtype=torch.long, device=device)
    best_anchor.scatter_reduce_(0, object_key[at_best], anchor[at_best], reduce="amin")
    # Claims: (j*(r), r) at or above the positive threshold, and (j, best anchor of j).
    above = (max_iou >= pos_iou).nonzero().squeeze(1)  # flat (image, anchor)
    has_best = (best_anchor != sentinel).nonzero().squeeze(1)  # flat (image, object)
    owner = resolve_claims(
        torch.cat([above // num_anchors, has_best // max_objects]),
        torch.cat([nearest[above], has_best % max_objects]),
        torch.cat([above % num_anchors, best_anchor[has_best]]),
        torch.cat([max_iou[above], best_iou[has_best]]),
        num_images,
        num_anchors,
    )
    ignore = (owner < 0) & (max_iou.view(num_images, num_anchors) >= neg_iou)
    num_pos = count_per_object(owner, max_objects)
    nearest = nearest.view(num_images, num_anchors)
    num_ignored = count_per_object(torch.where(ignore, nearest, -1), max_objects)
    return owner, ignore, num_pos, num_ignored


def _localize_to_classify(
    pred: Tensor, boxes: Tensor, valid: Tensor, num_pos: Tensor, num_ignored: Tensor
) -> Tuple[Tensor, Tensor]:
    """Classification owner (N, R) long and ignore mask (N, R) bool of Localize to Classify
    (module docstring, step 2) from predicted boxes (N, R, 4) and boxes (N, M_max, 4) float32,
    validity (N, M_max) and the static counts N_p, N_i (N, M_max)."""
    num_images, num_anchors = pred.shape[:2]
    i, o, a = intersecting_pairs(pred, boxes, valid)
    iou_reg = matched_box_iou(pred[i, a].to(torch.float64), boxes[i, o].to(torch.float64)).float()
    rank = rank_within_objects(i * boxes.shape[1] + o, a, iou_reg)
    first, count = num_pos[i, o], num_ignored[i, o]
    pos = select_ranks(rank, iou_reg, torch.zeros_like(first), first)
    cls_owner = resolve_claims(i[pos], o[pos], a[pos], iou_reg[pos], num_images, num_anchors)
    held = select_ranks(rank, iou_reg, first, count)
    ignore = torch.zeros(num_images, num_anchors, dtype=torch.bool, device=pred.device)
    ignore[i[held], a[held]] = True
    return cls_owner, ignore & (cls_owner < 0)


class MutualGuidanceAssigner:
    """Static / Localize-to-Classify / Classify-to-Localize / Mutual Guidance anchor labels.

    ``l2c=False, c2l=False`` reproduces the static labels exactly; each flag switches one
    component on independently (the four rows of the paper's Table 1).
    """

    def __init__(
        self,
        l2c: bool = True,
        c2l: bool = True,
        sigma: float = 2.0,
        pos_iou: float = 0.5,
        neg_iou: float = 0.4,
    ) -> None:
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 1):
            raise ValueError(f"MutualGuidanceAssigner: sigma must be > 1, got {sigma!r}")
        if not (0 < neg_iou <= pos_iou <= 1):
            raise ValueError(
                "MutualGuidanceAssigner: need 0 < neg_iou <= pos_iou <= 1, "
                f"got neg_iou={neg_iou!r}, pos_iou={pos_iou!r}"
            )
        self.l2c = bool(l2c)
        self.c2l = bool(c2l)
        self.sigma = float(sigma)
        self.pos_iou = float(pos_iou)
        self.neg_iou = float(neg_iou)

    def __repr__(self) -> str:
        return (
            f"MutualGuidanceAssigner(l2c={self.l2c}, c2l={self.c2l}, sigma={self.sigma}, "
            f"pos_iou={self.pos_iou}, neg_iou={self.neg_iou})"
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
        """Label the anchors of a batch for both heads (musu's assigner protocol; the anchor
        boxes come from ``grid.boxes()``, e.g. ``AnchorList(boxes=anchors)``).

        Returns:
            Assignment: classification gt_index, cls_weight, ignore; regression reg_gt_index,
            reg_weight; ``stats``: N_p in ``bag_size``, N_i in ``num_ignored``, (N, M_max) long.
        """
        check_assigner_inputs(
            grid, scores, pred_boxes, gt_boxes, gt_classes, "MutualGuidanceAssigner"
        )
        device = scores.device
        num_images, num_anchors, _ = scores.shape
        boxes, classes, valid = pad_ground_truth(gt_boxes, gt_classes, torch.float32, device)
        shape = (num_images, boxes.shape[1], num_anchors)
        anchors = grid.boxes(device)  # (R, 4) float32

        # 1. Static labels from the (image, object, anchor) pairs with IoU_anchor > 0.
        image, obj, anchor = intersecting_pairs(anchors[None], boxes, valid)  # (P,) each
        iou64 = matched_box_iou(anchors.double()[anchor], boxes.double()[image, obj])  # (P,)
        owner, ignore, num_pos, num_ignored = _static_labels(
            image, obj, anchor, iou64.float(), shape, self.pos_iou, self.neg_iou
        )
        cls_owner = reg_owner = owner

        # 2. Localize to Classify on the pairs with IoU_regressed > 0.
        if self.l2c:
            cls_owner, ignore = _localize_to_classify(
                pred_boxes.to(torch.float32), boxes, valid, num_pos, num_ignored
            )

        # 3. Classify to Localize on the pairs with IoU_anchor > 0.
        if self.c2l:
            p = scores[image, anchor, classes[image, obj]]  # (P,)
            amp = amplified(iou64, p, self.sigma)
            reg_owner = top_ranked_owners(image, obj, anchor, amp, num_pos, shape)

        return Assignment(
            gt_index=cls_owner,
            cls_weight=(cls_owner >= 0).float(),
            reg_weight=(reg_owner >= 0).float(),
            ignore=ignore,
            reg_gt_index=reg_owner,
            stats={"bag_size": num_pos, "num_ignored": num_ignored},
        )
