"""The D2FCOS adaptor builds Detectron2's own FCOS from the shared MODEL.MUSU keys."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import musu
from musu.evaluation import PRE_NMS_OPTS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cfg(config: str = "Synthetic/fcos_R_18_FPN_1200it.yaml", *opts: str):
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    cfg.merge_from_file(str(CONFIGS / config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_builds_detectron2_fcos_from_musu_keys() -> None:
    cfg = _cfg(
        "Synthetic/fcos_R_18_FPN_1200it.yaml",
        "MODEL.MUSU.SCORE_THRESH_TEST", "0.1", "MODEL.MUSU.NMS_THRESH_TEST", "0.5",
        "MODEL.MUSU.FOCAL_LOSS_GAMMA", "1.5", "MODEL.MUSU.FCOS_CENTER_SAMPLING_RADIUS", "2.5",
    )  # fmt: skip
    model = build_model(cfg)
    # Detectron2's classes; the model's only override runs FCOS.losses in float32 (see below).
    assert isinstance(model, FCOS) and type(model.head) is FCOSHead
    assert [n for n, v in vars(type(model)).items() if callable(v)] == ["losses"]
    assert model.num_classes == 5 and model.head_in_features == ["p3", "p4", "p5", "p6", "p7"]
    assert (model.test_score_thresh, model.test_nms_thresh) == (0.1, 0.5)
    assert model.focal_loss_gamma == 1.5 and model.center_sampling_radius == 2.5
    convs = [m for m in model.head.cls_subnet if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.head.cls_subnet if isinstance(m, torch.nn.GroupNorm)]
    assert len(convs) == len(norms) == cfg.MODEL.MUSU.NUM_CONVS == 2
    assert convs[0].out_channels == cfg.MODEL.FPN.OUT_CHANNELS
    prior = torch.sigmoid(model.head.cls_score.bias)
    assert torch.allclose(prior, torch.full_like(prior, cfg.MODEL.MUSU.PRIOR_PROB))


def test_same_parameters_as_musu_a1_except_level_scales() -> None:
    """Paper App. II: MuSu (A = 1) has FCOS's parameters; ours adds one scale per FPN level."""
    fcos = build_model(_cfg())
    musu_cfg = _cfg("Synthetic/musu_paper_R_18_FPN_1200it.yaml")
    musu_model = build_model(musu_cfg)
    assert _params(musu_model) - _params(fcos) == len(musu_cfg.MODEL.MUSU.IN_FEATURES)


def test_default_radius_and_config_errors() -> None:
    model = build_model(_cfg())
    assert model.center_sampling_radius == 1.5  # Detectron2's FCOS default
    with pytest.raises(ValueError, match="NUM_ANCHORS"):
        build_model(_cfg("Synthetic/fcos_R_18_FPN_1200it.yaml", "MODEL.MUSU.NUM_ANCHORS", "2"))
    with pytest.raises(ValueError, match="CENTER_SAMPLING_RADIUS"):
        build_model(
            _cfg(
                "Synthetic/fcos_R_18_FPN_1200it.yaml",
                "MODEL.MUSU.FCOS_CENTER_SAMPLING_RADIUS", "0.0",
            )  # fmt: skip
        )


def test_non_finite_predictions_raise_floating_point_error() -> None:
    """Diverged weights: a FloatingPointError naming the output, not Detectron2's box assert."""
    model = build_model(_cfg())
    with torch.no_grad():
        model.head.bbox_pred.bias.fill_(float("nan"))
    instances = Instances((64, 64))
    instances.gt_boxes = Boxes(torch.tensor([[4.0, 4.0, 40.0, 40.0]]))
    instances.gt_classes = torch.tensor([1])
    with EventStorage(), pytest.raises(
        FloatingPointError, match="D2FCOS: non-finite box regression"
    ):
        model([{"image": torch.rand(3, 64, 64) * 255, "instances": instances}])


def test_train_losses_and_pre_nms_inference() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg())
    instances = Instances((128, 128))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 70.0, 90.0], [80.0, 20.0, 120.0, 60.0]]))
    instances.gt_classes = torch.tensor([1, 3])
    image = torch.rand(3, 128, 128) * 255
    with EventStorage():
        losses = model([{"image": image, "instances": instances}])
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())

    # FCOS ranks by sqrt(sigmoid(cls) * sigmoid(ctr)): at init ~ sqrt(0.01 * 0.5) ~ 0.07 > 0.05.
    default = build_model(_cfg())
    default.load_state_dict(model.state_dict())
    pre_nms = build_model(_cfg("Synthetic/fcos_R_18_FPN_1200it.yaml", *PRE_NMS_OPTS))
    pre_nms.load_state_dict(model.state_dict())
    default.eval(), pre_nms.eval()
    with torch.no_grad():
        after = default([{"image": image}])[0]["instances"]
        before = pre_nms([{"image": image}])[0]["instances"]
    assert 0 < len(after) <= 100 < len(before)
    assert float(before.scores.max()) == pytest.approx(float(after.scores.max()))


def test_float32_losses_equal_detectron2_fcos_losses() -> None:
    """Outside autocast the adaptor's losses are Detectron2's ``FCOS.losses`` exactly."""
    torch.manual_seed(0)
    model = build_model(_cfg())
    model.train()
    instances = Instances((96, 96))
    instances.gt_boxes = Boxes(torch.tensor([[8.0, 10.0, 60.0, 70.0], [50.0, 20.0, 90.0, 50.0]]))
    instances.gt_classes = torch.tensor([0, 2])
    batch = [{"image": torch.rand(3, 96, 96) * 255, "instances": instances}]
    with EventStorage():
        ours = model(batch)
        del model.loss_normalizer  # FCOS keeps an EMA of it: start the second call afresh
        model.losses = types.MethodType(FCOS.losses, model)  # Detectron2's own method
        theirs = model(batch)
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
