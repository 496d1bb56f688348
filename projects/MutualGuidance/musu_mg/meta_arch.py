"""``MGRetinaNet``: Detectron2's RetinaNet trained with Mutual Guidance anchor labels.

Backbone, head, anchor generator, box transform and inference are RetinaNet's, unchanged. Only
the training loss path differs: the assigner (``MutualGuidanceAssigner``) sees the detached class
probabilities and decoded boxes, then
  classification: sigmoid focal loss over every non-ignored anchor, one-hot targets on the
      classification positives;
  regression: Balanced L1 on the (dx, dy, dw, dh) deltas (or GIoU on decoded boxes) of the
      regression positives towards their own object (``reg_gt_index``);
both divided by Detectron2's EMA normalizer of the number of *static* positives (sum of N_p),
which is the same quantity for all four rows of Table 1.
Shapes: N images, R anchors (all levels, A per location), C classes, P regression positives.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from fvcore.nn import giou_loss, sigmoid_focal_loss_jit
from torch import Tensor

from musu.modeling.assigners import AnchorList, Assigner, Assignment, pad_ground_truth

from .assigner import MutualGuidanceAssigner
from .config import BOX_LOSSES, validate_mg_config
from .losses import balanced_l1_loss

__all__ = ["MGRetinaNet", "build_mg_assigner"]


def build_mg_assigner(cfg) -> MutualGuidanceAssigner:
    """The anchor-box assigner from ``MODEL.MG``."""
    mg = cfg.MODEL.MG
    return MutualGuidanceAssigner(
        l2c=mg.L2C, c2l=mg.C2L, sigma=mg.SIGMA, pos_iou=mg.POS_IOU, neg_iou=mg.NEG_IOU
    )


@META_ARCH_REGISTRY.register()
class MGRetinaNet(RetinaNet):
    """RetinaNet (``MODEL.RETINANET``, ``MODEL.ANCHOR_GENERATOR``) with Mutual Guidance labels
    (``MODEL.MG``); inference is RetinaNet's."""

    @configurable
    def __init__(
        self,
        *,
        assigner: Assigner,
        box_loss: str = "balanced_l1",
        balanced_l1_alpha: float = 0.5,
        balanced_l1_gamma: float = 1.5,
        balanced_l1_beta: float = 0.11,
        box_loss_weight: float = 1.0,
        **kwargs,
    ) -> None:
        """
        Args:
            assigner: musu assigner called with ``AnchorList(boxes=anchors)``; its ``stats``
                hold ``bag_size`` (N_p) and ``num_ignored`` (N_i).
            box_loss: one of ``BOX_LOSSES``.
            balanced_l1_alpha, balanced_l1_gamma, balanced_l1_beta: Balanced L1 parameters.
            box_loss_weight: weight of the box loss.
            kwargs: :class:`RetinaNet` arguments.
        """
        super().__init__(**kwargs)
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"MGRetinaNet: box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        self.assigner = assigner
        self.box_loss = box_loss
        self.balanced_l1_alpha = balanced_l1_alpha
        self.balanced_l1_gamma = balanced_l1_gamma
        self.balanced_l1_beta = balanced_l1_beta
        self.box_loss_weight = box_loss_weight

    @classmethod
    def from_config(cls, cfg) -> dict:
        validate_mg_config(cfg)
        mg = cfg.MODEL.MG
        ret = super().from_config(cfg)
        ret.update(
            assigner=build_mg_assigner(cfg),
            box_loss=mg.BOX_LOSS,
            balanced_l1_alpha=mg.BALANCED_L1_ALPHA,
            balanced_l1_gamma=mg.BALANCED_L1_GAMMA,
            balanced_l1_beta=mg.BALANCED_L1_BETA,
            box_loss_weight=mg.BOX_LOSS_WEIGHT,
        )
        return ret

    def decode(self, anchors: Tensor, deltas: Tensor) -> Tensor:
        """(N, R, 4) boxes from (R, 4) anchors and (N, R, 4) deltas."""
        num_images, num_anchors = deltas.shape[:2]
        boxes = self.box2box_transform.apply_deltas(
            deltas.reshape(-1, 4), anchors[None].expand(num_images, -1, -1).reshape(-1, 4)
        )
        return boxes.view(num_images, num_anchors, 4)

    def forward_training(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: List[List[Tensor]],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        pred_logits, pred_deltas = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4]
        )
        anchors = Boxes.cat(self.anchor_generator(features)).tensor  # (R, 4)
        # Assignment and losses in float32 even under mixed precision.
        with torch.autocast(device_type=images.tensor.device.type, enabled=False):
            logits = cat(pred_logits, dim=1).float()  # (N, R, C)
            deltas = cat(pred_deltas, dim=1).float()  # (N, R, 4)
            anchors = anchors.float()
            gt_boxes = [x.gt_boxes.tensor.float() for x in gt_instances]
            gt_classes = [x.gt_classes for x in gt_instances]
            with torch.no_grad():
                scores = logits.detach().sigmoid()
                pred_boxes = self.decode(anchors, deltas.detach())
                assignment = self.assigner(
                    AnchorList(boxes=anchors), scores, pred_boxes, gt_boxes, gt_classes
                )
            return self.mg_losses(anchors, logits, deltas, gt_boxes, gt_classes, assignment)

    def mg_losses(
        self,
        anchors: Tensor,
        logits: Tensor,
        deltas: Tensor,
        gt_boxes: List[Tensor],
        gt_classes: List[Tensor],
        assignment: Assignment,
    ) -> Dict[str, Tensor]:
        """Focal loss on non-ignored anchors, box loss on regression positives, each over the EMA
        of the number of static positives.

        Args:
            anchors: (R, 4); logits: (N, R, C); deltas: (N, R, 4); gt_boxes / gt_classes: per
            image (M_n, 4) / (M_n,); assignment: from the assigner.
        """
        num_images = logits.shape[0]
        padded_boxes, padded_classes, _ = pad_ground_truth(
            gt_boxes, gt_classes, torch.float32, logits.device
        )  # (N, M_max, 4), (N, M_max)
        cls_pos = assignment.gt_index >= 0  # (N, R)
        reg_pos = assignment.reg_gt_index >= 0  # (N, R)
        ignore = assignment.ignore if assignment.ignore is not None else torch.zeros_like(cls_pos)
        num_static = int(assignment.stats["bag_size"].sum())
        normalizer = self._ema_update("loss_normalizer", max(num_static, 1), 100)

        targets = torch.zeros_like(logits)  # (N, R, C)
        image, anchor = cls_pos.nonzero(as_tuple=True)
        targets[image, anchor, padded_classes[image, assignment.gt_index[image, anchor]]] = 1.0
        valid = ~ignore
        loss_cls = sigmoid_focal_loss_jit(
            logits[valid],
            targets[valid],
            alpha=self.focal_loss_alpha,
            gamma=self.focal_loss_gamma,
            reduction="sum",
        )

        image, anchor = reg_pos.nonzero(as_tuple=True)  # (P,) each
        target_boxes = padded_boxes[image, assignment.reg_gt_index[image, anchor]]  # (P, 4)
        if self.box_loss == "balanced_l1":
            target_deltas = self.box2box_transform.get_deltas(anchors[anchor], target_boxes)
            loss_box = balanced_l1_loss(
                deltas[image, anchor] - target_deltas,
                self.balanced_l1_alpha,
                self.balanced_l1_gamma,
                self.balanced_l1_beta,
            ).sum()
        else:
            pred = self.box2box_transform.apply_deltas(deltas[image, anchor], anchors[anchor])
            loss_box = giou_loss(pred, target_boxes, reduction="sum") if len(pred) else pred.sum()

        self._log_assignment(assignment, num_images)
        return {
            "loss_cls": loss_cls / normalizer,
            "loss_box_reg": self.box_loss_weight * loss_box / normalizer,
        }

    @staticmethod
    def _log_assignment(assignment: Assignment, num_images: int) -> None:
        try:
            storage = get_event_storage()
        except AssertionError:  # outside a trainer: nothing to log
            return
        cls_pos = assignment.gt_index >= 0
        stats = {
            "mg/num_static_pos": assignment.stats["bag_size"].sum(),
            "mg/num_cls_pos": cls_pos.sum(),
            "mg/num_reg_pos": (assignment.reg_gt_index >= 0).sum(),
            "mg/num_ignored": assignment.ignore.sum() if assignment.ignore is not None else 0,
            "mg/num_cls_and_reg_pos": (cls_pos & (assignment.reg_gt_index >= 0)).sum(),
        }
        for name, value in stats.items():
            storage.put_scalar(name, float(value) / max(num_images, 1))
