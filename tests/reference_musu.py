"""Plain reference implementations of MuSu (Procedure 1, Eqs. 1-7) and the GIoU loss.

Written directly from the paper with Python loops over images, objects, anchors and classes,
independently of ``musu.modeling``. The tests compare the vectorized implementation to these.

Numerics of the assigner reference follow the implementation contract: IoU, q, P and v are
computed in float64 (Python floats) and rounded to float32 before every comparison, so the
discrete decisions (object choice, bag membership, ranks) agree exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

Box = Sequence[float]

CRITERIA = ("mutual", "cls", "iou")


def f32(x: float) -> float:
    """Round a Python float to the nearest float32 value, returned as a Python float."""
    return float(np.float32(x))


def point_in_box(x: float, y: float, box: Box) -> bool:
    """True iff (x, y) lies strictly inside the XYXY box (all four distances > 0)."""
    x1, y1, x2, y2 = box
    return x - x1 > 0 and y - y1 > 0 and x2 - x > 0 and y2 - y > 0


def box_iou(pred: Box, gt: Box) -> float:
    """IoU of two XYXY boxes in float64: inter / (area_pred + area_gt - inter)."""
    inter_w = max(0.0, min(pred[2], gt[2]) - max(pred[0], gt[0]))
    inter_h = max(0.0, min(pred[3], gt[3]) - max(pred[1], gt[1]))
    inter = inter_w * inter_h
    area_pred = (pred[2] - pred[0]) * (pred[3] - pred[1])
    area_gt = (gt[2] - gt[0]) * (gt[3] - gt[1])
    return inter / (area_pred + area_gt - inter)


@dataclass
class RefAssignment:
    """Reference assignment: the fields of ``musu.modeling.assigners.Assignment``, with MuSu's
    statistics (bag_size, tau_cls) as attributes."""

    gt_index: torch.Tensor  # (N, R) long
    cls_weight: torch.Tensor  # (N, R) float64
    reg_weight: torch.Tensor  # (N, R) float64
    bag_size: torch.Tensor  # (N, M_max) long
    tau_cls: torch.Tensor  # (N, M_max) float64


def rank_to_weight(rank: int, tau: float, soft: bool) -> float:
    """Eq. 4 (soft) or its hard variant 1[R < tau]."""
    if soft:
        return math.exp(-rank / tau)
    return 1.0 if rank < tau else 0.0


def criterion_values(p: float, q: float, alpha: float, criterion: str) -> Tuple[float, float]:
    """(v_cls, v_reg) in float64 for one anchor: Eq. 3 ('mutual'), p ('cls') or q ('iou')."""
    if criterion == "mutual":
        return q * p**alpha, p * q**alpha
    if criterion == "cls":
        return p, p
    if criterion == "iou":
        return q, q
    raise ValueError(f"unknown criterion {criterion!r}")


def ranks_descending(values: Dict[int, float]) -> Dict[int, int]:
    """Rank (from 0) of each anchor by descending value; ties go to the lower anchor index."""
    order = sorted(values, key=lambda i: (-values[i], i))
    return {i: rank for rank, i in enumerate(order)}


def reference_assign(
    points: torch.Tensor,
    scores: torch.Tensor,
    pred_boxes: torch.Tensor,
    gt_boxes: Sequence[torch.Tensor],
    gt_classes: Sequence[torch.Tensor],
    *,
    theta: float,
    bag_threshold: float,
    alpha: float,
    tau_ratio: float,
    temperature: Optional[float],
    soft: bool,
    criterion: str,
) -> RefAssignment:
    """Procedure 1 of the paper, one image, one object and one anchor at a time.

    points (R, 2); scores (N, R, C); pred_boxes (N, R, 4); gt_boxes[n] (M_n, 4);
    gt_classes[n] (M_n,).
    """
    num_images, num_anchors = scores.shape[0], scores.shape[1]
    m_max = max((len(b) for b in gt_boxes), default=0)
    pts: List[List[float]] = points.double().tolist()

    gt_index = [[-1] * num_anchors for _ in range(num_images)]
    cls_weight = [[0.0] * num_anchors for _ in range(num_images)]
    reg_weight = [[0.0] * num_anchors for _ in range(num_images)]
    bag_size = [[0] * m_max for _ in range(num_images)]
    tau_out = [[0.0] * m_max for _ in range(num_images)]

    for n in range(num_images):
        boxes: List[List[float]] = gt_boxes[n].double().tolist()
        classes: List[int] = gt_classes[n].tolist()
        preds: List[List[float]] = pred_boxes[n].double().tolist()
        image_scores: List[List[float]] = scores[n].double().tolist()

        # Line 4: A_j = anchors inside box j for which j has the highest (float32) IoU among
        # the boxes containing the anchor point; strict '>' keeps the lowest index on ties.
        members: List[List[int]] = [[] for _ in boxes]
        for i in range(num_anchors):
            x, y = pts[i]
            best_j = -1
            best_iou = -1.0
            for j, box in enumerate(boxes):
                if not point_in_box(x, y, box):
                    continue
                iou = f32(box_iou(preds[i], box))
                if best_j == -1 or iou > best_iou:
                    best_j, best_iou = j, iou
            if best_j >= 0:
                members[best_j].append(i)

        for j, box in enumerate(boxes):
            a_j = members[j]
            if not a_j:
                continue
            c = classes[j]
            # Eq. 1 in float64: p_i, q_i = IoU_i ** theta, P_i = p_i * q_i.
            p = {i: image_scores[i][c] for i in a_j}
            q = {i: box_iou(preds[i], box) ** theta for i in a_j}
            big_p = {i: f32(p[i] * q[i]) for i in a_j}

            # Line 6 / Eq. 2: C_j = {i in A_j : P_i > b * max_k P_k}; all of A_j if max is 0.
            max_p = max(big_p.values())
            if max_p == 0.0:
                bag = list(a_j)
            else:
                bag = [i for i in a_j if big_p[i] > bag_threshold * max_p]

            # Lines 8-9 / Eq. 3: criterion values (rounded to float32), descending ranks.
            v_cls: Dict[int, float] = {}
            v_reg: Dict[int, float] = {}
            for i in bag:
                vc, vr = criterion_values(p[i], q[i], alpha, criterion)
                v_cls[i], v_reg[i] = f32(vc), f32(vr)
            rank_cls = ranks_descending(v_cls)
            rank_reg = ranks_descending(v_reg)

            # Line 12 / Eqs. 4 and 6: ranks to weights.
            tau_cls = math.sqrt(len(bag)) if temperature is None else float(temperature)
            tau_reg = tau_cls / tau_ratio
            for i in bag:
                gt_index[n][i] = j
                cls_weight[n][i] = rank_to_weight(rank_cls[i], tau_cls, soft)
                reg_weight[n][i] = rank_to_weight(rank_reg[i], tau_reg, soft)
            bag_size[n][j] = len(bag)
            tau_out[n][j] = tau_cls

    return RefAssignment(
        gt_index=torch.tensor(gt_index, dtype=torch.long).reshape(num_images, num_anchors),
        cls_weight=torch.tensor(cls_weight, dtype=torch.float64).reshape(num_images, num_anchors),
        reg_weight=torch.tensor(reg_weight, dtype=torch.float64).reshape(num_images, num_anchors),
        bag_size=torch.tensor(bag_size, dtype=torch.long).reshape(num_images, m_max),
        tau_cls=torch.tensor(tau_out, dtype=torch.float64).reshape(num_images, m_max),
    )


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    """Logistic function on a Python float (moderate inputs)."""
    return 1.0 / (1.0 + math.exp(-x))


def reference_focal_terms(
    cls_logit: float, obj_logit: float, alpha: float = 0.25, gamma: float = 2.0
) -> Tuple[float, float]:
    """(FL+(p), FL-(p)) for merged p = sigmoid(cls) * sigmoid(obj), direct formula in float64."""
    p = sigmoid(cls_logit) * sigmoid(obj_logit)
    pos = -alpha * (1.0 - p) ** gamma * math.log(p)
    neg = -(1.0 - alpha) * p**gamma * math.log1p(-p)
    return pos, neg


def reference_classification_loss(
    cls_logits: torch.Tensor,
    obj_logits: torch.Tensor,
    target_classes: torch.Tensor,
    cls_weight: torch.Tensor,
    focal_alpha: float = 0.25,
    gamma: float = 2.0,
    beta: float = 4.0,
) -> float:
    """Unnormalized sum over anchors of Eq. 7, looping over anchors and classes.

    cls_logits (N, R, C); obj_logits (N, R); target_classes (N, R) in [-1, C); cls_weight (N, R).
    """
    logits = cls_logits.double().tolist()
    objs = obj_logits.double().tolist()
    targets = target_classes.tolist()
    weights = cls_weight.double().tolist()
    total = 0.0
    for n in range(len(logits)):
        for r in range(len(logits[n])):
            target, w = targets[n][r], weights[n][r]
            for k, logit in enumerate(logits[n][r]):
                pos, neg = reference_focal_terms(logit, objs[n][r], focal_alpha, gamma)
                if k == target:
                    total += w * pos + (1.0 - w) ** beta * neg  # soft target: l+ and l-
                else:
                    total += neg  # background term l_bg
    return total


def stable_focal_terms_torch(
    cls_logits: torch.Tensor, obj_logits: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-space float64 focal terms, accurate for any logits (used at extreme logits).

    log p = -softplus(-a) - softplus(-b);
    log(1 - p) = log(e^-a + e^-b + e^-(a+b)) - softplus(-a) - softplus(-b).
    cls_logits (..., C); obj_logits (...,). Returns (pos, neg), both (..., C).
    """
    a = cls_logits.double()  # (..., C)
    b = obj_logits.double().unsqueeze(-1).expand_as(a)  # (..., C)
    log_den = torch.nn.functional.softplus(-a) + torch.nn.functional.softplus(-b)
    log_p = -log_den
    log_1mp = torch.logsumexp(torch.stack([-a, -b, -a - b]), dim=0) - log_den
    pos = -alpha * torch.exp(gamma * log_1mp) * log_p
    neg = -(1.0 - alpha) * torch.exp(gamma * log_p) * log_1mp
    return pos, neg


def stable_classification_loss_torch(
    cls_logits: torch.Tensor,
    obj_logits: torch.Tensor,
    target_classes: torch.Tensor,
    cls_weight: torch.Tensor,
    focal_alpha: float = 0.25,
    gamma: float = 2.0,
    beta: float = 4.0,
) -> torch.Tensor:
    """Eq. 7 summed over anchors with ``stable_focal_terms_torch`` (differentiable, float64)."""
    pos, neg = stable_focal_terms_torch(cls_logits, obj_logits, focal_alpha, gamma)  # (N, R, C)
    num_classes = cls_logits.shape[-1]
    classes = torch.arange(num_classes).view(1, 1, num_classes)
    is_target = (target_classes.unsqueeze(-1) == classes).double()  # (N, R, C)
    w = cls_weight.double().unsqueeze(-1)  # (N, R, 1)
    per_class = is_target * (w * pos + (1.0 - w) ** beta * neg) + (1.0 - is_target) * neg
    return per_class.sum()


def reference_giou(pred: Box, target: Box) -> float:
    """Generalized IoU of two XYXY boxes (positive areas), float64."""
    inter_w = max(0.0, min(pred[2], target[2]) - max(pred[0], target[0]))
    inter_h = max(0.0, min(pred[3], target[3]) - max(pred[1], target[1]))
    inter = inter_w * inter_h
    union = (
        (pred[2] - pred[0]) * (pred[3] - pred[1])
        + (target[2] - target[0]) * (target[3] - target[1])
        - inter
    )
    enclose = (max(pred[2], target[2]) - min(pred[0], target[0])) * (
        max(pred[3], target[3]) - min(pred[1], target[1])
    )
    return inter / union - (enclose - union) / enclose


def reference_weighted_giou_loss(
    pred_boxes: torch.Tensor, target_boxes: torch.Tensor, weights: torch.Tensor
) -> float:
    """sum_i weights_i * (1 - GIoU_i) over P box pairs; pred/target (P, 4), weights (P,)."""
    total = 0.0
    for pred, target, w in zip(
        pred_boxes.double().tolist(), target_boxes.double().tolist(), weights.double().tolist()
    ):
        total += w * (1.0 - reference_giou(pred, target))
    return total
