"""Modeling: importing this registers the MuSu META_ARCH, its backbone builder and assigners."""

from .assigners import (
    ASSIGNER_REGISTRY,
    AnchorGrid,
    AnchorList,
    Assigner,
    Assignment,
    FCOSAssigner,
    MuSuAssigner,
    assignment_diagnostics,
    build_assigner,
    build_fcos_assigner,
)
from .backbone import build_musu_resnet_fpn_backbone
from .fcos_adaptor import D2FCOS  # registers META_ARCH "D2FCOS" (Detectron2's own FCOS)
from .head import MuSuHead
from .losses import focal_loss_terms, merged_logits, musu_classification_loss, weighted_giou_loss
from .meta_arch import MuSu
from .test_time_augmentation import DenseDetectorWithTTA

__all__ = [
    "AnchorGrid",
    "AnchorList",
    "Assigner",
    "Assignment",
    "FCOSAssigner",
    "MuSuAssigner",
    "assignment_diagnostics",
    "build_musu_resnet_fpn_backbone",
    "ASSIGNER_REGISTRY",
    "build_assigner",
    "build_fcos_assigner",
    "D2FCOS",
    "MuSuHead",
    "focal_loss_terms",
    "merged_logits",
    "musu_classification_loss",
    "weighted_giou_loss",
    "MuSu",
    "DenseDetectorWithTTA",
]
