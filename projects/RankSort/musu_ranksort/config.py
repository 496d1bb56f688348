"""``add_ranksort_config(cfg)``: adds ``cfg.MODEL.RANKSORT`` and edits nothing else."""

from __future__ import annotations

from detectron2.config import CfgNode as CN

from musu.config import check_choice, check_number

__all__ = ["add_ranksort_config", "validate_ranksort_config", "CLS_LABELS"]

# Continuous label of a positive: IoU of its predicted box, or that IoU times the assigner's
# classification weight (MuSu's soft bag weight; 1 for static assigners).
CLS_LABELS = ("iou", "iou_x_weight")


def add_ranksort_config(cfg: CN) -> None:
    """Add the ``MODEL.RANKSORT`` node (the supplement's tuning-free defaults), in place."""
    cfg.MODEL.RANKSORT = CN()
    # delta_RS: half-width of the smoothed step H in logit units (paper: 0.5).
    cfg.MODEL.RANKSORT.DELTA = 0.5
    # Continuous label of positives, one of CLS_LABELS ("iou": the paper's choice).
    cfg.MODEL.RANKSORT.CLS_LABEL = "iou"
    # Weight each positive's GIoU loss by its (detached) score p of the target class (Eq. S18,
    # score-based); the assigner's regression weight multiplies it. False: regression weight only.
    cfg.MODEL.RANKSORT.SCORE_WEIGHTED_BOX_LOSS = True
    # Value-based self-balance: box loss times the detached ratio L_RS / L_box (Table S1); when
    # False the box loss is multiplied by MODEL.MUSU.REG_LOSS_WEIGHT instead.
    cfg.MODEL.RANKSORT.SELF_BALANCE = True


def validate_ranksort_config(cfg: CN) -> None:
    """Raise ValueError naming the key for an invalid ``MODEL.RANKSORT`` value."""
    rs, path = cfg.MODEL.RANKSORT, "MODEL.RANKSORT"
    check_number(rs, path, "DELTA", low=0, low_open=True)
    check_choice(rs, path, "CLS_LABEL", CLS_LABELS)
