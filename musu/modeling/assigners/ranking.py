"""Grouped ranking shared by assigners that rank candidates per object."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rank_within_groups"]


def rank_within_groups(group: Tensor, value: Tensor) -> Tensor:
    """Rank (0-based) of each element inside its group, by descending value.

    Ties keep the input order: callers pass elements sorted by anchor index within a group (or
    a value that is unique inside a group).
    Args:
        group: (K,) long group id per element.
        value: (K,) value per element (any dtype ``torch.sort`` orders).
    Returns:
        (K,) long rank.
    """
    order = torch.sort(value, descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]  # by group, then value desc
    sorted_group = group[order]
    position = torch.arange(len(order), device=group.device)
    is_start = torch.ones_like(sorted_group, dtype=torch.bool)
    is_start[1:] = sorted_group[1:] != sorted_group[:-1]
    group_start = torch.cummax(torch.where(is_start, position, 0), dim=0).values
    rank = torch.empty_like(position)
    rank[order] = position - group_start
    return rank
