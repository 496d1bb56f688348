"""The assigner protocol: every registered assigner, called on a tiny batch, returns an
``Assignment`` of the right shapes; and the shared input checks.

Notation: N images, M objects, R anchors, C classes.
"""

from __future__ import annotations

import pytest
import torch
from detectron2.config import get_cfg

import musu
from musu.modeling.assigners import (
    ASSIGNER_REGISTRY,
    AnchorGrid,
    AnchorList,
    Anchors,
    Assignment,
    build_assigner,
    check_assigner_inputs,
    pad_ground_truth,
)

try:  # the Mutual Guidance project registers an anchor-free assigner (and adds MODEL.MG)
    import musu_mg
except ImportError:  # not installed: its assigner is not registered either
    musu_mg = None

NUM_CLASSES = 3


def _cfg():
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    if musu_mg is not None:
        musu_mg.add_config(cfg)
    return cfg


def tiny_batch():
    """N = 2 on a 2-level grid (R = 16 + 4): image 0 has two objects, image 1 none."""
    grid = AnchorGrid(((4, 4), (2, 2)), (8.0, 16.0), 1)
    points = grid.points()
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(2, grid.num_slots, NUM_CLASSES, generator=generator)
    pred_boxes = torch.cat([points - 6.0, points + 6.0], dim=1).expand(2, -1, -1)
    gt_boxes = [torch.tensor([[2.0, 2.0, 20.0, 22.0], [10.0, 4.0, 30.0, 30.0]]), torch.zeros(0, 4)]
    gt_classes = [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)]
    return grid, scores, pred_boxes, gt_boxes, gt_classes


@pytest.mark.parametrize("name", sorted(name for name, _ in ASSIGNER_REGISTRY))
def test_every_registered_assigner_follows_the_protocol(name: str) -> None:
    cfg = _cfg()
    cfg.MODEL.MUSU.ASSIGNER = name
    assigner = build_assigner(cfg)
    grid, scores, pred_boxes, gt_boxes, gt_classes = tiny_batch()
    assert isinstance(grid, Anchors)
    result = assigner(grid, scores, pred_boxes, gt_boxes, gt_classes)
    assert isinstance(result, Assignment)
    num_images, num_anchors = scores.shape[:2]
    assert result.gt_index.shape == (num_images, num_anchors)
    assert result.gt_index.dtype == torch.long
    assert result.cls_weight.shape == result.reg_weight.shape == (num_images, num_anchors)
    for weight in (result.cls_weight, result.reg_weight):
        assert weight.is_floating_point() and bool(((weight >= 0) & (weight <= 1)).all())
    assert bool((result.cls_weight[result.gt_index < 0] == 0).all())
    reg_target = result.gt_index if result.reg_gt_index is None else result.reg_gt_index
    assert reg_target.shape == (num_images, num_anchors)
    assert bool((result.reg_weight[reg_target < 0] == 0).all())
    assert bool((result.gt_index[0] < 2).all()) and bool((result.gt_index[1] == -1).all())
    if result.ignore is not None:
        assert (
            result.ignore.shape == (num_images, num_anchors) and result.ignore.dtype == torch.bool
        )
    for key, value in result.stats.items():
        assert value.shape == (num_images, 2), key
    assert int((result.gt_index >= 0).sum()) > 0  # the tiny batch has positives for everyone


def test_check_assigner_inputs_names_the_problem() -> None:
    grid, scores, pred_boxes, gt_boxes, gt_classes = tiny_batch()
    check_assigner_inputs(grid, scores, pred_boxes, gt_boxes, gt_classes, "X")
    with pytest.raises(ValueError, match=r"X: scores must have shape \(N, R=20, C\)"):
        check_assigner_inputs(grid, scores[:, :5], pred_boxes, gt_boxes, gt_classes, "X")
    with pytest.raises(ValueError, match="X: pred_boxes"):
        check_assigner_inputs(grid, scores, pred_boxes[:1], gt_boxes, gt_classes, "X")
    with pytest.raises(ValueError, match="one tensor per image"):
        check_assigner_inputs(grid, scores, pred_boxes, gt_boxes[:1], gt_classes, "X")
    with pytest.raises(ValueError, match="image 0: gt_boxes must be"):
        check_assigner_inputs(grid, scores, pred_boxes, gt_boxes, [torch.tensor([0])] * 2, "X")
    bad = [torch.tensor([0, 3]), torch.zeros(0, dtype=torch.long)]
    with pytest.raises(ValueError, match=r"image 0: gt_classes must lie in \[0, 3\)"):
        check_assigner_inputs(grid, scores, pred_boxes, gt_boxes, bad, "X")
    with pytest.raises(ValueError, match="scores"):
        check_assigner_inputs(
            AnchorList(torch.zeros(3, 2)), scores, pred_boxes, gt_boxes, gt_classes, "X"
        )


def test_pad_ground_truth() -> None:
    boxes, classes, valid = pad_ground_truth(
        [torch.ones(2, 4), torch.zeros(0, 4)],
        [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.long)],
        torch.float64,
        torch.device("cpu"),
    )
    assert boxes.shape == (2, 2, 4) and boxes.dtype == torch.float64
    assert classes.tolist() == [[1, 2], [0, 0]] and valid.tolist() == [[True, True], [False, False]]


def test_reg_target_index_falls_back_to_gt_index() -> None:
    gt_index = torch.tensor([[0, -1, 1]])
    weights = torch.zeros(1, 3)
    shared = Assignment(gt_index, weights, weights)
    assert torch.equal(shared.reg_target_index, torch.tensor([[0, -1, 1]]))
    separate = Assignment(gt_index, weights, weights, reg_gt_index=torch.tensor([[1, 0, -1]]))
    assert torch.equal(separate.reg_target_index, torch.tensor([[1, 0, -1]]))
