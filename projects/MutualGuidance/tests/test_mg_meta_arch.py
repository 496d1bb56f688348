"""``MGRetinaNet`` and the project config: build from the shipped configs, training steps (finite
losses and gradients, all switch combinations, both box losses), the loss wiring against a hand
computation, inference format, the anchor-free assigner inside MuSu, config validation.
Models are the synthetic R-18 configs on CPU at 64 px. Notation: N images, R anchors, C classes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, List

import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import musu
from musu.modeling import Assignment, MuSu
from musu_mg import (
    MGAnchorFreeAssigner,
    MGRetinaNet,
    MutualGuidanceAssigner,
    add_mg_config,
    validate_mg_config,
)

from reference_mg import reference_balanced_l1

PROJECT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((PROJECT / "configs").rglob("*.yaml"))
SYNTHETIC_MG = PROJECT / "configs" / "Synthetic" / "retinanet_mg_R_18_FPN_synthetic.yaml"
SYNTHETIC_AF = PROJECT / "configs" / "Synthetic" / "musu_mg_af_R_18_FPN_synthetic.yaml"
SIZE = 64


def project_cfg(path: Path, opts: List[Any] = ()) -> CfgNode:
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    add_mg_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list(list(opts))
    return cfg


def batch(num_images: int = 2, seed: int = 0, empty_last: bool = False) -> List[dict]:
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for n in range(num_images):
        image = torch.rand(3, SIZE, SIZE, generator=gen) * 255
        count = 0 if (empty_last and n == num_images - 1) else 3
        corner = torch.rand(count, 2, generator=gen) * 30
        boxes = torch.cat([corner, corner + 8 + torch.rand(count, 2, generator=gen) * 24], 1)
        instances = Instances((SIZE, SIZE))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, 5, (count,), generator=gen)
        inputs.append({"image": image, "instances": instances, "height": SIZE, "width": SIZE})
    return inputs


def build(cfg: CfgNode) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(cfg)


def train_step(model: torch.nn.Module, inputs: List[dict]) -> dict:
    model.train()
    with EventStorage(0) as storage:
        losses = model(inputs)
        sum(losses.values()).backward()
        scalars = {k: v[0] for k, v in storage.latest().items()}
    return {"losses": losses, "scalars": scalars}


@pytest.mark.parametrize(
    "path", CONFIGS, ids=[p.relative_to(PROJECT / "configs").as_posix() for p in CONFIGS]
)
def test_every_config_builds(path: Path) -> None:
    cfg = project_cfg(path)
    validate_mg_config(cfg)
    musu.validate_musu_config(cfg)
    cfg.MODEL.FPN.OUT_CHANNELS = 64  # speed only
    model = build(cfg)
    if cfg.MODEL.META_ARCHITECTURE == "MGRetinaNet":
        assert isinstance(model, MGRetinaNet)
        assert isinstance(model.assigner, MutualGuidanceAssigner)
        assert (model.assigner.l2c, model.assigner.c2l) == (cfg.MODEL.MG.L2C, cfg.MODEL.MG.C2L)
        assert model.assigner.sigma == 2.0
        assert model.anchor_generator.num_cell_anchors == [9] * 5
        assert model.num_classes == cfg.MODEL.MUSU.NUM_CLASSES
        head = model.head
        convs = [m for m in head.cls_subnet if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == cfg.MODEL.RETINANET.NUM_CONVS
        assert all(c.out_channels == cfg.MODEL.FPN.OUT_CHANNELS for c in convs)
        norms = [m for m in head.cls_subnet if isinstance(m, torch.nn.GroupNorm)]
        assert len(norms) == len(convs)
        assert model.box_loss == "balanced_l1"
    else:
        assert isinstance(model, MuSu) and isinstance(model.assigner, MGAnchorFreeAssigner)
        assert (model.assigner.l2c, model.assigner.c2l) == (cfg.MODEL.MG.L2C, cfg.MODEL.MG.C2L)


def test_table1_rows_differ_only_in_the_switches() -> None:
    for dataset in ("BCCD", "Synthetic"):
        folder = PROJECT / "configs" / dataset
        rows = {}
        for name in ("static", "l2c", "c2l", "mg"):
            (path,) = folder.glob(f"retinanet_{name}_*.yaml")
            cfg = project_cfg(path)
            rows[name] = cfg
        flags = {k: (v.MODEL.MG.L2C, v.MODEL.MG.C2L) for k, v in rows.items()}
        assert flags == {
            "static": (False, False),
            "l2c": (True, False),
            "c2l": (False, True),
            "mg": (True, True),
        }
        reference = rows["mg"].clone()
        for cfg in rows.values():
            cfg = cfg.clone()
            cfg.MODEL.MG.L2C, cfg.MODEL.MG.C2L, cfg.OUTPUT_DIR = True, True, reference.OUTPUT_DIR
            assert cfg == reference
        assert len({cfg.OUTPUT_DIR for cfg in rows.values()}) == 4


@pytest.mark.parametrize(
    "l2c,c2l,box_loss",
    [(False, False, "balanced_l1"), (True, False, "balanced_l1"), (False, True, "giou"),
     (True, True, "balanced_l1"), (True, True, "giou")],
)  # fmt: skip
def test_training_step(l2c: bool, c2l: bool, box_loss: str) -> None:
    cfg = project_cfg(SYNTHETIC_MG, ["MODEL.MG.L2C", l2c, "MODEL.MG.C2L", c2l,
                                     "MODEL.MG.BOX_LOSS", box_loss])  # fmt: skip
    model = build(cfg)
    out = train_step(model, batch(empty_last=True))
    losses = out["losses"]
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(bool(torch.isfinite(v)) and v.item() > 0 for v in losses.values())
    for param in (model.head.cls_score.weight, model.head.bbox_pred.weight):
        assert param.grad is not None and bool(torch.isfinite(param.grad).all())
        assert param.grad.abs().sum() > 0
    scalars = out["scalars"]
    assert scalars["mg/num_static_pos"] > 0
    assert scalars["mg/num_cls_pos"] <= scalars["mg/num_static_pos"]
    assert scalars["mg/num_reg_pos"] <= scalars["mg/num_static_pos"]
    if not (l2c or c2l):
        assert scalars["mg/num_cls_pos"] == scalars["mg/num_static_pos"]


def test_no_objects_in_the_batch() -> None:
    model = build(project_cfg(SYNTHETIC_MG))
    inputs = batch(num_images=1, empty_last=True)
    losses = train_step(model, inputs)["losses"]
    assert losses["loss_box_reg"].item() == 0.0 and bool(torch.isfinite(losses["loss_cls"]))


def test_inference_format() -> None:
    cfg = project_cfg(SYNTHETIC_MG, ["MODEL.RETINANET.SCORE_THRESH_TEST", 0.0])
    model = build(cfg)
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": x["image"], "height": 32, "width": 48} for x in batch()])
    assert len(outputs) == 2
    for output in outputs:
        instances = output["instances"]
        assert instances.image_size == (32, 48)  # rescaled to the requested size
        assert {"pred_boxes", "scores", "pred_classes"} <= set(instances.get_fields())
        assert 0 < len(instances) <= cfg.TEST.DETECTIONS_PER_IMAGE
        assert bool(((instances.scores >= 0) & (instances.scores <= 1)).all())
        assert bool(((instances.pred_classes >= 0) & (instances.pred_classes < 5)).all())


def focal(logit: float, target: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    if target == 1:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def test_losses_match_hand_computation() -> None:
    """R = 4 anchors, C = 2 classes, one image with two objects; anchor 0 is a classification
    positive of object 1, anchor 1 ignored, anchor 2 a regression positive of object 0 only."""
    cfg = project_cfg(SYNTHETIC_MG, ["MODEL.RETINANET.NUM_CLASSES", 2, "MODEL.MUSU.NUM_CLASSES", 2])
    model = build(cfg)
    anchors = torch.tensor([[0, 0, 10, 10], [5, 5, 15, 15], [0, 0, 20, 20], [30, 30, 40, 40.0]])
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0], [-3.0, 1.0], [0.0, -0.5]]])
    deltas = torch.tensor([[[0.0] * 4, [0.1] * 4, [0.05, -0.02, 0.3, -0.4], [0.0] * 4]])
    gt_boxes = [torch.tensor([[1.0, 2.0, 19.0, 21.0], [0.0, 0.0, 9.0, 11.0]])]
    gt_classes = [torch.tensor([0, 1])]
    assignment = Assignment(
        gt_index=torch.tensor([[1, -1, -1, -1]]),
        cls_weight=torch.tensor([[1.0, 0, 0, 0]]),
        reg_weight=torch.tensor([[0.0, 0, 1, 0]]),
        ignore=torch.tensor([[False, True, False, False]]),
        reg_gt_index=torch.tensor([[-1, -1, 0, -1]]),
        stats={"bag_size": torch.tensor([[2, 1]]), "num_ignored": torch.tensor([[1, 0]])},
    )
    losses = model.mg_losses(anchors, logits, deltas, gt_boxes, gt_classes, assignment)
    normalizer = 0.9 * 100 + 0.1 * 3  # Detectron2's EMA, first update, 3 static positives
    expected_cls = sum(
        focal(logits[0, r, c].item(), 1.0 if (r, c) == (0, 1) else 0.0)
        for r in (0, 2, 3)
        for c in range(2)
    )
    assert losses["loss_cls"].item() == pytest.approx(expected_cls / normalizer, rel=1e-5)
    # Box: deltas of anchor 2 ([0, 0, 20, 20], centre 10, size 20) towards object 0.
    x0, y0, x1, y1 = gt_boxes[0][0].tolist()
    target = [((x0 + x1) / 2 - 10) / 20, ((y0 + y1) / 2 - 10) / 20,
              math.log((x1 - x0) / 20), math.log((y1 - y0) / 20)]  # fmt: skip
    pred = deltas[0, 2].tolist()
    expected_box = sum(reference_balanced_l1(p - t, 0.5, 1.5, 0.11) for p, t in zip(pred, target))
    assert losses["loss_box_reg"].item() == pytest.approx(expected_box / normalizer, rel=1e-5)


def test_assigner_sees_decoded_boxes_and_class_probabilities() -> None:
    model = build(project_cfg(SYNTHETIC_MG))
    seen = {}

    def spy(grid, scores, pred_boxes, gt_boxes, gt_classes):
        seen.update(anchors=grid.boxes(), scores=scores, pred_boxes=pred_boxes)
        return MutualGuidanceAssigner()(grid, scores, pred_boxes, gt_boxes, gt_classes)

    model.assigner = spy
    # Zero conv weights: the logits are the prior bias, every anchor predicts dx = 0.1 (and
    # dy = dw = dh = 0), i.e. its own box shifted right by a tenth of its width.
    with torch.no_grad():
        for layer in (model.head.cls_score, model.head.bbox_pred):
            layer.weight.zero_()
        model.head.bbox_pred.bias.copy_(torch.tensor([0.1, 0.0, 0.0, 0.0]).repeat(9))
    train_step(model, batch())
    anchors = seen["anchors"]
    assert seen["scores"].shape == (2, anchors.shape[0], 5)
    assert not seen["scores"].requires_grad and not seen["pred_boxes"].requires_grad
    torch.testing.assert_close(seen["scores"], torch.full_like(seen["scores"], 0.01))
    shift = 0.1 * (anchors[:, 2] - anchors[:, 0])
    expected = anchors + torch.stack([shift, torch.zeros_like(shift)] * 2, dim=1)
    torch.testing.assert_close(seen["pred_boxes"][1], expected, atol=1e-4, rtol=1e-5)


def test_anchor_free_assigner_trains_in_musu() -> None:
    cfg = project_cfg(SYNTHETIC_AF)
    cfg.MODEL.MUSU.NUM_CONVS = 1
    model = build(cfg)
    assert isinstance(model, MuSu) and isinstance(model.assigner, MGAnchorFreeAssigner)
    out = train_step(model, batch(empty_last=True))
    assert all(bool(torch.isfinite(v)) and v.item() > 0 for v in out["losses"].values())
    assert out["scalars"]["musu/bag_size"] > 0


# --------------------------------------------------------------------------------------------
# Config: defaults, comments, validation.
# --------------------------------------------------------------------------------------------


def test_defaults_and_only_mg_added() -> None:
    plain = get_cfg()
    musu.add_musu_config(plain)
    cfg = plain.clone()
    add_mg_config(cfg)
    mg = cfg.MODEL.MG
    assert (mg.L2C, mg.C2L, mg.SIGMA, mg.POS_IOU, mg.NEG_IOU) == (True, True, 2.0, 0.5, 0.4)
    assert mg.BOX_LOSS == "balanced_l1"
    assert (mg.BALANCED_L1_ALPHA, mg.BALANCED_L1_GAMMA, mg.BALANCED_L1_BETA) == (0.5, 1.5, 0.11)
    del cfg.MODEL["MG"]
    assert cfg == plain
    validate_mg_config(project_cfg(SYNTHETIC_MG))


def test_every_mg_key_has_a_comment_line_above() -> None:
    lines = (PROJECT / "musu_mg" / "config.py").read_text().splitlines()
    pattern = re.compile(r"^\s*cfg\.MODEL\.MG\.([A-Z0-9_]+)\s*=")
    keys = {}
    for index, line in enumerate(lines):
        match = pattern.match(line)
        if match:
            keys[match.group(1)] = index
    cfg = get_cfg()
    add_mg_config(cfg)
    assert set(keys) == set(cfg.MODEL.MG.keys())
    assert all(lines[i - 1].strip().startswith("#") for i in keys.values())


INVALID = [
    ("SIGMA", 1.0),
    ("SIGMA", float("nan")),
    ("POS_IOU", 0.0),
    ("POS_IOU", 1.5),
    ("NEG_IOU", 0.6),
    ("NEG_IOU", 0.0),
    ("BOX_LOSS", "smooth_l1"),
    ("BALANCED_L1_ALPHA", 0.0),
    ("BALANCED_L1_GAMMA", -1.0),
    ("BALANCED_L1_BETA", 0.0),
    ("BOX_LOSS_WEIGHT", -1.0),
]


@pytest.mark.parametrize("key,value", INVALID, ids=[f"{k}={v}" for k, v in INVALID])
def test_invalid_value_rejected(key: str, value: Any) -> None:
    cfg = project_cfg(SYNTHETIC_MG)
    cfg.MODEL.MG[key] = value
    with pytest.raises(ValueError, match=re.escape(f"MODEL.MG.{key}")):
        validate_mg_config(cfg)
    with pytest.raises(ValueError, match=re.escape(f"MODEL.MG.{key}")):
        build_model(cfg)


def test_non_bool_switch_rejected() -> None:
    cfg = project_cfg(SYNTHETIC_MG)
    cfg.MODEL.MG.L2C = 1
    with pytest.raises(ValueError, match="MODEL.MG.L2C"):
        validate_mg_config(cfg)


def test_class_count_mismatch_rejected() -> None:
    cfg = project_cfg(SYNTHETIC_MG, ["MODEL.RETINANET.NUM_CLASSES", 3])
    with pytest.raises(ValueError, match="MODEL.RETINANET.NUM_CLASSES"):
        validate_mg_config(cfg)
    # Other META_ARCHs keep Detectron2's RETINANET default (80): no complaint.
    cfg.MODEL.META_ARCHITECTURE = "MuSu"
    validate_mg_config(cfg)


def test_entry_point_exposes_the_hooks() -> None:
    from importlib.metadata import entry_points

    (found,) = [
        e
        for e in entry_points(group=musu.config.PROJECTS_ENTRY_POINT)
        if e.name == "mutualguidance"
    ]
    module = found.load()
    assert module.add_config is add_mg_config and module.validate_config is validate_mg_config
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    assert "musu_mg" in musu.add_project_configs(cfg)
    assert "MG" in cfg.MODEL
