"""The MuSu candidate-bag / ranking assigner (paper Procedure 1, Eqs. 1-6), vectorized.

Procedure 1 is five step functions, run in this order by :meth:`MuSuAssigner.__call__` (and
listed in :data:`STEPS`):

1. :func:`inside_pairs`: (image, object, anchor) with the anchor point strictly inside the box;
2. :func:`best_object_per_anchor`: A_j, each anchor keeps the containing object of highest IoU;
3. :func:`candidate_bags`: joint likelihood P = p * IoU**theta (Eq. 1), candidate bags C_j (Eq. 2);
4. :func:`rank_in_bags`: criteria (Eq. 3) and ranks inside each bag;
5. :func:`bag_weights`: temperatures (Eq. 6) and rank-to-weight (Eq. 4).

Shapes: N images, M objects (padded to M_max), R anchor slots, C classes, P inside pairs, K
members of a step's output. Everything is computed under ``torch.no_grad`` from detached inputs,
batched over images, with no Python loop over images, objects, anchors or bags. IoU, q, P and v
are computed in float64 and rounded to float32; all comparisons act on the float32 values and
ties go to the lower object / anchor index.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...config import CRITERIA
from .base import Anchors, Assignment, check_assigner_inputs, pad_ground_truth
from .geometry import matched_box_iou
from .ranking import rank_within_groups

__all__ = [
    "MuSuAssigner",
    "STEPS",
    "Members",
    "bag_weights",
    "best_object_per_anchor",
    "candidate_bags",
    "inside_pairs",
    "rank_in_bags",
]


class Members(NamedTuple):
    """(K,) long tensors of (image, object, anchor) triples and their (image, object) key."""

    image: Tensor
    obj: Tensor
    anchor: Tensor
    key: Tensor  # image * M_max + obj

    def select(self, index: Tensor) -> "Members":
        return Members(*(t.index_select(0, index) for t in self))


def inside_pairs(grid: Anchors, boxes: Tensor) -> Members:
    """Step 1: the (image, object, anchor) triples whose point lies strictly inside the box,
    compared in float32 like the points; boxes (N, M_max, 4), padded all-zero boxes hold none."""
    image, obj, anchor = grid.inside_pairs(boxes.float())  # (P,) each
    return Members(image, obj, anchor, image * boxes.shape[1] + obj)


def best_object_per_anchor(
    pairs: Members, pred_boxes: Tensor, boxes: Tensor
) -> Tuple[Members, Tensor]:
    """Step 2: A_j, each anchor keeps the containing object of highest IoU(pred, object) (ties:
    lowest object index). pred_boxes (N, R, 4); boxes (N, M_max, 4) float64.
    Returns the kept members in (image, object, anchor) order and their (K,) float64 IoU."""
    num_images, num_anchors = pred_boxes.shape[:2]
    anchor_key = pairs.image * num_anchors + pairs.anchor  # (P,) one id per (image, anchor)
    pair_pred = pred_boxes.reshape(-1, 4).index_select(0, anchor_key).to(torch.float64)
    pair_gt = boxes.reshape(-1, 4).index_select(0, pairs.key)
    iou64 = matched_box_iou(pair_pred, pair_gt)  # (P,) float64, feeds q
    iou = iou64.to(torch.float32)  # (P,) rounded, compared across objects
    flat_size = num_images * num_anchors
    best_iou = torch.full((flat_size,), -1.0, device=iou.device)
    best_iou.scatter_reduce_(0, anchor_key, iou, reduce="amax")
    is_best = iou == best_iou[anchor_key]
    first_obj = torch.full((flat_size,), boxes.shape[1], dtype=torch.long, device=iou.device)
    first_obj.scatter_reduce_(0, anchor_key[is_best], pairs.obj[is_best], reduce="amin")
    keep = (is_best & (pairs.obj == first_obj[anchor_key])).nonzero().squeeze(1)
    return pairs.select(keep), iou64.index_select(0, keep)


def candidate_bags(
    members: Members,
    iou64: Tensor,
    scores: Tensor,
    classes: Tensor,
    theta: float,
    bag_threshold: float,
) -> Tuple[Members, Tensor, Tensor]:
    """Step 3: P = p * IoU**theta (Eq. 1) and C_j = {P > bag_threshold * max P of the object}
    (Eq. 2; every member when max P is 0). scores (N, R, C); classes (N, M_max).
    Returns the bag members and their float64 p and q = IoU**theta."""
    p64 = scores[members.image, members.anchor, classes[members.image, members.obj]].double()
    q64 = iou64.pow(theta)
    joint = (p64 * q64).to(torch.float32)  # (K,)
    max_joint = torch.zeros(classes.numel(), device=joint.device)
    max_joint.scatter_reduce_(0, members.key, joint, reduce="amax")
    bag_max = max_joint[members.key].to(torch.float64)
    in_bag = (joint.to(torch.float64) > bag_threshold * bag_max) | (bag_max == 0)
    keep = in_bag.nonzero().squeeze(1)
    return members.select(keep), p64.index_select(0, keep), q64.index_select(0, keep)


def rank_in_bags(
    key: Tensor, p64: Tensor, q64: Tensor, criterion: str, alpha: float
) -> Tuple[Tensor, Tensor]:
    """Step 4: criteria (Eq. 3) v_cls = q * p**alpha, v_reg = p * q**alpha ("mutual"; "cls": p,
    "iou": q for both) and float32 ranks inside each bag (descending, ties: lower anchor)."""
    if criterion == "mutual":
        v_cls = (q64 * p64.pow(alpha)).to(torch.float32)
        v_reg = (p64 * q64.pow(alpha)).to(torch.float32)
    else:
        v_cls = v_reg = (p64 if criterion == "cls" else q64).to(torch.float32)
    rank_cls = rank_within_groups(key, v_cls).to(torch.float32)
    rank_reg = rank_cls if v_reg is v_cls else rank_within_groups(key, v_reg)
    return rank_cls, rank_reg.to(torch.float32)


def bag_weights(
    key: Tensor,
    rank_cls: Tensor,
    rank_reg: Tensor,
    num_groups: int,
    temperature: Optional[float],
    tau_ratio: float,
    soft: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step 5: tau_cls = sqrt(|C_j|) or ``temperature`` (Eq. 6), tau_reg = tau_cls / tau_ratio,
    weights exp(-rank / tau) (soft) or rank < tau (hard) (Eq. 4).
    Returns per member w_cls, w_reg (K,), per object |C_j| (long) and tau_cls, (num_groups,)."""
    counts = torch.bincount(key, minlength=num_groups)  # (N * M_max,)
    if temperature is None:
        tau_per_object = counts.to(torch.float32).sqrt()
    else:
        tau_per_object = torch.where(counts > 0, temperature, 0.0).to(torch.float32)
    tau_c = tau_per_object[key]  # (K,)
    tau_r = tau_c / tau_ratio
    if soft:
        w_cls, w_reg = torch.exp(-rank_cls / tau_c), torch.exp(-rank_reg / tau_r)
    else:
        w_cls, w_reg = (rank_cls < tau_c).float(), (rank_reg < tau_r).float()
    return w_cls, w_reg, counts, tau_per_object


STEPS = (inside_pairs, best_object_per_anchor, candidate_bags, rank_in_bags, bag_weights)


def _check_range(name: str, value: float, low: float, high: float, closed: bool) -> None:
    ok = low <= value <= high if closed else low < value < high
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        interval = f"[{low}, {high}]" if closed else f"({low}, {high})"
        raise ValueError(f"MuSuAssigner: {name} must lie in {interval}, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"MuSuAssigner: {name} must be a finite number > 0, got {value!r}")


class MuSuAssigner:
    """Mutual Supervision assignment: cls samples ranked by IoU, reg samples by score.

    Guarantees (paper Procedure 1): each anchor belongs to at most one candidate bag; every
    non-empty bag has one member of rank 0 (weight 1 in soft mode); anchors outside every bag get
    gt_index -1 and zero weights. ``stats``: ``bag_size`` (N, M_max) long |C_j| and ``tau_cls``
    (N, M_max) float32 (0 for padding and empty bags).
    """

    def __init__(
        self,
        theta: float = 4.0,
        bag_threshold: float = 0.1,
        alpha: float = 1 / 3,
        tau_ratio: float = 2.0,
        temperature: Optional[float] = None,
        soft: bool = True,
        criterion: str = "mutual",
    ) -> None:
        """
        Args:
            theta: exponent of IoU in the joint likelihood P = p * IoU**theta (Eq. 1).
            bag_threshold: an anchor joins object j's candidate bag C_j when its P exceeds
                ``bag_threshold`` times the largest P for j (Eq. 2); in (0, 1).
            alpha: exponent of the other head's quality in the ranking criteria (Eq. 3):
                v_cls = IoU**theta * p**alpha, v_reg = p * (IoU**theta)**alpha; in [0, 1].
            tau_ratio: tau_reg = tau_cls / tau_ratio (Eq. 6).
            temperature: a fixed tau_cls; None: sqrt(|C_j|) per object (Eq. 6).
            soft: weights exp(-rank / tau) (Eq. 4); False: 1 for rank < tau, else 0.
            criterion: "mutual" (Eq. 3), or "cls" / "iou" to rank both heads' samples by p /
                IoU**theta alone (the paper's Table 1 ablation).

        Raises ``ValueError`` naming the argument when a value is outside its range.
        """
        _check_positive("theta", theta)
        _check_range("bag_threshold", bag_threshold, 0.0, 1.0, closed=False)
        _check_range("alpha", alpha, 0.0, 1.0, closed=True)
        _check_positive("tau_ratio", tau_ratio)
        if temperature is not None:
            _check_positive("temperature", temperature)
        if criterion not in CRITERIA:
            raise ValueError(
                f"MuSuAssigner: criterion must be one of {CRITERIA}, got {criterion!r}"
            )
        self.theta = float(theta)
        self.bag_threshold = float(bag_threshold)
        self.alpha = float(alpha)
        self.tau_ratio = float(tau_ratio)
        self.temperature = None if temperature is None else float(temperature)
        self.soft = bool(soft)
        self.criterion = criterion

    def __repr__(self) -> str:
        return (
            f"MuSuAssigner(theta={self.theta}, bag_threshold={self.bag_threshold}, "
            f"alpha={self.alpha}, tau_ratio={self.tau_ratio}, temperature={self.temperature}, "
            f"soft={self.soft}, criterion={self.criterion!r})"
        )

    @torch.no_grad()
    def __call__(
        self,
        grid: Anchors,
        scores: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_classes: Sequence[Tensor],
    ) -> Assignment:
        """Assign anchors to objects and weight them for each head (the assigner protocol of
        ``base.py``; scores are probabilities in [0, 1])."""
        check_assigner_inputs(grid, scores, pred_boxes, gt_boxes, gt_classes, "MuSuAssigner")
        device = scores.device
        num_images, num_anchors, _ = scores.shape
        boxes, classes, _ = pad_ground_truth(gt_boxes, gt_classes, torch.float64, device)
        max_objects = boxes.shape[1]
        gt_index = torch.full((num_images, num_anchors), -1, dtype=torch.long, device=device)
        cls_weight = torch.zeros(num_images, num_anchors, dtype=torch.float32, device=device)
        reg_weight = torch.zeros_like(cls_weight)
        bag_size = torch.zeros(num_images, max_objects, dtype=torch.long, device=device)
        tau_cls = torch.zeros(num_images, max_objects, dtype=torch.float32, device=device)
        stats = {"bag_size": bag_size, "tau_cls": tau_cls}
        result = Assignment(gt_index, cls_weight, reg_weight, stats=stats)
        if max_objects == 0 or num_anchors == 0:
            return result
        pairs = inside_pairs(grid, boxes)
        if len(pairs.image) == 0:
            return result
        members, iou64 = best_object_per_anchor(pairs, pred_boxes, boxes)
        del pairs
        members, p64, q64 = candidate_bags(
            members, iou64, scores, classes, self.theta, self.bag_threshold
        )
        rank_cls, rank_reg = rank_in_bags(members.key, p64, q64, self.criterion, self.alpha)
        w_cls, w_reg, counts, tau_per_object = bag_weights(
            members.key,
            rank_cls,
            rank_reg,
            num_images * max_objects,
            self.temperature,
            self.tau_ratio,
            self.soft,
        )
        gt_index[members.image, members.anchor] = members.obj
        cls_weight[members.image, members.anchor] = w_cls
        reg_weight[members.image, members.anchor] = w_reg
        bag_size.view(-1).copy_(counts)
        tau_cls.view(-1).copy_(tau_per_object)
        return result
