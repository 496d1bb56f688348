"""Assigners around assigners: crowd-region ignoring and warm-up switching."""

from __future__ import annotations

import pytest
import torch
from detectron2.utils.events import EventStorage

from musu.modeling.assigners import (
    AnchorList,
    Assignment,
    FCOSAssigner,
    IgnoreCrowdRegions,
    MuSuAssigner,
    WarmupSwitch,
)

POINTS = torch.tensor([[2.0, 2.0], [6.0, 6.0], [12.0, 12.0], [30.0, 30.0]])  # R = 4


def fixed(gt_index, ignore=None):
    """An assigner that returns ``gt_index`` (N, R) with unit weights on its positives."""

    def assign(grid, scores, pred_boxes, gt_boxes, gt_classes) -> Assignment:
        index = torch.tensor(gt_index)
        weight = (index >= 0).float()
        return Assignment(index, weight, weight, ignore=ignore)

    return assign


def call(assigner, num_images: int = 2):
    scores = torch.zeros(num_images, len(POINTS), 1)
    boxes = torch.zeros(num_images, len(POINTS), 4)
    empty = [torch.zeros(0, 4)] * num_images
    return assigner(AnchorList(POINTS), scores, boxes, empty, [torch.zeros(0).long()] * num_images)


def test_crowd_regions_ignore_only_unassigned_anchors_inside_them() -> None:
    inner = fixed([[0, -1, -1, -1], [-1, -1, -1, -1]])
    crowd = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros(0, 4)]
    result = call(IgnoreCrowdRegions(inner, crowd))
    assert result.gt_index.tolist() == [[0, -1, -1, -1], [-1] * 4]  # untouched
    assert result.ignore.tolist() == [[False, True, False, False], [False] * 4]


def test_crowd_regions_keep_the_inner_ignore_mask() -> None:
    inner_ignore = torch.tensor([[False, False, False, True], [True, False, False, False]])
    inner = fixed([[-1] * 4, [-1] * 4], ignore=inner_ignore)
    crowd = [torch.tensor([[10.0, 10.0, 14.0, 14.0]]), torch.zeros(0, 4)]
    result = call(IgnoreCrowdRegions(inner, crowd))
    assert result.ignore.tolist() == [[False, False, True, True], [True, False, False, False]]


def test_crowd_boxes_must_match_the_images() -> None:
    with pytest.raises(ValueError, match="1 crowd box tensors for 2 images"):
        call(IgnoreCrowdRegions(fixed([[-1] * 4] * 2), [torch.zeros(0, 4)]))


def test_warmup_switch_follows_the_event_storage_iteration() -> None:
    warmup, main = fixed([[0, 0, 0, 0]] * 2), fixed([[-1] * 4] * 2)
    switch = WarmupSwitch(warmup, main, iters=2)
    with EventStorage(start_iter=0) as storage:
        for iteration, expected in ((0, warmup), (1, warmup), (2, main), (5, main)):
            storage.iter = iteration
            assert switch.current() is expected
        storage.iter = 1
        assert call(switch).gt_index.tolist() == [[0] * 4] * 2
    assert switch.current() is main  # outside a trainer
    assert call(switch).gt_index.tolist() == [[-1] * 4] * 2


def test_warmup_switch_validates_and_prints() -> None:
    with pytest.raises(ValueError, match="iters"):
        WarmupSwitch(FCOSAssigner(), MuSuAssigner(), -1)
    assert "FCOSAssigner" in repr(WarmupSwitch(FCOSAssigner(), MuSuAssigner(), 3))
