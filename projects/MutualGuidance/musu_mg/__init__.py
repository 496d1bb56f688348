"""Mutual Guidance (Zhang et al., ACCV 2020) for musu: anchor labels of one head chosen by the
other head's predictions.

``import musu_mg`` registers the ``MGRetinaNet`` META_ARCH (Detectron2's RetinaNet with the
anchor-box assigner ``MutualGuidanceAssigner``) and the MuSu assigner builder
``build_mg_anchor_free_assigner`` (the supplement's anchor-free variant on the MuSu/FCOS
architecture); ``add_mg_config(cfg)`` adds ``cfg.MODEL.MG``.
"""

import musu  # noqa: F401  (registers MuSu, its backbone and datasets)

from .anchor_free import MGAnchorFreeAssigner, build_mg_anchor_free_assigner, centerness
from .assigner import MutualGuidanceAssigner, amplified
from .config import BOX_LOSSES, add_mg_config, validate_mg_config
from .losses import balanced_l1_b, balanced_l1_loss
from .meta_arch import MGRetinaNet, build_mg_assigner

# Generic names for the project hook of the root train_net.py (entry point group musu.projects).
add_config = add_mg_config
validate_config = validate_mg_config

__version__ = "0.1.0"
__all__ = [
    "add_config",
    "add_mg_config",
    "validate_config",
    "validate_mg_config",
    "BOX_LOSSES",
    "MGAnchorFreeAssigner",
    "MGRetinaNet",
    "MutualGuidanceAssigner",
    "balanced_l1_b",
    "balanced_l1_loss",
    "build_mg_anchor_free_assigner",
    "build_mg_assigner",
    "centerness",
    "amplified",
]
