"""Plain reference implementations of Mutual Guidance (anchor boxes, paper Sec. 3; anchor points,
supplement Sec. 2), written from the text with Python loops over images, objects and anchors.
Nothing is shared with ``musu_mg``; the tests compare the vectorized assigners to these.

The paper leaves ties and conflicts open; the rules below are the ones ``musu_mg`` documents:
  - an anchor's nearest object is the one of highest IoU, ties to the lowest object index;
  - an object's best anchor is the one of highest IoU, ties to the lowest anchor index;
  - "top N" lists are sorted by descending criterion, ties by ascending anchor index, and only
    contain anchors with criterion > 0;
  - an anchor several objects want goes to the highest criterion, ties to the lowest object index;
  - a classification positive claim beats any ignore claim.
Numerics (the implementation's contract): IoUs, amplified IoUs and centerness are computed in
float64 (Python floats) and rounded to float32 before any comparison, and the IoU thresholds are
rounded to float32 too (an IoU of exactly 0.7 passes POS_IOU 0.7); the FCOS rule is evaluated
in float32 (numpy float32 scalars), as ``musu.modeling.assigners.fcos`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

Box = Sequence[float]


def f32(x: float) -> float:
    """Round a Python float to float32, returned as a Python float."""
    return float(np.float32(x))


def box_iou(a: Box, b: Box) -> float:
    """IoU of two XYXY boxes in float64; sides clamped at 0; 0 when the union is empty."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    if union <= 0:
        return 0.0
    return inter / union


def amplify(value: float, p: float, sigma: float) -> float:
    """Eq. 1: value ** ((sigma - p) / sigma) in float64."""
    return max(value, 0.0) ** ((sigma - p) / sigma)


@dataclass
class RefResult:
    """Per image: lists over anchors / objects (plain Python)."""

    cls_owner: List[List[int]]  # object of each classification positive, else -1
    ignore: List[List[bool]]
    reg_owner: List[List[int]]  # object of each regression positive, else -1
    num_pos: List[List[int]]  # N_p per object
    num_ignored: List[List[int]]  # N_i per object


def top_list(criterion: List[float], start: int, count: int) -> List[int]:
    """Anchors of ranks start .. start + count - 1 among those with criterion > 0."""
    candidates = [r for r in range(len(criterion)) if criterion[r] > 0]
    candidates.sort(key=lambda r: (-criterion[r], r))
    return candidates[start : start + count]


def pick_owner(claims: List[Tuple[float, int]]) -> int:
    """Highest claim value, ties to the lowest object index; -1 without claims."""
    owner, best = -1, -math.inf
    for value, obj in sorted(claims, key=lambda c: c[1]):
        if value > best:
            owner, best = obj, value
    return owner


def reference_static(
    anchors: List[Box], boxes: List[Box], pos_iou: float, neg_iou: float
) -> Tuple[List[int], List[bool], List[int], List[int], List[List[float]]]:
    """Static IoU_anchor labels of one image.

    Returns owner per anchor, ignore per anchor, N_p and N_i per object, and the float32 IoU
    table iou[j][r].
    """
    num_anchors, num_objects = len(anchors), len(boxes)
    iou = [
        [f32(box_iou(anchors[r], boxes[j])) for r in range(num_anchors)] for j in range(num_objects)
    ]
    nearest, max_iou = [-1] * num_anchors, [-1.0] * num_anchors
    for r in range(num_anchors):
        for j in range(num_objects):
            if iou[j][r] > max_iou[r]:
                nearest[r], max_iou[r] = j, iou[j][r]
    claims: List[List[Tuple[float, int]]] = [[] for _ in range(num_anchors)]
    for r in range(num_anchors):
        if nearest[r] >= 0 and max_iou[r] >= f32(pos_iou):
            claims[r].append((max_iou[r], nearest[r]))
    for j in range(num_objects):
        best_r, best = -1, -1.0
        for r in range(num_anchors):
            if iou[j][r] > best:
                best_r, best = r, iou[j][r]
        if best > 0:  # every object keeps at least its best anchor
            claims[best_r].append((best, j))
    owner = [pick_owner(c) for c in claims]
    ignore = [
        owner[r] == -1 and nearest[r] >= 0 and max_iou[r] >= f32(neg_iou)
        for r in range(num_anchors)
    ]
    num_pos = [sum(1 for r in range(num_anchors) if owner[r] == j) for j in range(num_objects)]
    num_ignored = [
        sum(1 for r in range(num_anchors) if ignore[r] and nearest[r] == j)
        for j in range(num_objects)
    ]
    return owner, ignore, num_pos, num_ignored, iou


def reference_mutual_guidance(
    anchors: List[Box],
    scores: List[List[List[float]]],
    pred_boxes: List[List[Box]],
    gt_boxes: List[List[Box]],
    gt_classes: List[List[int]],
    l2c: bool = True,
    c2l: bool = True,
    sigma: float = 2.0,
    pos_iou: float = 0.5,
    neg_iou: float = 0.4,
) -> RefResult:
    """Mutual Guidance on anchor boxes. scores[n][r][c], pred_boxes[n][r], gt_boxes[n][j]."""
    out = RefResult([], [], [], [], [])
    for n in range(len(gt_boxes)):
        boxes, classes = gt_boxes[n], gt_classes[n]
        num_anchors, num_objects = len(anchors), len(boxes)
        owner, ignore, num_pos, num_ignored, _ = reference_static(anchors, boxes, pos_iou, neg_iou)
        cls_owner, reg_owner = list(owner), list(owner)
        if l2c:
            pos_claims: List[List[Tuple[float, int]]] = [[] for _ in range(num_anchors)]
            ignore_claim = [False] * num_anchors
            for j in range(num_objects):
                # Localize to Classify: IoU between the regressed box and the object.
                iou_reg = [f32(box_iou(pred_boxes[n][r], boxes[j])) for r in range(num_anchors)]
                for r in top_list(iou_reg, 0, num_pos[j]):
                    pos_claims[r].append((iou_reg[r], j))
                for r in top_list(iou_reg, num_pos[j], num_ignored[j]):
                    ignore_claim[r] = True
            cls_owner = [pick_owner(c) for c in pos_claims]
            ignore = [ignore_claim[r] and cls_owner[r] == -1 for r in range(num_anchors)]
        if c2l:
            reg_claims: List[List[Tuple[float, int]]] = [[] for _ in range(num_anchors)]
            for j in range(num_objects):
                # Classify to Localize: IoU_anchor amplified by the score of the object's class.
                amp = [
                    f32(amplify(box_iou(anchors[r], boxes[j]), scores[n][r][classes[j]], sigma))
                    for r in range(num_anchors)
                ]
                for r in top_list(amp, 0, num_pos[j]):
                    reg_claims[r].append((amp[r], j))
            reg_owner = [pick_owner(c) for c in reg_claims]
        out.cls_owner.append(cls_owner)
        out.ignore.append(ignore)
        out.reg_owner.append(reg_owner)
        out.num_pos.append(num_pos)
        out.num_ignored.append(num_ignored)
    return out


# ---------------------------------------------------------------------------------------------
# Anchor points (supplement): FCOS rule for N_p, then the same two components.
# ---------------------------------------------------------------------------------------------


def reference_fcos(
    points: List[Tuple[float, float]],
    strides: List[float],
    boxes: List[Box],
    radius: float,
    size_factors: Tuple[float, float] = (4.0, 8.0),
) -> List[int]:
    """FCOS rule of one image (float32 arithmetic): object per point, else -1."""
    F = np.float32
    min_stride, max_stride = min(strides), max(strides)
    owner = []
    for (x, y), s in zip(points, strides):
        x, y, s = F(x), F(y), F(s)
        best_j, best_area = -1, F(np.inf)
        for j, box in enumerate(boxes):
            x0, y0, x1, y1 = (F(v) for v in box)
            dist = [x - x0, y - y0, x1 - x, y1 - y]
            if not min(dist) > 0:
                continue
            lower = F(0) if s == min_stride else F(s * F(size_factors[0]))
            upper = F(np.inf) if s == max_stride else F(s * F(size_factors[1]))
            if not (lower < max(dist) < upper):
                continue
            if radius > 0:
                cx, cy = (x0 + x1) / F(2), (y0 + y1) / F(2)
                if not max(abs(x - cx), abs(y - cy)) < F(F(radius) * s):
                    continue
            area = (x1 - x0) * (y1 - y0)
            if area < best_area:
                best_j, best_area = j, area
        owner.append(best_j)
    return owner


def point_centerness(x: float, y: float, box: Box) -> float:
    """FCOS centerness in float64 of a point strictly inside the box (float32 test), else 0."""
    F = np.float32
    if not (F(x) > F(box[0]) and F(y) > F(box[1]) and F(box[2]) > F(x) and F(box[3]) > F(y)):
        return 0.0
    left, top = float(F(x)) - float(F(box[0])), float(F(y)) - float(F(box[1]))
    right, bottom = float(F(box[2])) - float(F(x)), float(F(box[3])) - float(F(y))
    return math.sqrt((min(left, right) / max(left, right)) * (min(top, bottom) / max(top, bottom)))


def reference_anchor_free(
    points: List[Tuple[float, float]],
    strides: List[float],
    scores: List[List[List[float]]],
    pred_boxes: List[List[Box]],
    gt_boxes: List[List[Box]],
    gt_classes: List[List[int]],
    l2c: bool = True,
    c2l: bool = True,
    sigma: float = 2.0,
    radius: float = 1.5,
) -> RefResult:
    """Mutual Guidance on anchor points (supplement Sec. 2); N_i is 0, nothing is ignored."""
    out = RefResult([], [], [], [], [])
    for n in range(len(gt_boxes)):
        boxes, classes = gt_boxes[n], gt_classes[n]
        num_points, num_objects = len(points), len(boxes)
        owner = reference_fcos(points, strides, boxes, radius)
        num_pos = [sum(1 for r in range(num_points) if owner[r] == j) for j in range(num_objects)]
        cls_owner, reg_owner = list(owner), list(owner)
        ctr = [
            [point_centerness(*points[r], boxes[j]) for r in range(num_points)]
            for j in range(num_objects)
        ]
        if l2c:
            claims: List[List[Tuple[float, int]]] = [[] for _ in range(num_points)]
            for j in range(num_objects):
                iou_reg = [
                    f32(box_iou(pred_boxes[n][r], boxes[j])) if ctr[j][r] > 0 else 0.0
                    for r in range(num_points)
                ]
                for r in top_list(iou_reg, 0, num_pos[j]):
                    claims[r].append((iou_reg[r], j))
            cls_owner = [pick_owner(c) for c in claims]
        if c2l:
            claims = [[] for _ in range(num_points)]
            for j in range(num_objects):
                amp = [
                    f32(amplify(ctr[j][r], scores[n][r][classes[j]], sigma))
                    for r in range(num_points)
                ]
                for r in top_list(amp, 0, num_pos[j]):
                    claims[r].append((amp[r], j))
            reg_owner = [pick_owner(c) for c in claims]
        out.cls_owner.append(cls_owner)
        out.ignore.append([False] * num_points)
        out.reg_owner.append(reg_owner)
        out.num_pos.append(num_pos)
        out.num_ignored.append([0] * num_objects)
    return out


# ---------------------------------------------------------------------------------------------
# Balanced L1 (Libra R-CNN Eqs. 8-10), scalar.
# ---------------------------------------------------------------------------------------------


def reference_balanced_l1(x: float, alpha: float, gamma: float, beta: float) -> float:
    """beta * L_b(|x| / beta) with b from alpha * ln(b + 1) = gamma."""
    b = math.exp(gamma / alpha) - 1
    u = abs(x) / beta
    if u < 1:
        value = alpha / b * (b * u + 1) * math.log(b * u + 1) - alpha * u
    else:
        value = gamma * u + gamma / b - alpha
    return beta * value


def as_lists(result: RefResult) -> Dict[str, list]:
    return {
        "cls_owner": result.cls_owner,
        "ignore": result.ignore,
        "reg_owner": result.reg_owner,
        "num_pos": result.num_pos,
        "num_ignored": result.num_ignored,
    }


__all__ = [
    "RefResult",
    "as_lists",
    "box_iou",
    "f32",
    "point_centerness",
    "reference_anchor_free",
    "reference_balanced_l1",
    "reference_fcos",
    "reference_mutual_guidance",
    "reference_static",
    "top_list",
]
