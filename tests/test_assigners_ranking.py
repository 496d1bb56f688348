"""Grouped ranking shared by the MuSu and Mutual Guidance assigners."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from musu.modeling.assigners import rank_within_groups


def test_ranks_descend_within_each_group_and_ties_keep_input_order() -> None:
    group = torch.tensor([1, 0, 1, 1, 0, 2])
    value = torch.tensor([0.5, 0.1, 0.9, 0.5, 0.3, 0.0])
    assert rank_within_groups(group, value).tolist() == [1, 1, 0, 2, 0, 0]


def test_empty_input() -> None:
    empty = torch.zeros(0, dtype=torch.long)
    assert rank_within_groups(empty, torch.zeros(0)).tolist() == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), max_size=30))
def test_matches_a_sort_per_group(pairs) -> None:
    group = torch.tensor([g for g, _ in pairs], dtype=torch.long)
    value = torch.tensor([v for _, v in pairs], dtype=torch.float32)
    rank = rank_within_groups(group, value).tolist()
    for k, (g, v) in enumerate(pairs):
        # Elements of the group ahead of k: larger values, or equal values earlier in the input.
        ahead = sum(1 for j, (h, w) in enumerate(pairs) if h == g and (w > v or (w == v and j < k)))
        assert rank[k] == ahead
