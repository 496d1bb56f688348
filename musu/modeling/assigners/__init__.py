"""Assigners: who supervises which anchor, and how much (the protocol is in ``base.py``).

base.py         the assigner protocol, ``Assignment``, input checks
diagnostics.py  ``assignment_diagnostics``: logging scalars describing an assignment
anchor_grid.py  ``AnchorGrid`` (FPN grid points, strides, inside-pair listing) and ``AnchorList``
geometry.py     strict point-in-box test and matched-row IoU
ranking.py      grouped ranking
musu.py         ``MuSuAssigner`` (paper Procedure 1, one function per step)
fcos.py         ``FCOSAssigner`` (the FCOS rule)
wrappers.py     ``IgnoreCrowdRegions``, ``WarmupSwitch``: assigners around assigners
build.py        ``ASSIGNER_REGISTRY``, ``build_assigner``, ``build_training_assigner``
"""

from ...config import CRITERIA
from .anchor_grid import AnchorGrid, AnchorList, dense_inside_pairs
from .base import (
    Anchors,
    Assigner,
    Assignment,
    check_assigner_inputs,
    pad_ground_truth,
)
from .build import (
    ASSIGNER_REGISTRY,
    build_assigner,
    build_fcos_assigner,
    build_musu_assigner,
    build_training_assigner,
)
from .diagnostics import assignment_diagnostics
from .fcos import FCOSAssigner
from .geometry import matched_box_iou, points_in_boxes
from .musu import MuSuAssigner
from .ranking import rank_within_groups
from .wrappers import IgnoreCrowdRegions, WarmupSwitch

__all__ = [
    "ASSIGNER_REGISTRY",
    "AnchorGrid",
    "AnchorList",
    "Anchors",
    "Assigner",
    "Assignment",
    "CRITERIA",
    "FCOSAssigner",
    "IgnoreCrowdRegions",
    "MuSuAssigner",
    "WarmupSwitch",
    "assignment_diagnostics",
    "build_assigner",
    "build_fcos_assigner",
    "build_musu_assigner",
    "build_training_assigner",
    "check_assigner_inputs",
    "dense_inside_pairs",
    "matched_box_iou",
    "pad_ground_truth",
    "points_in_boxes",
    "rank_within_groups",
]
