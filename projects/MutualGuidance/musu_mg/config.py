"""``add_mg_config(cfg)``: adds ``cfg.MODEL.MG`` and edits nothing else."""

from __future__ import annotations

from detectron2.config import CfgNode as CN

from musu.config import check_bool, check_choice, check_number

__all__ = ["add_mg_config", "validate_mg_config", "BOX_LOSSES"]

# Box regression losses of MGRetinaNet: Balanced L1 on the anchor deltas (the paper's choice) or
# GIoU on the decoded boxes.
BOX_LOSSES = ("balanced_l1", "giou")


def add_mg_config(cfg: CN) -> None:
    """Add the ``MODEL.MG`` node (paper defaults: both components on, sigma 2), in place."""
    cfg.MODEL.MG = CN()
    # Localize to Classify: classification positives / ignored anchors are the top N_p / next N_i
    # anchors by IoU(regressed box, object). False: the static IoU(anchor, object) labels.
    cfg.MODEL.MG.L2C = True
    # Classify to Localize: regression positives are the top N_p anchors by the amplified IoU
    # IoU_anchor ** ((SIGMA - p) / SIGMA). False: the static positives.
    cfg.MODEL.MG.C2L = True
    # sigma of Eq. 1 (paper: 2 for all experiments); must be > 1.
    cfg.MODEL.MG.SIGMA = 2.0
    # Static reference labels: IoU(anchor, object) >= POS_IOU is positive (paper: 0.5) ...
    cfg.MODEL.MG.POS_IOU = 0.5
    # ... and max IoU < NEG_IOU is negative (paper: 0.4); in between: ignored.
    cfg.MODEL.MG.NEG_IOU = 0.4
    # Box loss of MGRetinaNet, one of BOX_LOSSES ("balanced_l1": the paper's, Libra R-CNN).
    cfg.MODEL.MG.BOX_LOSS = "balanced_l1"
    # Balanced L1 alpha (Libra R-CNN: 0.5).
    cfg.MODEL.MG.BALANCED_L1_ALPHA = 0.5
    # Balanced L1 gamma (Libra R-CNN: 1.5); b is set by alpha * ln(b + 1) = gamma.
    cfg.MODEL.MG.BALANCED_L1_GAMMA = 1.5
    # Balanced L1 beta: |x| is measured in units of beta (mmdetection's Libra RetinaNet: 0.11).
    cfg.MODEL.MG.BALANCED_L1_BETA = 0.11
    # Weight of the box loss in L = L_cls + weight * L_box.
    cfg.MODEL.MG.BOX_LOSS_WEIGHT = 1.0


def validate_mg_config(cfg: CN) -> None:
    """Raise ValueError naming the key for an invalid ``MODEL.MG`` value (or, for the
    ``MGRetinaNet`` META_ARCH, a class count that disagrees with ``MODEL.MUSU.NUM_CLASSES``)."""
    mg, path = cfg.MODEL.MG, "MODEL.MG"
    for key in ("L2C", "C2L"):
        check_bool(mg, path, key)
    check_number(mg, path, "SIGMA", low=1, low_open=True)
    check_number(mg, path, "POS_IOU", low=0, high=1, low_open=True)
    check_number(mg, path, "NEG_IOU", low=0, high=mg.POS_IOU, low_open=True, hint="POS_IOU")
    check_choice(mg, path, "BOX_LOSS", BOX_LOSSES)
    for key in ("BALANCED_L1_ALPHA", "BALANCED_L1_GAMMA", "BALANCED_L1_BETA"):
        check_number(mg, path, key, low=0, low_open=True)
    check_number(mg, path, "BOX_LOSS_WEIGHT", low=0)
    if cfg.MODEL.META_ARCHITECTURE == "MGRetinaNet" and "MUSU" in cfg.MODEL:
        # train_net.py checks the training data against MODEL.MUSU.NUM_CLASSES.
        if cfg.MODEL.RETINANET.NUM_CLASSES != cfg.MODEL.MUSU.NUM_CLASSES:
            raise ValueError(
                "Invalid config: MODEL.RETINANET.NUM_CLASSES "
                f"({cfg.MODEL.RETINANET.NUM_CLASSES}) must equal MODEL.MUSU.NUM_CLASSES "
                f"({cfg.MODEL.MUSU.NUM_CLASSES}) for MGRetinaNet (the training data is checked "
                "against the latter)"
            )
