"""Detectron2's own FCOS, unchanged, as the META_ARCH "D2FCOS": the peer MuSu is compared with.

The builder only *constructs* ``detectron2.modeling.meta_arch.fcos.FCOS`` with ``FCOSHead`` from
YAML keys; training, losses, assignment and inference are Detectron2's code. Shared settings come
from ``MODEL.MUSU`` (NUM_CLASSES, IN_FEATURES, NUM_CONVS, NORM, PRIOR_PROB, FOCAL_LOSS_ALPHA/GAMMA,
SCORE_THRESH_TEST, TOPK_CANDIDATES_TEST, NMS_THRESH_TEST) so that a MuSu config and an FCOS config
differ only in ``MODEL.META_ARCHITECTURE``; the centre-sampling radius is
``MODEL.MUSU.FCOS_CENTER_SAMPLING_RADIUS``, shared with the FCOS-rule assigner.

Differences from MuSu that are FCOS's own design (kept, not "fixed"): linear stride-normalized box
regression without per-level learnable scales, a centerness branch on the regression tower, the
center-sampling + scale-range assignment, and the inference score
``sqrt(sigmoid(cls) * sigmoid(ctr))`` (MuSu: ``sigmoid(cls) * sigmoid(obj)``).

Under mixed precision the losses run in float32 on float32 copies of the predictions, as MuSu's do
(Detectron2's ``FCOS.losses`` mixes dtypes in its GIoU loss under autocast and fails); in float32
this is Detectron2's computation exactly.
"""

from __future__ import annotations

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_backbone
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead

from .meta_arch import check_finite_predictions, check_in_features

__all__ = ["D2FCOS", "Float32LossFCOS"]


class Float32LossFCOS(FCOS):
    """Detectron2's ``FCOS`` whose losses run with autocast disabled, on float32 predictions;
    non-finite box predictions raise ``FloatingPointError`` (Detectron2 would stop on a box
    assert)."""

    def losses(
        self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness
    ):
        # Each prediction is a list over levels of (N, Hi * Wi, K) tensors, K = C, 4 or 1.
        check_finite_predictions("D2FCOS", {"box regression": pred_anchor_deltas})
        with torch.autocast(device_type=pred_logits[0].device.type, enabled=False):
            return super().losses(
                anchors,
                [x.float() for x in pred_logits],
                gt_labels,
                [x.float() for x in pred_anchor_deltas],
                gt_boxes,
                [x.float() for x in pred_centerness],
            )


def _center_sampling_radius(cfg: CfgNode) -> float:
    radius = cfg.MODEL.MUSU.FCOS_CENTER_SAMPLING_RADIUS
    if not radius > 0:
        raise ValueError(
            "Invalid config: D2FCOS needs MODEL.MUSU.FCOS_CENTER_SAMPLING_RADIUS > 0 (Detectron2's "
            f"FCOS always samples around the centre), got {radius!r}"
        )
    return float(radius)


@META_ARCH_REGISTRY.register()
def D2FCOS(cfg: CfgNode) -> FCOS:  # noqa: N802 - registry name is the function name
    """Detectron2's ``FCOS`` + ``FCOSHead`` built from ``MODEL.MUSU`` keys (float32 losses)."""
    musu = cfg.MODEL.MUSU
    if musu.NUM_ANCHORS != 1:
        raise ValueError(
            f"Invalid config: D2FCOS has one anchor point per location; MODEL.MUSU.NUM_ANCHORS "
            f"must be 1, got {musu.NUM_ANCHORS}"
        )
    if musu.NUM_CONVS < 1:
        raise ValueError(
            f"Invalid config: D2FCOS (FCOSHead) needs MODEL.MUSU.NUM_CONVS >= 1, "
            f"got {musu.NUM_CONVS}"
        )
    if musu.DEFORMABLE_LAST_CONV:
        raise ValueError("Invalid config: D2FCOS has no deformable head conv option")
    backbone = build_backbone(cfg)
    shapes = check_in_features(backbone, musu.IN_FEATURES)
    input_shape = [shapes[f] for f in musu.IN_FEATURES]
    head = FCOSHead(
        input_shape=input_shape,
        conv_dims=[input_shape[0].channels] * musu.NUM_CONVS,
        num_classes=musu.NUM_CLASSES,
        norm=musu.NORM,
        prior_prob=musu.PRIOR_PROB,
    )
    return Float32LossFCOS(
        backbone=backbone,
        head=head,
        head_in_features=list(musu.IN_FEATURES),
        num_classes=musu.NUM_CLASSES,
        center_sampling_radius=_center_sampling_radius(cfg),
        focal_loss_alpha=musu.FOCAL_LOSS_ALPHA,
        focal_loss_gamma=musu.FOCAL_LOSS_GAMMA,
        test_score_thresh=musu.SCORE_THRESH_TEST,
        test_topk_candidates=musu.TOPK_CANDIDATES_TEST,
        test_nms_thresh=musu.NMS_THRESH_TEST,
        max_detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
    )
