"""The extension seams other methods plug into: assigner registry, ignore mask, reg targets."""

from __future__ import annotations

import pytest
import torch
from detectron2.config import get_cfg

import musu
from musu.modeling.assigners import ASSIGNER_REGISTRY, AnchorList, Assignment, build_assigner
from musu.modeling.losses import musu_classification_loss
from musu.modeling.meta_arch import MuSu


def _cfg(**musu_keys):
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    for key, value in musu_keys.items():
        cfg.MODEL.MUSU[key] = value
    return cfg


def test_unknown_assigner_names_the_key() -> None:
    with pytest.raises(ValueError, match="MODEL.MUSU.ASSIGNER 'nope'"):
        build_assigner(_cfg(ASSIGNER="nope"))


def test_registered_assigner_is_built_from_config() -> None:
    calls = []

    @ASSIGNER_REGISTRY.register()
    def build_everything_to_object_zero_assigner(cfg):
        def assign(grid, scores, pred_boxes, gt_boxes, gt_classes):
            calls.append(scores.shape)
            n, r, _ = scores.shape
            index = torch.zeros(n, r, dtype=torch.long)
            ones = torch.ones(n, r)
            return Assignment(index, ones, ones, stats={"bag_size": torch.ones(n, 1).long()})

        return assign

    assigner = build_assigner(_cfg(ASSIGNER="build_everything_to_object_zero_assigner"))
    result = assigner(AnchorList(torch.zeros(3, 2)), torch.zeros(2, 3, 4), None, None, None)
    assert calls == [torch.Size([2, 3, 4])] and result.gt_index.shape == (2, 3)


def test_ignored_anchors_contribute_nothing_to_the_classification_loss() -> None:
    torch.manual_seed(0)
    cls_logits, obj_logits = torch.randn(2, 6, 3), torch.randn(2, 6)
    target = torch.tensor([[0, -1, 2, 1, -1, 0], [-1, -1, 1, 2, 0, -1]])
    weight = torch.rand(2, 6) * (target >= 0)
    ignore = torch.tensor([[True, False, False, True, True, False], [False] * 5 + [True]])
    with_ignore = musu_classification_loss(cls_logits, obj_logits, target, weight, ignore=ignore)
    keep = ~ignore
    only_kept = musu_classification_loss(
        cls_logits[keep][None], obj_logits[keep][None], target[keep][None], weight[keep][None]
    )
    torch.testing.assert_close(with_ignore, only_kept)
    assert with_ignore < musu_classification_loss(cls_logits, obj_logits, target, weight)


def test_regression_targets_follow_reg_gt_index() -> None:
    """With reg_gt_index set, the GIoU loss regresses to that object, not to gt_index's."""
    gt_boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])]
    gt_classes = [torch.tensor([0, 1])]
    pred_boxes = torch.tensor([[[20.0, 20.0, 30.0, 30.0]]])  # (N=1, R=1, 4): equals object 1
    zeros = torch.zeros(1, 1)
    base = dict(
        gt_index=torch.zeros(1, 1, dtype=torch.long),
        cls_weight=torch.ones(1, 1),
        reg_weight=torch.ones(1, 1),
        stats={"bag_size": torch.tensor([[1, 0]]), "tau_cls": torch.tensor([[1.0, 0.0]])},
    )
    model = MuSu.__new__(MuSu)  # only the loss method and its settings are exercised
    torch.nn.Module.__init__(model)
    model.focal_loss_alpha, model.focal_loss_gamma, model.beta, model.reg_loss_weight = (
        0.25, 2.0, 4.0, 1.0,
    )  # fmt: skip
    model.cls_loss_normalizer = "weights"
    logits = (torch.zeros(1, 1, 2), zeros)
    to_object_zero = model.losses(*logits, pred_boxes, gt_boxes, gt_classes, Assignment(**base))
    reg_to_one = Assignment(**base, reg_gt_index=torch.ones(1, 1, dtype=torch.long))
    to_object_one = model.losses(*logits, pred_boxes, gt_boxes, gt_classes, reg_to_one)
    assert float(to_object_zero["loss_musu_reg"]) > 1.0  # disjoint boxes: 1 - GIoU > 1
    assert float(to_object_one["loss_musu_reg"]) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(to_object_zero["loss_musu_cls"], to_object_one["loss_musu_cls"])
