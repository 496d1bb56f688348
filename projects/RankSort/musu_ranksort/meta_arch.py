"""``MuSuRankSort``: the MuSu detector with the Rank & Sort loss as its classification loss.

Any assigner supplies the positives (MuSu's candidate bags, the FCOS rule, ...). Classification:
RS loss over every (anchor, class) score of the batch, the positives being (anchor, assigned
class) pairs with a positive classification weight, labelled by the IoU of the predicted box.
Regression: GIoU weighted by the positive's detached score (times the assigner's regression
weight), normalized by the summed weights (Eq. S18), and value-based self-balance (Table S1).
Shapes: N images, R anchors, C classes, K kept scores, P regression samples.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from fvcore.nn import giou_loss
from torch import Tensor

from musu.modeling.assigners import Assignment, matched_box_iou, pad_ground_truth
from musu.modeling.losses import merged_logits
from musu.modeling.meta_arch import MuSu

from .config import CLS_LABELS, validate_ranksort_config
from .rank_sort import rank_sort_loss

__all__ = ["MuSuRankSort"]


@META_ARCH_REGISTRY.register()
class MuSuRankSort(MuSu):
    """MuSu architecture and assigner, Rank & Sort classification loss, self-balanced GIoU."""

    @configurable
    def __init__(
        self,
        *,
        rs_delta: float = 0.5,
        cls_label: str = "iou",
        score_weighted_box_loss: bool = True,
        self_balance: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if cls_label not in CLS_LABELS:
            raise ValueError(f"MuSuRankSort: cls_label must be one of {CLS_LABELS}")
        self.rs_delta = float(rs_delta)
        self.cls_label = cls_label
        self.score_weighted_box_loss = bool(score_weighted_box_loss)
        self.self_balance = bool(self_balance)

    @classmethod
    def from_config(cls, cfg) -> dict:
        validate_ranksort_config(cfg)
        args = super().from_config(cfg)
        rs = cfg.MODEL.RANKSORT
        args.update(
            rs_delta=rs.DELTA,
            cls_label=rs.CLS_LABEL,
            score_weighted_box_loss=rs.SCORE_WEIGHTED_BOX_LOSS,
            self_balance=rs.SELF_BALANCE,
        )
        return args

    def losses(
        self,
        cls_logits: Tensor,
        obj_logits: Tensor,
        pred_boxes: Tensor,
        gt_boxes: List[Tensor],
        gt_classes: List[Tensor],
        assignment: Assignment,
    ) -> Dict[str, Tensor]:
        """RS loss over all scores and the self-balanced, score-weighted GIoU loss."""
        padded_boxes, padded_classes, _ = pad_ground_truth(
            gt_boxes, gt_classes, pred_boxes.dtype, pred_boxes.device
        )  # (N, M_max, 4), (N, M_max)
        logits = merged_logits(cls_logits, obj_logits)  # (N, R, C)
        targets = pred_boxes, padded_boxes, padded_classes
        loss_cls = self._rank_sort_loss(logits, *targets, assignment)
        loss_box = self._box_loss(logits, *targets, assignment)
        if self.self_balance:
            ratio = loss_cls.detach() / loss_box.detach().clamp(min=1e-12)
            loss_box = loss_box * ratio
        else:
            loss_box = loss_box * self.reg_loss_weight
        return {"loss_rs_cls": loss_cls, "loss_rs_box": loss_box}

    def _rank_sort_loss(
        self,
        logits: Tensor,
        pred_boxes: Tensor,
        padded_boxes: Tensor,
        padded_classes: Tensor,
        assignment: Assignment,
    ) -> Tensor:
        """RS loss over every non-ignored (anchor, class) logit (N, R, C); positives are
        (anchor, assigned class) with a positive cls weight, labelled by the detached IoU of the
        predicted box (times the cls weight for ``cls_label`` "iou_x_weight")."""
        num_classes = logits.shape[-1]
        positive_anchor = (assignment.gt_index >= 0) & (assignment.cls_weight > 0)  # (N, R)
        keep_anchor = torch.ones_like(positive_anchor)
        if assignment.ignore is not None:
            positive_anchor &= ~assignment.ignore
            keep_anchor = ~assignment.ignore
        image_index, anchor_index = positive_anchor.nonzero(as_tuple=True)  # (Q,) each
        object_index = assignment.gt_index[image_index, anchor_index]
        pos_class = padded_classes[image_index, object_index]  # (Q,)
        with torch.no_grad():
            iou = matched_box_iou(
                pred_boxes[image_index, anchor_index].detach(),
                padded_boxes[image_index, object_index],
            )
            if self.cls_label == "iou_x_weight":
                iou = iou * assignment.cls_weight[image_index, anchor_index]
        flat_index = (image_index * logits.shape[1] + anchor_index) * num_classes + pos_class
        labels = torch.zeros(logits.numel(), dtype=logits.dtype, device=logits.device)
        labels[flat_index] = iou.to(logits.dtype)
        positive = torch.zeros(logits.numel(), dtype=torch.bool, device=logits.device)
        positive[flat_index] = True
        keep = keep_anchor[..., None].expand_as(logits).reshape(-1)  # (N * R * C,)
        return rank_sort_loss(logits.reshape(-1)[keep], labels[keep], positive[keep], self.rs_delta)

    def _box_loss(
        self,
        logits: Tensor,
        pred_boxes: Tensor,
        padded_boxes: Tensor,
        padded_classes: Tensor,
        assignment: Assignment,
    ) -> Tensor:
        """GIoU on the regression samples, weighted by reg weight x detached score (Eq. S18) and
        normalized by the summed weights; 0 without samples."""
        reg_mask = assignment.reg_weight > 0  # (N, R)
        reg_gt_index = assignment.reg_target_index  # (N, R)
        reg_image, reg_anchor = reg_mask.nonzero(as_tuple=True)  # (P,) each
        reg_object = reg_gt_index[reg_image, reg_anchor]
        weights = assignment.reg_weight[reg_image, reg_anchor]
        if self.score_weighted_box_loss:
            reg_class = padded_classes[reg_image, reg_object]
            score = logits[reg_image, reg_anchor, reg_class].detach().sigmoid()
            weights = weights * score
        if len(reg_image) == 0:
            return pred_boxes.sum() * 0.0
        per_box = giou_loss(
            pred_boxes[reg_image, reg_anchor], padded_boxes[reg_image, reg_object], reduction="none"
        )  # (P,)
        return (weights * per_box).sum() / weights.sum().clamp(min=1e-12)
