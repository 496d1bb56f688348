"""Modeling: importing this registers the MuSu META_ARCH and its backbone builder."""

from .assigner import Assignment, MuSuAssigner, assignment_stats
from .backbone import build_musu_resnet_fpn_backbone
from .build import ASSIGNER_REGISTRY, build_assigner
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
    "MuSuHead",
    "focal_loss_terms",
    "musu_classification_loss",
    "weighted_giou_loss",
    "MuSu",
]
