"""Modeling: importing this registers the MuSu META_ARCH and its backbone builder."""

from .assigner import Assignment, MuSuAssigner, assignment_stats
from .backbone import build_musu_resnet_fpn_backbone
from .build import ASSIGNER_REGISTRY, build_assigner
from .fcos_adaptor import D2FCOS  # registers META_ARCH "D2FCOS" (Detectron2's own FCOS)
from .fcos_assigner import build_fcos_assigner
from .head import MuSuHead
from .losses import focal_loss_terms, musu_classification_loss, weighted_giou_loss
from .meta_arch import MuSu

__all__ = [
    "Assignment",
    "MuSuAssigner",
    "assignment_stats",
    "build_musu_resnet_fpn_backbone",
    "ASSIGNER_REGISTRY",
    "build_assigner",
    "build_fcos_assigner",
    "D2FCOS",
    "MuSuHead",
    "focal_loss_terms",
    "musu_classification_loss",
    "weighted_giou_loss",
    "MuSu",
]
