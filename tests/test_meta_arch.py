"""Tests of the ``MuSu`` meta-architecture: anchor order, training steps, losses, inference.

Models come from ``configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml`` (R-18, 64-channel FPN and
head, 5 classes) on CPU, with 64-128 px inputs. Notation: N images, R anchor slots over all levels
(order: level, H, W, A), C classes, A anchor slots per location, M objects.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from torch import Tensor
from torchvision.ops import generalized_box_iou

import musu
from musu.modeling import AnchorList, Assignment, MuSu, MuSuAssigner, musu_classification_loss
from musu.modeling.assigners import Anchors, WarmupSwitch
from musu.modeling.meta_arch import anchor_points, decode_boxes

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_CONFIG = REPO / "configs" / "Synthetic" / "musu_paper_R_18_FPN_1200it.yaml"
STRIDES = [8, 16, 32, 64, 128]
NUM_CLASSES = 5  # of the synthetic config
LOSS_KEYS = {"loss_musu_cls", "loss_musu_reg"}
STAT_KEYS = (
    "musu/bag_size",
    "musu/tau_cls",
    "musu/cls_weight_per_object",
    "musu/reg_weight_per_object",
)


def synthetic_cfg(size: int = 64, overrides: Sequence[Any] = ()) -> CfgNode:
    """The synthetic config on CPU with square ``size`` px inputs, plus ``overrides``."""
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    cfg.merge_from_file(str(SYNTHETIC_CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TRAIN = (size,)
    cfg.INPUT.MAX_SIZE_TRAIN = size
    cfg.INPUT.MIN_SIZE_TEST = size
    cfg.INPUT.MAX_SIZE_TEST = size
    cfg.merge_from_list(list(overrides))
    return cfg


def build(cfg: CfgNode, seed: int = 0) -> MuSu:
    """Build the model deterministically."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    assert isinstance(model, MuSu)
    return model


def random_boxes(num: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """(num, 4) XYXY boxes inside the image, 4 px to half the image wide and high."""
    size = torch.rand(num, 2, generator=generator) * torch.tensor([width / 2 - 4, height / 2 - 4])
    size = size + 4
    corner = torch.rand(num, 2, generator=generator) * (torch.tensor([width, height]) - size)
    return torch.cat([corner, corner + size], dim=1)


def make_input(
    boxes: Tensor,
    classes: Tensor,
    size: Tuple[int, int],
    generator: torch.Generator,
) -> Dict[str, Any]:
    """One Detectron2 training input: (3, H, W) float image in [0, 255] plus its instances."""
    height, width = size
    instances = Instances(size, gt_boxes=Boxes(boxes), gt_classes=classes.long())
    image = torch.rand(3, height, width, generator=generator) * 255
    return {"image": image, "instances": instances, "height": height, "width": width}


def random_input(
    num_objects: int, size: Union[int, Tuple[int, int]], generator: torch.Generator
) -> Dict[str, Any]:
    """A random image (square if ``size`` is an int) with ``num_objects`` random boxes."""
    height, width = (size, size) if isinstance(size, int) else size
    boxes = random_boxes(num_objects, height, width, generator)
    classes = torch.randint(0, NUM_CLASSES, (num_objects,), generator=generator)
    return make_input(boxes, classes, (height, width), generator)


def check_finite_gradients(model: torch.nn.Module) -> int:
    """Assert every gradient present is finite; return the number of parameters that got one."""
    with_grad = 0
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        with_grad += 1
        assert bool(torch.isfinite(param.grad).all()), f"non-finite gradient in {name}"
    return with_grad


def head_outputs_flat(
    predictions: Sequence[Sequence[Tensor]], num_classes: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """Head outputs flattened in (level, H, W, A) order: (N, R, C), (N, R, 4), (N, R)."""
    logits, box_reg, objectness = predictions
    cls = torch.cat([permute_to_N_HWA_K(x, num_classes) for x in logits], dim=1)
    reg = torch.cat([permute_to_N_HWA_K(x, 4) for x in box_reg], dim=1)
    obj = torch.cat([permute_to_N_HWA_K(x, 1) for x in objectness], dim=1).squeeze(-1)
    return cls, reg, obj


# --------------------------------------------------------------------------------------------
# anchor_points / decode_boxes.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_anchors", [1, 3])
def test_anchor_points_follow_permute_to_N_HWA_K_order(num_anchors: int) -> None:
    """Encode (i, j, a, level) in the channels of a fake head output; after Detectron2's
    flattening, row r must sit at anchor_points[r] = ((j + 0.5) s, (i + 0.5) s) with stride s."""
    sizes = [(5, 7), (3, 4), (2, 2), (1, 2), (1, 1)]
    fake = []  # per level (N=2, A*4, H, W): channels (a, k) hold [i, j, a, level][k]
    for level, (height, width) in enumerate(sizes):
        grid_i, grid_j = torch.meshgrid(
            torch.arange(height, dtype=torch.float32),
            torch.arange(width, dtype=torch.float32),
            indexing="ij",
        )  # (H, W) each
        channels = []
        for slot in range(num_anchors):
            channels += [grid_i, grid_j, torch.full_like(grid_i, slot)]
            channels.append(torch.full_like(grid_i, level))
        fake.append(torch.stack(channels).unsqueeze(0).repeat(2, 1, 1, 1))
    codes = torch.cat([permute_to_N_HWA_K(x, 4) for x in fake], dim=1)  # (N, R, 4)
    assert torch.equal(codes[0], codes[1])
    i, j, slot, level = codes[0].long().unbind(dim=1)  # (R,) each

    points, strides = anchor_points(sizes, STRIDES, num_anchors, "cpu")  # (R, 2), (R,)
    expected_strides = torch.tensor(STRIDES, dtype=torch.float32)[level]
    assert points.shape == (len(level), 2)
    torch.testing.assert_close(strides, expected_strides)
    torch.testing.assert_close(points[:, 0], (j + 0.5) * expected_strides)
    torch.testing.assert_close(points[:, 1], (i + 0.5) * expected_strides)
    # A varies fastest, then W, then H, then level.
    assert torch.equal(slot, torch.arange(len(slot)) % num_anchors)


def test_model_flattening_matches_anchor_points() -> None:
    """The model's own flattening of head outputs uses the same order as anchor_points."""
    model = build(synthetic_cfg(overrides=["MODEL.MUSU.NUM_ANCHORS", 2]))
    sizes = [(4, 6), (2, 3), (1, 2), (1, 1), (1, 1)]
    predictions = []
    for kind_dim in (NUM_CLASSES, 4, 1):
        per_level = [torch.randn(1, 2 * kind_dim, h, w) for h, w in sizes]
        predictions.append(per_level)
    logits, box_reg, objectness = model._flatten_predictions(predictions)
    expected = head_outputs_flat(predictions, NUM_CLASSES)
    torch.testing.assert_close(torch.cat(logits, dim=1), expected[0])
    torch.testing.assert_close(torch.cat(box_reg, dim=1), expected[1])
    torch.testing.assert_close(torch.cat(objectness, dim=1), expected[2])


def test_decode_boxes_known_values() -> None:
    """Distances (l, t, r, b) = stride * exp(output), around the point."""
    points = torch.tensor([[4.0, 4.0], [24.0, 8.0]])  # (R=2, 2)
    strides = torch.tensor([8.0, 16.0])
    outputs = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(0.5), 0.0, math.log(2.0), 0.0]]])
    boxes = decode_boxes(points, strides, outputs)  # (1, 2, 4)
    expected = torch.tensor([[[-4.0, -4.0, 12.0, 12.0], [16.0, -8.0, 56.0, 24.0]]])
    torch.testing.assert_close(boxes, expected)
    huge = decode_boxes(points, strides, torch.full((1, 2, 4), 1e4))
    assert bool(torch.isfinite(huge).all())


# --------------------------------------------------------------------------------------------
# Backbone.
# --------------------------------------------------------------------------------------------


def test_backbone_gives_p3_to_p7_with_p6_from_p5() -> None:
    """build_musu_resnet_fpn_backbone: P3-P7 at strides 8-128 with the FPN's channels; P6 is a
    stride-2 conv on the P5 output (FCOS), P7 one on relu(P6)."""
    cfg = synthetic_cfg(64)
    model = build(cfg)
    backbone = model.backbone
    shapes = backbone.output_shape()
    assert sorted(shapes, key=lambda k: shapes[k].stride) == ["p3", "p4", "p5", "p6", "p7"]
    assert [shapes[f].stride for f in ("p3", "p4", "p5", "p6", "p7")] == STRIDES
    assert all(shapes[f].channels == cfg.MODEL.FPN.OUT_CHANNELS for f in shapes)
    assert model.strides == STRIDES
    top = backbone.top_block
    assert top.in_feature == "p5"
    assert top.p6.in_channels == cfg.MODEL.FPN.OUT_CHANNELS  # not res5's 512 channels
    model.eval()
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        features = backbone((image - model.pixel_mean) / model.pixel_std)  # dict of (1, 64, H, W)
        torch.testing.assert_close(features["p6"], top.p6(features["p5"]))
        torch.testing.assert_close(features["p7"], top.p7(torch.relu(features["p6"])))
    assert features["p3"].shape[-2:] == (8, 12)
    assert features["p7"].shape[-2:] == (1, 1)


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------


def test_training_step_synthetic_config() -> None:
    """One step at 128 px on an empty image, a 200-object image and a 3-object image: finite
    losses and gradients, consistent assignment statistics logged to the EventStorage."""
    size = 128
    model = build(synthetic_cfg(size))
    model.train()
    generator = torch.Generator().manual_seed(0)
    batch = [random_input(n, size, generator) for n in (0, 200, 3)]
    with EventStorage() as storage:
        losses = model(batch)
        assert set(losses) == LOSS_KEYS
        for name, value in losses.items():
            assert value.dim() == 0 and bool(torch.isfinite(value)), (name, value)
            assert float(value.detach()) > 0, name
        sum(losses.values()).backward()
        latest = {k: v for k, (v, _) in storage.latest().items()}
    assert check_finite_gradients(model) > 0
    for module in (model.head.cls_score, model.head.bbox_pred, model.head.objectness):
        assert module.weight.grad is not None and bool(module.weight.grad.abs().sum() > 0)
    assert model.head.scales.grad is not None

    for key in STAT_KEYS:
        assert key in latest, f"{key} not logged (got {sorted(latest)})"
        assert math.isfinite(latest[key])
    bag, tau = latest["musu/bag_size"], latest["musu/tau_cls"]
    cls_w, reg_w = latest["musu/cls_weight_per_object"], latest["musu/reg_weight_per_object"]
    # Adaptive tau_cls = sqrt(|C_j|) >= 1 per object; by Jensen mean sqrt <= sqrt(mean).
    assert bag >= 1
    assert 1 <= tau <= math.sqrt(bag) + 1e-5
    # Rank 0 of every bag has weight 1; the rest have weight < 1. tau_reg < tau_cls.
    assert 1 <= reg_w <= cls_w <= bag + 1e-5


def test_non_finite_predictions_stop_training_with_a_clear_error() -> None:
    model = build(synthetic_cfg(64))
    model.train()
    with torch.no_grad():
        model.head.bbox_pred.bias.fill_(float("nan"))
    batch = [random_input(2, 64, torch.Generator().manual_seed(0))]
    with EventStorage(), pytest.raises(FloatingPointError, match="box regression.*BASE_LR"):
        model(batch)


def test_shadow_assigner_is_logged_and_not_trained_on() -> None:
    """SHADOW_ASSIGNER build_fcos_assigner: the FCOS rule's statistics are logged beside MuSu's
    (``musu_shadow/*``), and the losses are those of the run without it."""
    generator = torch.Generator().manual_seed(3)
    batch = [random_input(n, 64, generator) for n in (3, 5)]
    logged, results = [], []
    for shadow in ("", "build_fcos_assigner"):
        model = build(synthetic_cfg(64, ["MODEL.MUSU.SHADOW_ASSIGNER", shadow]))
        model.train()
        with EventStorage() as storage:
            results.append({k: v.detach() for k, v in model(batch).items()})
            logged.append({k: v for k, (v, _) in storage.latest().items()})
    assert results[0] == results[1]
    assert not any(k.startswith("musu_shadow/") for k in logged[0])
    shadow = {k.split("/", 1)[1]: v for k, v in logged[1].items() if k.startswith("musu_shadow/")}
    assert 0 < shadow["objects"] <= 8 and shadow["members_mean"] >= 1  # 8 objects in the batch
    assert "tau_cls" not in shadow and "cls_top_is_best_iou" not in shadow  # FCOS: weights 1
    assert shadow["cls_weight_per_object"] == shadow["members_mean"]
    assert logged[1]["musu/members_mean"] == logged[0]["musu/members_mean"]


@pytest.mark.parametrize("num_images", [1, 2])
def test_batch_without_objects(num_images: int) -> None:
    """No object anywhere: finite losses, regression loss exactly 0, backward works."""
    model = build(synthetic_cfg(64))
    model.train()
    generator = torch.Generator().manual_seed(1)
    batch = [random_input(0, 64, generator) for _ in range(num_images)]
    with EventStorage() as storage:
        losses = model(batch)
        latest = {k: v for k, (v, _) in storage.latest().items()}
    assert set(losses) == LOSS_KEYS
    assert (
        bool(torch.isfinite(losses["loss_musu_cls"]))
        and float(losses["loss_musu_cls"].detach()) > 0
    )
    assert float(losses["loss_musu_reg"].detach()) == 0.0
    sum(losses.values()).backward()
    assert check_finite_gradients(model) > 0
    assert all(latest.get(key, 0.0) == 0.0 for key in STAT_KEYS)


def test_training_forward_outside_event_storage() -> None:
    """Outside a trainer (no EventStorage) the training forward still returns the losses."""
    model = build(synthetic_cfg(64))
    model.train()
    generator = torch.Generator().manual_seed(8)
    losses = model([random_input(2, 64, generator)])
    assert set(losses) == LOSS_KEYS
    assert all(bool(torch.isfinite(v)) for v in losses.values())


def test_three_anchor_model_trains_a_step() -> None:
    """NUM_ANCHORS 3: forward/backward on a batch with objects gives finite losses and grads."""
    model = build(synthetic_cfg(64, ["MODEL.MUSU.NUM_ANCHORS", 3]))
    assert model.head.num_anchors == 3 and model.num_anchors == 3
    model.train()
    generator = torch.Generator().manual_seed(2)
    batch = [random_input(4, 64, generator), random_input(3, (48, 80), generator)]  # padded
    with EventStorage() as storage:
        losses = model(batch)
        latest = {k: v for k, (v, _) in storage.latest().items()}
    assert set(losses) == LOSS_KEYS
    assert all(bool(torch.isfinite(v)) and float(v.detach()) > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert check_finite_gradients(model) > 0
    assert model.head.bbox_pred.weight.grad.abs().sum() > 0
    assert latest["musu/cls_weight_per_object"] >= 1


def test_few_sgd_steps_reduce_loss_on_fixed_image() -> None:
    """Overfitting sanity check: 12 SGD steps (lr 0.01, momentum 0.9) on one fixed 64 px
    image with 2 boxes bring the total loss well below its initial value."""
    model = build(synthetic_cfg(64), seed=0)
    model.train()
    generator = torch.Generator().manual_seed(3)
    boxes = torch.tensor([[8.0, 12.0, 40.0, 48.0], [30.0, 4.0, 60.0, 30.0]])
    batch = [make_input(boxes, torch.tensor([1, 3]), (64, 64), generator)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    with EventStorage():
        for _ in range(12):
            losses = model(batch)
            total = sum(losses.values())
            assert bool(torch.isfinite(total))
            history.append(float(total.detach()))
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
        with torch.no_grad():
            history.append(float(sum(model(batch).values())))
    # Single-image BN makes the curve noisy: compare the mean of the last four losses.
    assert sum(history[-4:]) / 4 < 0.6 * history[0], history


class _RecordingAssigner:
    """Wraps an assigner, keeping its inputs and output."""

    def __init__(self, assigner: MuSuAssigner) -> None:
        self.assigner = assigner
        self.calls: List[Dict[str, Any]] = []

    def __call__(
        self,
        grid: Anchors,
        scores: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_classes: Sequence[Tensor],
    ) -> Assignment:
        out = self.assigner(grid, scores, pred_boxes, gt_boxes, gt_classes)
        self.calls.append(dict(grid=grid, scores=scores, pred_boxes=pred_boxes, out=out))
        return out


@pytest.mark.parametrize("num_objects", [(0, 6), (2, 5), (0, 0)])
def test_losses_recomputed_from_model_assignment(num_objects: Tuple[int, int]) -> None:
    """Recompute both losses from the raw head outputs and the model's own assignment:
    L_cls = Eq. 7 / max(sum w_cls, 1) and L_reg = weight * sum w_reg (1 - GIoU) / max(sum w_reg, 1).
    """
    reg_loss_weight = 2.0
    model = build(synthetic_cfg(64, ["MODEL.MUSU.REG_LOSS_WEIGHT", reg_loss_weight]))
    model.train()
    recorder = _RecordingAssigner(model.assigner)
    model.assigner = recorder
    captured: List[Any] = []
    model.head.register_forward_hook(lambda module, args, output: captured.append(output))
    generator = torch.Generator().manual_seed(4)
    batch = [random_input(n, 64, generator) for n in num_objects]
    with EventStorage():
        losses = model(batch)
    assert len(recorder.calls) == 1 and len(captured) == 1
    assignment = recorder.calls[0]["out"]

    cls_logits, log_dist, obj_logits = head_outputs_flat(captured[0], NUM_CLASSES)
    sizes = [(x.shape[-2], x.shape[-1]) for x in captured[0][0]]
    points, strides = anchor_points(sizes, STRIDES, 1, "cpu")  # (R, 2), (R,)
    pred_boxes = decode_boxes(points, strides, log_dist)  # (N, R, 4)
    scores = cls_logits.sigmoid() * obj_logits.sigmoid()[..., None]  # (N, R, C)
    # The assigner saw merged scores and decoded boxes, and agrees with a fresh default one.
    torch.testing.assert_close(recorder.calls[0]["scores"], scores.detach())
    torch.testing.assert_close(recorder.calls[0]["pred_boxes"], pred_boxes.detach())
    gt_boxes = [x["instances"].gt_boxes.tensor for x in batch]
    gt_classes = [x["instances"].gt_classes for x in batch]
    fresh = MuSuAssigner()(
        AnchorList(points), scores.detach(), pred_boxes.detach(), gt_boxes, gt_classes
    )
    assert torch.equal(fresh.gt_index, assignment.gt_index)
    torch.testing.assert_close(fresh.cls_weight, assignment.cls_weight)

    target_classes = torch.full_like(assignment.gt_index, -1)  # (N, R)
    reg_sum = torch.zeros(())
    for n, (boxes, classes) in enumerate(zip(gt_boxes, gt_classes)):
        assigned = assignment.gt_index[n] >= 0
        target_classes[n, assigned] = classes[assignment.gt_index[n, assigned]]
        positive = assignment.reg_weight[n] > 0
        if bool(positive.any()):
            pred = pred_boxes[n, positive]  # (P, 4)
            target = boxes[assignment.gt_index[n, positive]]
            giou = generalized_box_iou(pred, target).diagonal()  # (P,)
            reg_sum = reg_sum + (assignment.reg_weight[n, positive] * (1 - giou)).sum()
    cls_sum = musu_classification_loss(
        cls_logits, obj_logits, target_classes, assignment.cls_weight
    )
    cls_norm = max(float(assignment.cls_weight.sum()), 1.0)
    reg_norm = max(float(assignment.reg_weight.sum()), 1.0)
    if sum(num_objects) == 0:
        assert cls_norm == 1.0 and reg_norm == 1.0
    else:
        assert cls_norm > 1.0 and reg_norm > 1.0
    torch.testing.assert_close(losses["loss_musu_cls"], cls_sum / cls_norm, rtol=1e-4, atol=1e-6)
    expected_reg = reg_loss_weight * reg_sum / reg_norm
    torch.testing.assert_close(losses["loss_musu_reg"], expected_reg, rtol=1e-4, atol=1e-6)
    assert float(losses["loss_musu_cls"].detach()) < 1e3  # normalized: no blow-up without objects


def test_cls_loss_normalizer_members() -> None:
    """With MODEL.MUSU.CLS_LOSS_NORMALIZER "members" the same weights, batch and assignment give
    the same regression loss, and the classification loss's sum (Eq. 7) is divided by the number
    of anchors with a class target instead of by the summed cls weights."""
    generator = torch.Generator().manual_seed(4)
    batch = [random_input(n, 64, generator) for n in (3, 5)]
    losses, assignments = {}, {}
    for normalizer in ("weights", "members"):
        model = build(synthetic_cfg(64, ["MODEL.MUSU.CLS_LOSS_NORMALIZER", normalizer]))
        model.train()
        recorder = _RecordingAssigner(model.assigner)
        model.assigner = recorder
        with EventStorage():
            losses[normalizer] = model(batch)
        assignments[normalizer] = recorder.calls[0]["out"]
    assert torch.equal(assignments["weights"].gt_index, assignments["members"].gt_index)
    assignment = assignments["weights"]
    members = float((assignment.gt_index >= 0).sum())
    weights = float(assignment.cls_weight.sum())
    assert members > weights > 1.0  # soft weights lie in [0, 1], most below 1
    torch.testing.assert_close(
        losses["members"]["loss_musu_reg"], losses["weights"]["loss_musu_reg"]
    )
    cls_sum = losses["weights"]["loss_musu_cls"] * weights
    torch.testing.assert_close(
        losses["members"]["loss_musu_cls"], cls_sum / members, rtol=1e-5, atol=0
    )


# --------------------------------------------------------------------------------------------
# Inference.
# --------------------------------------------------------------------------------------------


def inference_model(overrides: Sequence[Any] = (), size: int = 64) -> MuSu:
    """A synthetic-config model in eval mode whose head is re-drawn so that scores spread over
    (0, 1) and boxes vary (some crossing the image border): the initial prior gives no scores
    above 0.05. The weights do not depend on ``overrides`` (fixed seeds), only the settings."""
    model = build(synthetic_cfg(size, overrides), seed=0)
    generator = torch.Generator().manual_seed(5)
    head = model.head
    with torch.no_grad():
        for conv, std, bias_std in ((head.cls_score, 0.2, 1.0), (head.objectness, 0.1, 0.5)):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * std)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * bias_std)
        reg = head.bbox_pred
        reg.weight.copy_(torch.randn(reg.weight.shape, generator=generator) * 0.05)
        reg.bias.copy_(torch.randn(reg.bias.shape, generator=generator) * 0.5 + 0.7)
    model.eval()
    return model


def inference_input(size: Tuple[int, int] = (64, 64), seed: int = 6) -> Dict[str, Any]:
    """One inference input: a random (3, H, W) image in [0, 255]."""
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(3, *size, generator=generator) * 255}


def raw_inference(model: MuSu, inputs: List[Dict[str, Any]]) -> Tuple[List[Instances], Tuple]:
    """forward_inference's Instances (before Detectron2's rescale/clip) and the head outputs."""
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        predictions = model.head(features)
        return model.forward_inference(images, features, predictions), predictions


def test_inference_output_fields_and_limits() -> None:
    """Instances with pred_boxes/scores/pred_classes, at most DETECTIONS_PER_IMAGE, scores above
    the threshold in descending order, classes in range, boxes inside the output image."""
    max_det = 25
    model = inference_model(["TEST.DETECTIONS_PER_IMAGE", max_det])
    # The second image is smaller and non-square (padded in the batch), resized to 96 x 160.
    inputs = [
        inference_input(seed=6),
        dict(inference_input((48, 80), seed=7), height=96, width=160),
    ]
    with torch.no_grad():
        outputs = model(inputs)
    assert len(outputs) == 2
    for output, (height, width) in zip(outputs, [(64, 64), (96, 160)]):
        result = output["instances"]
        assert isinstance(result, Instances)
        assert result.has("pred_boxes") and result.has("scores") and result.has("pred_classes")
        assert result.image_size == (height, width)
        assert 0 < len(result) <= max_det
        scores = result.scores
        assert bool((scores >= model.test_score_thresh).all()) and bool((scores <= 1).all())
        assert bool((scores[:-1] >= scores[1:]).all()), "detections not sorted by score"
        classes = result.pred_classes
        assert bool(((classes >= 0) & (classes < NUM_CLASSES)).all())
        boxes = result.pred_boxes.tensor
        assert bool(torch.isfinite(boxes).all())
        assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all())
        assert bool((boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all())
        assert bool((boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all())
    # With a low threshold there are more candidates than the cap: the cap is reached.
    assert len(outputs[0]["instances"]) == max_det


@pytest.mark.parametrize("num_anchors", [1, 3])
def test_top_detection_is_best_anchor_class_pair(num_anchors: int) -> None:
    """The first detection is the highest sigmoid(cls) * sigmoid(obj) over all anchors and
    classes, with that anchor's decoded box and that class (never suppressed by NMS)."""
    model = inference_model(["MODEL.MUSU.NUM_ANCHORS", num_anchors])
    results, predictions = raw_inference(model, [inference_input((64, 96))])  # non-square
    cls_logits, log_dist, obj_logits = head_outputs_flat(predictions, NUM_CLASSES)
    scores = (cls_logits.sigmoid() * obj_logits.sigmoid()[..., None])[0]  # (R, C)
    best = int(scores.argmax())
    anchor, cls = best // NUM_CLASSES, best % NUM_CLASSES
    sizes = [(x.shape[-2], x.shape[-1]) for x in predictions[0]]
    points, strides = anchor_points(sizes, STRIDES, num_anchors, "cpu")
    box = decode_boxes(points, strides, log_dist[0])[anchor]  # (4,)
    top = results[0][0]
    torch.testing.assert_close(top.scores[0], scores.max())
    assert int(top.pred_classes[0]) == cls
    torch.testing.assert_close(top.pred_boxes.tensor[0], box, rtol=1e-5, atol=1e-4)


def test_high_score_threshold_gives_no_detections() -> None:
    """SCORE_THRESH_TEST above every score: no detection, empty but well-formed Instances."""
    model = inference_model(["MODEL.MUSU.SCORE_THRESH_TEST", 0.999])
    with torch.no_grad():
        result = model([inference_input()])[0]["instances"]
    assert len(result) == 0
    assert result.has("pred_boxes") and result.has("scores") and result.has("pred_classes")


def test_score_threshold_respected() -> None:
    """A mid threshold keeps only (and at most DETECTIONS_PER_IMAGE of) the scores above it."""
    low = inference_model(["TEST.DETECTIONS_PER_IMAGE", 1000])
    results_low, _ = raw_inference(low, [inference_input()])
    median = float(results_low[0].scores.median())
    high = inference_model(
        ["TEST.DETECTIONS_PER_IMAGE", 1000, "MODEL.MUSU.SCORE_THRESH_TEST", median]
    )
    results_high, _ = raw_inference(high, [inference_input()])
    assert 0 < len(results_high[0]) < len(results_low[0])
    assert bool((results_high[0].scores > median).all())


def test_topk_candidates_respected() -> None:
    """TOPK_CANDIDATES_TEST 1: one candidate per level survives, so at most L detections."""
    model = inference_model(["MODEL.MUSU.TOPK_CANDIDATES_TEST", 1])
    results, _ = raw_inference(model, [inference_input()])
    assert 1 <= len(results[0]) <= len(STRIDES)


@pytest.mark.parametrize("nms_thresh", [0.3, 0.6])
def test_nms_threshold_respected(nms_thresh: float) -> None:
    """After class-wise NMS no two kept boxes of one class overlap with IoU above the
    threshold, and boxes of a class do overlap more without NMS (threshold 1)."""
    overrides = ["TEST.DETECTIONS_PER_IMAGE", 1000, "MODEL.MUSU.NMS_THRESH_TEST", nms_thresh]
    results, _ = raw_inference(inference_model(overrides), [inference_input()])
    result = results[0]
    assert len(result) > 1

    def max_same_class_iou(instances: Instances) -> float:
        iou = pairwise_iou(instances.pred_boxes, instances.pred_boxes)  # (K, K)
        same = instances.pred_classes[:, None] == instances.pred_classes[None, :]
        same.fill_diagonal_(False)
        return float(iou[same].max()) if bool(same.any()) else 0.0

    assert max_same_class_iou(result) <= nms_thresh + 1e-6
    overrides[-1] = 1.0
    unsuppressed, _ = raw_inference(inference_model(overrides), [inference_input()])
    assert len(unsuppressed[0]) > len(result)
    assert max_same_class_iou(unsuppressed[0]) > nms_thresh


def test_no_nms_keeps_all_candidates() -> None:
    """NMS threshold 1 suppresses nothing: the count is sum over levels of
    min(#(scores > thresh), TOPK), capped by DETECTIONS_PER_IMAGE."""
    topk, max_det = 7, 1000
    overrides = ["MODEL.MUSU.TOPK_CANDIDATES_TEST", topk, "MODEL.MUSU.NMS_THRESH_TEST", 1.0]
    model = inference_model(overrides + ["TEST.DETECTIONS_PER_IMAGE", max_det])
    results, predictions = raw_inference(model, [inference_input()])
    expected = 0
    for cls_level, obj_level in zip(predictions[0], predictions[2]):
        level_scores = cls_level[0].sigmoid() * obj_level[0].sigmoid()  # (C, H, W), A = 1
        expected += min(int((level_scores > model.test_score_thresh).sum()), topk)
    assert len(results[0]) == min(expected, max_det)


def test_warmup_assigner_replaces_the_main_one_for_its_iterations() -> None:
    """MODEL.MUSU.WARMUP_ASSIGNER_ITERS 2: the FCOS rule decides the samples at iterations 0-1
    (static weights: no tau_cls), MuSu's assigner from iteration 2 on (adaptive tau_cls > 0)."""
    cfg = synthetic_cfg(overrides=["MODEL.MUSU.WARMUP_ASSIGNER_ITERS", 2])
    model = build(cfg)
    generator = torch.Generator().manual_seed(3)
    inputs = [random_input(3, 64, generator) for _ in range(2)]
    switch = model.assigner
    assert isinstance(switch, WarmupSwitch) and switch.iters == 2
    main, warmup = _RecordingAssigner(switch.main), _RecordingAssigner(switch.warmup)
    switch.main, switch.warmup = main, warmup
    with EventStorage(start_iter=0) as storage:
        for iteration in range(3):
            storage.iter = iteration
            model(inputs)
    assert (len(warmup.calls), len(main.calls)) == (2, 1)
    assert all("tau_cls" not in call["out"].stats for call in warmup.calls)
    assert float(main.calls[0]["out"].stats["tau_cls"].max()) > 0.0
    # Outside a trainer (no EventStorage) the main assigner is used.
    model(inputs)
    assert len(main.calls) == 2


def test_warmup_assigner_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="MODEL.MUSU.WARMUP_ASSIGNER_ITERS"):
        build(synthetic_cfg(overrides=["MODEL.MUSU.WARMUP_ASSIGNER_ITERS", -1]))
    with pytest.raises(ValueError, match="MODEL.MUSU.WARMUP_ASSIGNER 'nope'"):
        build(
            synthetic_cfg(
                overrides=[
                    "MODEL.MUSU.WARMUP_ASSIGNER_ITERS",
                    5,
                    "MODEL.MUSU.WARMUP_ASSIGNER",
                    "nope",
                ]
            )
        )


def test_cell_box_transform_decodes_exactly_like_decode_boxes() -> None:
    """Inference decodes through Detectron2's ``DenseDetector`` with cell boxes as anchors: the
    boxes equal ``decode_boxes`` on the points and strides bit for bit."""
    from musu.modeling.meta_arch import CellBoxTransform

    points, strides = anchor_points([(13, 21), (7, 11), (4, 6)], [8, 16, 32], 3, "cpu")
    log_dist = torch.randn(len(points), 4, generator=torch.Generator().manual_seed(0)) * 3
    cells = CellBoxTransform.cell_boxes(points, strides)
    decoded = CellBoxTransform.apply_deltas(log_dist, cells.tensor)
    assert torch.equal(decoded, decode_boxes(points, strides, log_dist))
