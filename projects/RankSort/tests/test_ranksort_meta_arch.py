"""Tests of ``MuSuRankSort``: merged logits, the loss wiring (positives, IoU labels, score
weights, self-balance) against independent hand computations, and training steps of every
shipped config. Models are the synthetic R-18 configs on CPU at 64 px.
Notation: N images, R anchors, C classes, M objects.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import List

import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from fvcore.nn import giou_loss
from test_ranksort_loss import reference_rank_sort

import musu
import musu_ranksort
from musu.modeling import Assignment, FCOSAssigner, MuSu, MuSuAssigner, merged_logits
from musu_ranksort import MuSuRankSort, add_ranksort_config

PROJECT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((PROJECT / "configs").rglob("*.yaml"))
SYNTHETIC = PROJECT / "configs" / "Synthetic"


def project_cfg(path: Path, opts: List = ()) -> CfgNode:
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    add_ranksort_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list(list(opts))
    return cfg


def test_merged_logits_is_the_logit_of_the_product() -> None:
    values = torch.linspace(-6, 6, 13, dtype=torch.float64)
    cls_logits = values[None, None, :].expand(1, 13, 13)  # (N, R, C): class c has values[c]
    obj_logits = values[None, :]  # (N, R): anchor r has values[r]
    p = torch.sigmoid(values)[:, None] * torch.sigmoid(values)[None, :]  # (R, C)
    out = merged_logits(cls_logits, obj_logits)
    torch.testing.assert_close(out[0], torch.log(p) - torch.log1p(-p))
    extreme = torch.tensor([[[50.0, -50.0]]], requires_grad=True)
    value = merged_logits(extreme, torch.tensor([[50.0]]))
    value.sum().backward()
    assert bool(torch.isfinite(value).all()) and bool(torch.isfinite(extreme.grad).all())
    assert value[0, 0, 1].item() == pytest.approx(-50.0, abs=1e-4)  # p ~ sigmoid(-50)


def hand_assignment() -> Assignment:
    """N = 2, R = 4: image 0 anchors 0, 2 -> object 0 (weights 1, 0.5), anchor 3 ignored;
    image 1 anchor 1 -> object 1 (regression weight 0.25)."""
    gt_index = torch.tensor([[0, -1, 0, -1], [-1, 1, -1, -1]])
    cls_weight = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0]])
    reg_weight = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 0.25, 0.0, 0.0]])
    ignore = torch.tensor([[False, False, False, True], [False] * 4])
    return Assignment(gt_index, cls_weight, reg_weight, ignore=ignore)


@pytest.mark.parametrize("self_balance", [True, False])
@pytest.mark.parametrize("cls_label", ["iou", "iou_x_weight"])
def test_losses_against_hand_computation(self_balance: bool, cls_label: str) -> None:
    cfg = project_cfg(
        SYNTHETIC / "musu_rs_R_18_FPN_synthetic.yaml",
        [
            "MODEL.RANKSORT.SELF_BALANCE",
            self_balance,
            "MODEL.RANKSORT.CLS_LABEL",
            cls_label,
            "MODEL.MUSU.REG_LOSS_WEIGHT",
            2.0,
        ],
    )
    model = build_model(cfg)
    assert isinstance(model, MuSuRankSort)
    gen = torch.Generator().manual_seed(1)
    cls_logits = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    obj_logits = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    pred_boxes = torch.tensor(
        [
            [[0, 0, 10, 10], [5, 5, 9, 9], [2, 1, 12, 8], [0, 0, 1, 1]],
            [[0, 0, 1, 1], [20, 20, 30, 34], [0, 0, 2, 2], [1, 1, 3, 3]],
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    gt_boxes = [
        torch.tensor([[1.0, 1.0, 11.0, 9.0]], dtype=torch.float64),
        torch.tensor([[0.0, 0.0, 4.0, 4.0], [22.0, 21.0, 31.0, 33.0]], dtype=torch.float64),
    ]
    gt_classes = [torch.tensor([2]), torch.tensor([0, 4])]
    losses = model.losses(
        cls_logits, obj_logits, pred_boxes, gt_boxes, gt_classes, hand_assignment()
    )

    # Classification: 3 positives (0,0,c2) (0,2,c2) (1,1,c4); anchor (0,3) is out entirely.
    p = torch.sigmoid(cls_logits) * torch.sigmoid(obj_logits)[..., None]
    logit = (torch.log(p) - torch.log1p(-p)).detach()

    def iou(a: torch.Tensor, b: torch.Tensor) -> float:  # float64 (Boxes would cast to float32)
        ax0, ay0, ax1, ay1 = a.tolist()
        bx0, by0, bx1, by1 = b.tolist()
        inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
        return inter / ((ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter)

    weight = {(0, 0): 1.0, (0, 2): 0.5, (1, 1): 1.0}
    targets = {
        (0, 0): (gt_boxes[0][0], 2),
        (0, 2): (gt_boxes[0][0], 2),
        (1, 1): (gt_boxes[1][1], 4),
    }
    values, labels, positive = [], [], []
    for n in range(2):
        for r in range(4):
            if (n, r) == (0, 3):
                continue
            for c in range(5):
                values.append(float(logit[n, r, c]))
                is_pos = (n, r) in targets and targets[(n, r)][1] == c
                label = iou(pred_boxes[n, r].detach(), targets[(n, r)][0]) if is_pos else 0.0
                if is_pos and cls_label == "iou_x_weight":
                    label *= weight[(n, r)]
                labels.append(label)
                positive.append(is_pos)
    expected_cls, _ = reference_rank_sort(values, labels, positive, 0.5)
    assert losses["loss_rs_cls"].item() == pytest.approx(expected_cls, rel=1e-9)

    # Box: reg samples (0,0) w 1, (0,2) w 0.5, (1,1) w 0.25, each times its detached score.
    rows = [
        (0, 0, gt_boxes[0][0], 1.0, 2),
        (0, 2, gt_boxes[0][0], 0.5, 2),
        (1, 1, gt_boxes[1][1], 0.25, 4),
    ]
    w = torch.stack([rw * p[n, r, c].detach() for n, r, _, rw, c in rows])
    g = torch.stack([giou_loss(pred_boxes[n, r], b, reduction="none") for n, r, b, _, _ in rows])
    box = (w * g).sum() / w.sum()
    scale = expected_cls / box.item() if self_balance else 2.0
    assert losses["loss_rs_box"].item() == pytest.approx(scale * box.item(), rel=1e-9)
    if self_balance:
        assert losses["loss_rs_box"].item() == pytest.approx(losses["loss_rs_cls"].item(), rel=1e-9)
    # The box loss reaches the boxes only; its gradient is scale x that of the weighted GIoU.
    (grad_expected,) = torch.autograd.grad(scale * box, pred_boxes)
    (grad_box,) = torch.autograd.grad(losses["loss_rs_box"], pred_boxes, retain_graph=True)
    torch.testing.assert_close(grad_box, grad_expected)
    assert torch.autograd.grad(losses["loss_rs_box"], cls_logits, allow_unused=True)[0] is None


@pytest.mark.parametrize(
    "name, assigner",
    [("musu_rs", MuSuAssigner), ("fcos_rs", FCOSAssigner), ("fcos_focal", FCOSAssigner)],
)
def test_training_step_of_each_synthetic_config(name: str, assigner: type) -> None:
    cfg = project_cfg(SYNTHETIC / f"{name}_R_18_FPN_synthetic.yaml")
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.assigner, assigner)
    assert isinstance(model, MuSuRankSort) == name.endswith("_rs")
    model.train()
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 60.0, 60.0]])
    inputs = [
        {
            "image": torch.rand(3, 64, 64, generator=gen) * 255,
            "instances": Instances(
                (64, 64), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([1, 3])
            ),
        }
        for _ in range(2)
    ]
    with EventStorage():
        losses = model(inputs)
    total = sum(losses.values())
    assert bool(torch.isfinite(total)) and total.item() > 0
    total.backward()
    for module in (model.head.cls_score, model.head.objectness, model.head.bbox_pred):
        assert module.weight.grad is not None and bool(module.weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(PROJECT)))
def test_every_project_config_loads_and_builds(path: Path) -> None:
    cfg = project_cfg(path, ["MODEL.RESNETS.DEPTH", 18])
    musu.validate_musu_config(cfg)
    musu_ranksort.validate_ranksort_config(cfg)
    model = build_model(cfg)
    expected = MuSuRankSort if "_rs_" in path.name else MuSu
    assert type(model) is expected


def test_config_keys_each_have_a_comment_and_are_validated() -> None:
    source = (PROJECT / "musu_ranksort" / "config.py").read_text().splitlines()
    keys = [i for i, line in enumerate(source) if re.match(r"\s*cfg\.MODEL\.RANKSORT\.\w+ =", line)]
    assert len(keys) == 4
    for i in keys:
        assert source[i - 1].strip().startswith("#")
    cfg = project_cfg(SYNTHETIC / "musu_rs_R_18_FPN_synthetic.yaml", ["MODEL.RANKSORT.DELTA", 0.0])
    with pytest.raises(ValueError, match="DELTA"):
        build_model(cfg)
    cfg = project_cfg(
        SYNTHETIC / "musu_rs_R_18_FPN_synthetic.yaml", ["MODEL.RANKSORT.CLS_LABEL", "x"]
    )
    with pytest.raises(ValueError, match="CLS_LABEL"):
        build_model(cfg)


def test_root_train_net_setup_adds_the_ranksort_keys(tmp_path: Path) -> None:
    """The installed project is found through its ``musu.projects`` entry point."""
    spec = importlib.util.spec_from_file_location(
        "root_train_net", PROJECT.parents[1] / "train_net.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = SYNTHETIC / "fcos_rs_R_18_FPN_synthetic.yaml"
    argv = ["--config-file", str(config), "MODEL.RANKSORT.DELTA", "0.25"]
    argv += ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path)]
    cfg = script.setup(script.build_parser().parse_args(argv))
    assert cfg.is_frozen()
    assert cfg.MODEL.META_ARCHITECTURE == "MuSuRankSort"
    assert cfg.MODEL.MUSU.ASSIGNER == "build_fcos_assigner"
    assert cfg.MODEL.RANKSORT.DELTA == 0.25 and cfg.MODEL.RANKSORT.SELF_BALANCE is True
    bad = argv[:2] + ["MODEL.RANKSORT.CLS_LABEL", "nope"] + argv[4:]
    with pytest.raises(ValueError, match="CLS_LABEL"):
        script.setup(script.build_parser().parse_args(bad))
