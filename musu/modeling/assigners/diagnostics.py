"""What an assignment looks like, as logging scalars: who gets supervised, where, and how much.

:func:`assignment_diagnostics` summarizes one :class:`~.base.Assignment` of any assigner. The
detector logs it for its own assigner (``musu/*``) and, with ``MODEL.MUSU.SHADOW_ASSIGNER``, for a
second assigner run on the same predictions without training on it (``musu_shadow/*``), so that
MuSu's bags and the FCOS rule's positives can be compared on one network as it trains.

Shapes: N images, M_max objects (padded), R anchors.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import Tensor

from .base import Anchors, Assignment, pad_ground_truth
from .geometry import matched_box_iou

__all__ = ["assignment_diagnostics"]

QUANTILES = (0.1, 0.5, 0.9)


def _first_argmax_per_group(key: Tensor, value: Tensor, num_groups: int) -> Tensor:
    """(num_groups,) index into ``key`` / ``value`` of each group's largest value (ties: the
    lowest index); -1 for empty groups."""
    best = torch.full((num_groups,), float("-inf"), dtype=value.dtype, device=value.device)
    best.scatter_reduce_(0, key, value, reduce="amax")
    is_best = value == best[key]
    index = torch.arange(len(key), device=key.device)
    first = torch.full((num_groups,), len(key), dtype=torch.long, device=key.device)
    first.scatter_reduce_(0, key[is_best], index[is_best], reduce="amin")
    return torch.where(first < len(key), first, -1)


@torch.no_grad()
def assignment_diagnostics(
    assignment: Assignment,
    grid: Anchors,
    pred_boxes: Tensor,
    gt_boxes: Sequence[Tensor],
) -> Dict[str, float]:
    """Scalars describing ``assignment`` (made on ``grid`` for ``gt_boxes``; ``pred_boxes``
    (N, R, 4) are the predictions it was made from), over the objects with at least one member
    (an anchor whose ``gt_index`` is the object):

    * ``objects``: how many objects have members;
    * ``members_mean`` and ``members_p10`` / ``_p50`` / ``_p90``: members per object (MuSu: the
      candidate bag |C_j|; the FCOS rule: its positives);
    * ``cls_weight_per_object`` / ``reg_weight_per_object``: summed weights per object;
    * ``level_share_s<stride>``: the share of all members on each FPN level (stride), summing to
      1, and ``level_cls_weight_share_s<stride>``: the same for the summed cls weight;
    * ``cls_top_is_best_iou`` / ``reg_top_is_best_iou``: the share of objects whose member of
      largest cls (reg) weight is the member whose predicted box has the highest IoU with the
      object (ties: lowest anchor index). Only for assignments whose weights vary inside an
      object (not for equal-weight rules such as FCOS, where "largest" would be arbitrary);
    * the mean over those objects of every per-object ``assignment.stats`` entry (MuSu:
      ``bag_size``, equal to ``members_mean``, and ``tau_cls``).

    Empty dict when no object has a member.
    """
    gt_index = assignment.gt_index  # (N, R)
    num_images, num_anchors = gt_index.shape
    image, anchor = (gt_index >= 0).nonzero(as_tuple=True)  # (K,) each
    if len(image) == 0:
        return {}
    max_objects = max((len(b) for b in gt_boxes), default=0)
    key = image * max_objects + gt_index[image, anchor]  # (K,) one id per (image, object)
    num_groups = num_images * max_objects
    counts = torch.bincount(key, minlength=num_groups)  # (N * M_max,)
    has_members = counts > 0
    members = counts[has_members].double()
    num_objects = int(has_members.sum())
    cls_weight = assignment.cls_weight[image, anchor].double()  # (K,)
    reg_weight = assignment.reg_weight[image, anchor].double()
    out: Dict[str, float] = {"objects": float(num_objects), "members_mean": float(members.mean())}
    for q, value in zip(QUANTILES, torch.quantile(members, torch.tensor(QUANTILES).double())):
        out[f"members_p{round(q * 100)}"] = float(value)
    out["cls_weight_per_object"] = float(cls_weight.sum()) / num_objects
    out["reg_weight_per_object"] = float(reg_weight.sum()) / num_objects

    all_strides = grid.point_strides(gt_index.device)  # (R,)
    strides = all_strides[anchor]  # (K,)
    total_cls = float(cls_weight.sum())
    for stride in torch.unique(all_strides).tolist():
        on_level = strides == stride
        name = f"s{int(stride)}" if float(stride).is_integer() else f"s{stride:g}"
        out[f"level_share_{name}"] = float(on_level.sum()) / len(anchor)
        level_cls = float(cls_weight[on_level].sum())
        out[f"level_cls_weight_share_{name}"] = level_cls / total_cls if total_cls > 0 else 0.0

    varies = torch.zeros(num_groups, dtype=torch.bool, device=key.device)
    for weight in (cls_weight, reg_weight):
        low = torch.full((num_groups,), float("inf"), dtype=weight.dtype, device=key.device)
        high = torch.full_like(low, float("-inf"))
        low.scatter_reduce_(0, key, weight, reduce="amin")
        high.scatter_reduce_(0, key, weight, reduce="amax")
        varies |= has_members & (high > low)
    if bool(varies.any()):
        boxes, _, _ = pad_ground_truth(gt_boxes, [b.new_zeros(len(b)).long() for b in gt_boxes],
                                       torch.float64, pred_boxes.device)  # fmt: skip
        iou = matched_box_iou(
            pred_boxes[image, anchor].double(), boxes.reshape(-1, 4).index_select(0, key)
        )  # (K,)
        best_iou = _first_argmax_per_group(key, iou, num_groups)
        for name, weight in (("cls", cls_weight), ("reg", reg_weight)):
            top = _first_argmax_per_group(key, weight, num_groups)
            out[f"{name}_top_is_best_iou"] = float((top == best_iou)[has_members].double().mean())
    for name, value in assignment.stats.items():
        if value.shape == (num_images, max_objects):
            out[name] = float(value.reshape(-1)[has_members].double().mean())
    return out
