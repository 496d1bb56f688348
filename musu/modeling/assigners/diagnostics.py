"""What an assignment looks like, as logging scalars: who gets supervised, where, and how much.

:func:`assignment_diagnostics` summarizes one :class:`~.base.Assignment` of any assigner. The
detector logs it for its own assigner (``musu/*``) and, with ``MODEL.MUSU.SHADOW_ASSIGNER``, for a
second assigner run on the same predictions without training on it (``musu_shadow/*``), so that
MuSu's bags and the FCOS rule's positives can be compared on one network as it trains.

Objects are also summarized per COCO size band (:data:`SIZE_BANDS`, measured on the box at the
model's input resolution), to show where MuSu's bags and the FCOS rule's positives differ for
small, medium and large objects.

Shapes: N images, M_max objects (padded), R anchors, K members, B size bands.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor

from ...size_bands import SIZE_BANDS, box_size_bands
from .base import Anchors, Assignment, pad_ground_truth
from .geometry import matched_box_iou

__all__ = ["CENTRE_RADIUS", "assignment_diagnostics"]

QUANTILES = (0.1, 0.5, 0.9)

# In strides: the FCOS rule's centre-sampling radius, used by ``reg_top_centre_<band>``.
CENTRE_RADIUS = 1.5


def _members(index: Tensor, max_objects: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(image, anchor, key) of the K anchors with ``index`` (N, R) >= 0, each (K,); ``key`` =
    image * max_objects + object, one id per (image, object)."""
    image, anchor = (index >= 0).nonzero(as_tuple=True)
    return image, anchor, image * max_objects + index[image, anchor]


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

    Per size band (:data:`SIZE_BANDS`: ``small`` / ``medium`` / ``large`` by sqrt(w * h) of the
    object's box), only for bands with objects that have members:

    * ``objects_<band>``: how many;
    * ``members_mean_<band>``: members per object;
    * ``cls_weight_per_object_<band>`` / ``reg_weight_per_object_<band>``: summed weights per
      object; the reg weight is summed over the anchors that regress to the object
      (``assignment.reg_target_index``);
    * ``members_share_s<stride>_<band>``: the share of the band's members on each level, summing
      to 1 over the levels (not named ``level_share_*``: readers that select the whole-batch
      shares by the prefix ``level_share_s`` keep selecting only those);
    * ``member_iou_<band>``: the mean over the band's members of the IoU of the member's
      predicted box with its object (the FCOS rule: the mean IoU of its positives);
    * where reg weights vary inside an object (any object of the batch), for the anchor of
      largest reg weight of each object that has one (its rank-0 regression sample; ties: the
      lowest anchor index), averaged over the band's objects: ``reg_top_iou_<band>``, the IoU of
      its predicted box with the object; ``reg_top_centre_<band>``, the share of objects where
      its point lies less than :data:`CENTRE_RADIUS` strides (its own stride) from the box
      centre in both x and y (the FCOS rule's centre region, before clipping to the box);
      ``reg_top_offset_<band>``, max(|dx| / (w / 2), |dy| / (h / 2)) of its point from the box
      centre: 0 at the centre, 1 on the box edge.

    Empty dict when no object has a member.
    """
    gt_index = assignment.gt_index  # (N, R)
    num_images, num_anchors = gt_index.shape
    device = gt_index.device
    max_objects = max((len(b) for b in gt_boxes), default=0)
    image, anchor, key = _members(gt_index, max_objects)  # (K,) each
    if len(image) == 0:
        return {}
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

    all_strides = grid.point_strides(device)  # (R,)
    stride_values, level_of_anchor = torch.unique(all_strides, return_inverse=True)  # (L,), (R,)
    level_names = [
        f"s{int(s)}" if float(s).is_integer() else f"s{s:g}" for s in stride_values.tolist()
    ]
    level = level_of_anchor[anchor]  # (K,)
    total_cls = float(cls_weight.sum())
    for index, name in enumerate(level_names):
        on_level = level == index
        out[f"level_share_{name}"] = float(on_level.sum()) / len(anchor)
        level_cls = float(cls_weight[on_level].sum())
        out[f"level_cls_weight_share_{name}"] = level_cls / total_cls if total_cls > 0 else 0.0

    boxes, _, _ = pad_ground_truth(gt_boxes, [b.new_zeros(len(b)).long() for b in gt_boxes],
                                   torch.float64, device)  # fmt: skip
    boxes = boxes.reshape(-1, 4)  # (N * M_max, 4)
    iou = matched_box_iou(pred_boxes[image, anchor].double(), boxes[key])  # (K,)
    varies = torch.zeros(num_groups, dtype=torch.bool, device=device)
    for weight in (cls_weight, reg_weight):
        varies |= has_members & _varies_per_group(key, weight, num_groups)
    if bool(varies.any()):
        best_iou = _first_argmax_per_group(key, iou, num_groups)
        for name, weight in (("cls", cls_weight), ("reg", reg_weight)):
            top = _first_argmax_per_group(key, weight, num_groups)
            out[f"{name}_top_is_best_iou"] = float((top == best_iou)[has_members].double().mean())
    for name, value in assignment.stats.items():
        if value.shape == (num_images, max_objects):
            out[name] = float(value.reshape(-1)[has_members].double().mean())
    out.update(
        _size_band_diagnostics(
            assignment, grid, pred_boxes, boxes, has_members, key, level, cls_weight, iou,
            level_names,
        )
    )  # fmt: skip
    return out


def _varies_per_group(key: Tensor, weight: Tensor, num_groups: int) -> Tensor:
    """(num_groups,) bool: the group's ``weight`` values are not all equal."""
    low = torch.full((num_groups,), float("inf"), dtype=weight.dtype, device=key.device)
    high = torch.full_like(low, float("-inf"))
    low.scatter_reduce_(0, key, weight, reduce="amin")
    high.scatter_reduce_(0, key, weight, reduce="amax")
    return high > low


def _size_band_diagnostics(
    assignment: Assignment,
    grid: Anchors,
    pred_boxes: Tensor,
    boxes: Tensor,
    has_members: Tensor,
    key: Tensor,
    level: Tensor,
    cls_weight: Tensor,
    iou: Tensor,
    level_names: Sequence[str],
) -> Dict[str, float]:
    """The ``<statistic>_<band>`` entries of :func:`assignment_diagnostics`, from its
    intermediates: ``boxes`` (N * M_max, 4) float64, ``has_members`` (N * M_max,), and per
    member (K,) its ``key``, FPN ``level`` index, ``cls_weight`` and predicted-box ``iou``."""
    num_bands, num_levels = len(SIZE_BANDS), len(level_names)
    num_groups = len(boxes)
    max_objects = num_groups // pred_boxes.shape[0]
    device = boxes.device
    band = box_size_bands(boxes)  # (N * M_max,)
    member_band = band[key]  # (K,)
    objects = torch.bincount(band[has_members], minlength=num_bands).double()  # (B,)
    members = torch.bincount(member_band, minlength=num_bands).double()  # (B,)
    zeros = torch.zeros(num_bands, dtype=torch.float64, device=device)
    cls_sum = zeros.index_add(0, member_band, cls_weight)
    iou_sum = zeros.index_add(0, member_band, iou)
    per_level = torch.bincount(member_band * num_levels + level, minlength=num_bands * num_levels)
    per_level = per_level.reshape(num_bands, num_levels).double()  # (B, L)

    # The regression head's samples: anchors whose reg target is the object.
    r_image, r_anchor, r_key = _members(assignment.reg_target_index, max_objects)  # (K_r,) each
    reg_weight = assignment.reg_weight[r_image, r_anchor].double()  # (K_r,)
    reg_sum = zeros.index_add(0, band[r_key], reg_weight)
    # (B, S) per band: [objects, members_mean, cls, reg, member_iou, L level shares], then
    # where reg weights vary [objects with a reg sample, reg_top iou, centre, offset]; one
    # transfer to Python for all bands.
    per_object, per_member = objects.clamp(min=1), members.clamp(min=1)
    columns = [objects, members / per_object, cls_sum / per_object, reg_sum / per_object]
    columns += [iou_sum / per_member, *(per_level / per_member[:, None]).unbind(dim=1)]
    top_names = ("reg_top_iou", "reg_top_centre", "reg_top_offset")
    if bool(_varies_per_group(r_key, reg_weight, num_groups).any()):
        top = _first_argmax_per_group(r_key, reg_weight, num_groups)  # (N * M_max,)
        group = (top >= 0).nonzero(as_tuple=True)[0]  # (G,) objects with a reg sample
        top = top[group]
        top_image, top_anchor, box = r_image[top], r_anchor[top], boxes[group]  # (G,), (G, 4)
        top_iou = matched_box_iou(pred_boxes[top_image, top_anchor].double(), box)  # (G,)
        point = grid.points(device)[top_anchor].double()  # (G, 2)
        stride = grid.point_strides(device)[top_anchor].double()  # (G,)
        centre, half = (box[:, :2] + box[:, 2:]) / 2, (box[:, 2:] - box[:, :2]) / 2  # (G, 2)
        distance = (point - centre).abs()  # (G, 2)
        near = (distance < CENTRE_RADIUS * stride[:, None]).all(dim=1).double()  # (G,)
        offset = (distance / half.clamp(min=torch.finfo(half.dtype).tiny)).amax(dim=1)  # (G,)
        top_band = band[group]
        top_objects = torch.bincount(top_band, minlength=num_bands).double()  # (B,)
        columns.append(top_objects)
        for value in (top_iou, near, offset):
            columns.append(zeros.index_add(0, top_band, value) / top_objects.clamp(min=1))
    rows = torch.stack(columns, dim=1).tolist()  # B lists of S floats

    names = ["objects", "members_mean", "cls_weight_per_object", "reg_weight_per_object"]
    names += ["member_iou", *(f"members_share_{level}" for level in level_names)]
    out: Dict[str, float] = {}
    for (band_name, _, _), row in zip(SIZE_BANDS, rows):
        if row[0] == 0:
            continue
        out.update((f"{name}_{band_name}", value) for name, value in zip(names, row))
        if len(row) > len(names) and row[len(names)] > 0:
            top_values = row[len(names) + 1 :]
            out.update((f"{name}_{band_name}", v) for name, v in zip(top_names, top_values))
    return out
