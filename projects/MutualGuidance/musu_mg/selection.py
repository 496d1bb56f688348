"""Vectorized building blocks shared by both Mutual Guidance assigners.

Shapes: N images, M objects (padded to M_max), R anchors, P candidate (image, object, anchor)
pairs. Only pairs that can have a positive criterion are materialized (boxes that intersect,
points inside a box): one boolean (N, M_max, R) test finds them, everything after it is O(P).
Ordering rule everywhere: larger criterion first, ties by the lower anchor index (inside one
object's ranking) or by the lower object index (between objects); a criterion <= 0 never makes a
candidate.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from musu.modeling.assigners import rank_within_groups

__all__ = [
    "count_per_object",
    "intersecting_pairs",
    "rank_within_objects",
    "ranked_claims",
    "resolve_claims",
    "top_ranked_owners",
    "select_ranks",
]

_LOW_BITS = 32


def intersecting_pairs(boxes: Tensor, objects: Tensor, valid: Tensor) -> Tuple[Tensor, ...]:
    """(image, object, anchor) triples whose boxes overlap with a positive area.

    Exactly the pairs with IoU > 0 (no arithmetic: min(x2) > max(x1) and min(y2) > max(y1)).
    Args:
        boxes: (N or 1, R, 4) anchor / predicted boxes; objects: (N, M, 4); valid: (N, M) bool.
    Returns:
        image, object, anchor: (P,) long each, in (image, object, anchor) order.
    """
    b = boxes[:, None]  # (N or 1, 1, R, 4)
    o = objects[:, :, None]  # (N, M, 1, 4)
    hit = torch.minimum(b[..., 2], o[..., 2]) > torch.maximum(b[..., 0], o[..., 0])  # (N, M, R)
    hit &= torch.minimum(b[..., 3], o[..., 3]) > torch.maximum(b[..., 1], o[..., 1])
    hit &= valid[..., None]
    return hit.nonzero(as_tuple=True)


def rank_within_objects(group: Tensor, anchor: Tensor, value: Tensor) -> Tensor:
    """Rank (0-based) of each candidate inside its (image, object) group: descending value, ties
    by ascending anchor index.

    Args:
        group: (P,) long group id; anchor: (P,) long anchor index (unique inside a group);
        value: (P,) float32 criterion >= 0.
    Returns:
        (P,) long rank.
    """
    if group.numel() == 0:
        return group.clone()
    value = torch.where(value > 0, value, 0.0).float().contiguous()  # NaN, -0.0 -> 0
    # Non-negative float32 bits order like the values; the low bits reverse the anchor index, so
    # within a group the key is unique and "larger key" means "earlier in the ranking".
    key = value.view(torch.int32).to(torch.int64) * 2**_LOW_BITS + (2**_LOW_BITS - 1 - anchor)
    return rank_within_groups(group, key)


def select_ranks(rank: Tensor, value: Tensor, first: Tensor, count: Tensor) -> Tensor:
    """(P,) bool: candidates of rank in [first, first + count) with value > 0 (first, count per
    candidate, i.e. already gathered from the candidate's object)."""
    return (rank >= first) & (rank < first + count) & (value > 0)


def ranked_claims(
    image: Tensor,
    obj: Tensor,
    anchor: Tensor,
    value: Tensor,
    first: Tensor,
    count: Tensor,
    shape: Tuple[int, int, int],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The candidate pairs of rank [first, first + count) of their object (first, count: (N, M)),
    as (image, object, anchor, value) tensors."""
    max_objects = shape[1]
    group = image * max_objects + obj
    rank = rank_within_objects(group, anchor, value)
    keep = select_ranks(rank, value, first.reshape(-1)[group], count.reshape(-1)[group])
    return image[keep], obj[keep], anchor[keep], value[keep]


def resolve_claims(
    image: Tensor, obj: Tensor, anchor: Tensor, value: Tensor, num_images: int, num_anchors: int
) -> Tensor:
    """Owner of each anchor among the objects claiming it: the largest claim value, ties by the
    lowest object index; -1 for unclaimed anchors.

    Args:
        image, obj, anchor: (K,) long; value: (K,) float32 claim values.
    Returns:
        (N, R) long object index or -1.
    """
    device = value.device
    flat = image * num_anchors + anchor  # (K,)
    size = num_images * num_anchors
    best = torch.full((size,), -float("inf"), dtype=value.dtype, device=device)
    best.scatter_reduce_(0, flat, value, reduce="amax")
    is_best = value == best[flat]
    sentinel = torch.iinfo(torch.long).max
    owner = torch.full((size,), sentinel, dtype=torch.long, device=device)
    owner.scatter_reduce_(0, flat[is_best], obj[is_best], reduce="amin")
    owner = torch.where(owner == sentinel, -1, owner)
    return owner.view(num_images, num_anchors)


def count_per_object(owner: Tensor, max_objects: int) -> Tensor:
    """(N, M_max) long number of anchors per object from an (N, R) owner map (-1: none)."""
    num_images = owner.shape[0]
    counts = torch.zeros(num_images, max_objects + 1, dtype=torch.long, device=owner.device)
    index = torch.where(owner >= 0, owner, max_objects)
    counts.scatter_add_(1, index, torch.ones_like(index))
    return counts[:, :max_objects]


def top_ranked_owners(
    image: Tensor,
    obj: Tensor,
    anchor: Tensor,
    value: Tensor,
    count: Tensor,
    shape: Tuple[int, int, int],
) -> Tensor:
    """(N, R) owner (object index or -1) when each object claims its ``count`` (N, M) best-ranked
    candidates by ``value`` and conflicts go to the larger claim (:func:`resolve_claims`)."""
    num_images, _, num_anchors = shape
    first = torch.zeros_like(count)
    claims = ranked_claims(image, obj, anchor, value, first, count, shape)
    return resolve_claims(*claims, num_images, num_anchors)
