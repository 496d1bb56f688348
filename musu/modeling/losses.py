"""Base losses of MuSu: the split focal loss (Eq. 7) and the weighted GIoU loss.

Losses take an assignment's targets and weights; they never compute an assignment. They return
un-normalized sums: the meta-architecture owns the normalizers (Eq. 5).
Shapes: N images, R anchors, C classes, P regression samples.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from fvcore.nn import giou_loss
from torch import Tensor

__all__ = [
    "focal_loss_terms",
    "merged_logits",
    "musu_classification_loss",
    "weighted_giou_loss",
]


def merged_logits(cls_logits: Tensor, obj_logits: Tensor) -> Tensor:
    """logit(p) for p = sigmoid(cls) * sigmoid(obj), (..., C) from (..., C) and (...,) or
    (..., 1) objectness.

    1 - p = p (e^-a + e^-b + e^-(a+b)), hence logit(p) = -logsumexp(-a, -b, -a-b): exact and
    finite for any finite logits.
    """
    if obj_logits.dim() == cls_logits.dim() - 1:
        obj_logits = obj_logits.unsqueeze(-1)
    a, b = torch.broadcast_tensors(cls_logits, obj_logits)  # (..., C)
    return -torch.logsumexp(torch.stack([-a, -b, -(a + b)]), dim=0)


def _merged_log_probs(cls_logits: Tensor, obj_logits: Tensor) -> tuple[Tensor, Tensor]:
    """log p and log(1 - p) for p = sigmoid(cls) * sigmoid(obj), accurate and finite.

    log p = logsigmoid(a) + logsigmoid(b). For p < 1/2, log(1 - p) = log1p(-p) (accurate for
    small p). For p >= 1/2: log(1 - p) = log p - logit(p) (:func:`merged_logits`), which stays
    finite (and exact) even where p rounds to 1. Both branches have finite gradients for any
    finite logits.
    """
    if obj_logits.dim() == cls_logits.dim() - 1:
        obj_logits = obj_logits.unsqueeze(-1)
    cls_logits, obj_logits = torch.broadcast_tensors(cls_logits, obj_logits)  # (..., C)
    log_p = F.logsigmoid(cls_logits) + F.logsigmoid(obj_logits)
    p = log_p.exp()
    log_odds_neg = -merged_logits(cls_logits, obj_logits)
    log_1mp = torch.where(p < 0.5, torch.log1p(-p.clamp(max=0.5)), log_p + log_odds_neg)
    return log_p, log_1mp


def focal_loss_terms(
    cls_logits: Tensor, obj_logits: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> tuple[Tensor, Tensor]:
    """Element-wise focal losses on the merged probability p = sigmoid(cls) * sigmoid(obj).

    Args:
        cls_logits: (..., C) classification logits.
        obj_logits: (...,) or (..., 1) objectness logits, shared across classes.
    Returns:
        (FL+, FL-), each (..., C): FL+ = -alpha (1-p)^gamma log p, FL- = -(1-alpha) p^gamma log(1-p).
    """
    log_p, log_1mp = _merged_log_probs(cls_logits, obj_logits)
    positive = -alpha * torch.exp(gamma * log_1mp) * log_p
    negative = -(1 - alpha) * torch.exp(gamma * log_p) * log_1mp
    return positive, negative


def musu_classification_loss(
    cls_logits: Tensor,
    obj_logits: Tensor,
    target_classes: Tensor,
    cls_weight: Tensor,
    focal_alpha: float = 0.25,
    gamma: float = 2.0,
    beta: float = 4.0,
    ignore: Optional[Tensor] = None,
) -> Tensor:
    """Sum over anchors of Eq. 7: w FL+(p_c) + (1 - w)^beta FL-(p_c) + sum_{k != c} FL-(p_k).

    Anchors with target class -1 contribute the background term sum_k FL-(p_k) only; anchors
    where ``ignore`` is True contribute nothing.
    Args:
        cls_logits: (N, R, C); obj_logits: (N, R); target_classes: (N, R) long in [-1, C);
        cls_weight: (N, R) in [0, 1]; ignore: optional (N, R) bool.
    Returns:
        A scalar, not normalized.
    """
    positive, negative = focal_loss_terms(cls_logits, obj_logits, focal_alpha, gamma)  # (N, R, C)
    assigned = target_classes >= 0  # (N, R)
    if ignore is not None:
        assigned = assigned & ~ignore
        negative = negative.masked_fill(ignore[..., None], 0.0)
    background = negative.sum()
    if not bool(assigned.any()):
        return background
    target = target_classes[assigned].unsqueeze(1)  # (K, 1)
    pos_c = positive[assigned].gather(1, target).squeeze(1)  # (K,)
    neg_c = negative[assigned].gather(1, target).squeeze(1)
    w = cls_weight[assigned].to(pos_c.dtype)
    # Replace the assigned class's plain FL- by the soft-target pair (positive + penalty).
    soft_target = w * pos_c + ((1 - w).pow(beta) - 1) * neg_c
    return background + soft_target.sum()


def weighted_giou_loss(pred_boxes: Tensor, target_boxes: Tensor, weights: Tensor) -> Tensor:
    """sum_i weights_i * (1 - GIoU(pred_i, target_i)) over (P, 4) XYXY boxes; 0 when P == 0."""
    if pred_boxes.numel() == 0:
        return pred_boxes.sum() * 0.0
    losses = giou_loss(pred_boxes, target_boxes, reduction="none")  # (P,)
    return (weights.to(losses.dtype) * losses).sum()
