"""Tests of ``MuSuHead`` (paper Sec. 4.1 and Table 7): parameter counts, initialization, shapes.

Notation: N images, A anchor slots per location, C classes, L FPN levels, s the level's stride.
Parameter counts use 256 channels and 5 levels (the paper's setting); everything that runs a
forward pass uses narrow heads (64 channels: two per GN group, so that 1 x 1 maps still
normalize) and tiny feature maps.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.fcos import FCOSHead
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

import musu
from musu.modeling.head import MuSuHead, initial_anchor_shapes
from musu.modeling.meta_arch import anchor_points, decode_boxes

NUM_LEVELS = 5
STRIDES = [8, 16, 32, 64, 128]
PAPER_CHANNELS = 256
PAPER_CLASSES = 80
# Feature sizes (H, W) of a 64 x 96 image at strides 8..128 (non-square on purpose).
FEATURE_SIZES = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (shared tensors counted once, as ``parameters()`` does)."""
    return sum(p.numel() for p in module.parameters())


def shapes_for(channels: int, num_levels: int = NUM_LEVELS) -> List[ShapeSpec]:
    """Input shapes of a head reading ``num_levels`` FPN levels of ``channels`` channels."""
    return [ShapeSpec(channels=channels, stride=s) for s in STRIDES[:num_levels]]


def make_head(
    channels: int = 64,
    num_classes: int = 3,
    num_anchors: int = 1,
    num_convs: int = 1,
    norm: str = "GN",
    deformable_last_conv: bool = False,
    anchor_init_seed: int = 0,
) -> MuSuHead:
    """A MuSuHead built from explicit arguments (the ``@configurable`` non-config path)."""
    return MuSuHead(
        input_shape=shapes_for(channels),
        num_classes=num_classes,
        num_anchors=num_anchors,
        num_convs=num_convs,
        norm=norm,
        deformable_last_conv=deformable_last_conv,
        anchor_init_seed=anchor_init_seed,
    )


def make_features(channels: int, batch: int = 2, seed: int = 0) -> List[Tensor]:
    """Random per-level features, each (N, channels, H_l, W_l)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=generator) for h, w in FEATURE_SIZES]


def decode_head_boxes(head: MuSuHead, features: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Decode the head's regression outputs on ``features``.

    Returns:
        boxes (N, R, 4) XYXY, points (R, 2), strides (R,), with R = sum_l H_l * W_l * A in the
        (level, H, W, A) order of ``anchor_points``.
    """
    num_anchors = head.num_anchors
    with torch.no_grad():
        _, box_reg, _ = head(list(features))
    flat = []
    for reg in box_reg:  # (N, A*4, H, W) -> (N, H*W*A, 4)
        n, _, h, w = reg.shape
        flat.append(reg.view(n, num_anchors, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    sizes = [(f.shape[-2], f.shape[-1]) for f in features]
    points, strides = anchor_points(sizes, STRIDES[: len(sizes)], num_anchors, "cpu")
    return decode_boxes(points, strides, torch.cat(flat, dim=1)), points, strides


# --------------------------------------------------------------------------------------------
# Table 7: parameter counts.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fcos_head_parameters() -> int:
    """Parameters of Detectron2's FCOSHead: 5 levels, 256 channels, 4 GN convs, 80 classes."""
    head = FCOSHead(
        input_shape=shapes_for(PAPER_CHANNELS),
        conv_dims=[PAPER_CHANNELS] * 4,
        norm="GN",
        num_classes=PAPER_CLASSES,
    )
    return count_parameters(head)


@pytest.mark.parametrize("num_anchors", [1, 2, 3, 4, 5])
def test_parameter_count_matches_table_7(fcos_head_parameters: int, num_anchors: int) -> None:
    """A = 1: FCOSHead + one scale per level; each extra slot adds (C + 4 + 1)(256 * 9 + 1)."""
    head = make_head(
        channels=PAPER_CHANNELS, num_classes=PAPER_CLASSES, num_anchors=num_anchors, num_convs=4
    )
    per_extra_anchor = (PAPER_CLASSES + 4 + 1) * (PAPER_CHANNELS * 9 + 1)
    expected = fcos_head_parameters + NUM_LEVELS + (num_anchors - 1) * per_extra_anchor
    assert count_parameters(head) == expected
    assert head.scales.numel() == NUM_LEVELS


def test_head_from_config_uses_musu_keys() -> None:
    """Built from a config, the head takes C, A, convs and norm from ``MODEL.MUSU``."""
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    cfg.MODEL.MUSU.NUM_CLASSES = 7
    cfg.MODEL.MUSU.NUM_ANCHORS = 2
    cfg.MODEL.MUSU.NUM_CONVS = 3
    head = MuSuHead(cfg, shapes_for(32))
    assert (head.num_classes, head.num_anchors, head.num_levels) == (7, 2, NUM_LEVELS)
    assert head.cls_score.out_channels == 2 * 7
    assert head.bbox_pred.out_channels == 2 * 4
    assert head.objectness.out_channels == 2
    convs = [m for m in head.cls_subnet if isinstance(m, nn.Conv2d)]
    norms = [m for m in head.cls_subnet if isinstance(m, nn.GroupNorm)]
    assert len(convs) == 3 and len(norms) == 3
    assert all(m.num_groups == 32 for m in norms)


def test_unequal_channels_rejected() -> None:
    """All levels must share one channel count (the towers are shared across levels)."""
    shapes = [ShapeSpec(channels=64, stride=8), ShapeSpec(channels=128, stride=16)]
    with pytest.raises(ValueError):
        MuSuHead(input_shape=shapes, num_classes=3)


# --------------------------------------------------------------------------------------------
# Initialization.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_anchors", [1, 3])
def test_regression_conv_weight_zero_and_cls_prior(num_anchors: int) -> None:
    """Last regression conv weights are 0; cls bias is -log((1 - pi) / pi) with pi = 0.01."""
    head = make_head(num_anchors=num_anchors)
    assert torch.count_nonzero(head.bbox_pred.weight) == 0
    prior_bias = -math.log((1 - 0.01) / 0.01)
    assert torch.allclose(head.cls_score.bias, torch.full_like(head.cls_score.bias, prior_bias))
    assert torch.count_nonzero(head.objectness.bias) == 0
    assert torch.equal(head.scales.detach(), torch.ones(NUM_LEVELS))


def test_single_anchor_initial_boxes_are_2s_squares() -> None:
    """A = 1: regression bias 0, so every decoded box is 2s x 2s centred on its point."""
    head = make_head(num_anchors=1, channels=64)
    assert torch.count_nonzero(head.bbox_pred.bias) == 0
    features = make_features(64)
    boxes, points, strides = decode_head_boxes(head, features)  # (N, R, 4), (R, 2), (R,)
    expected = torch.cat([points - strides[:, None], points + strides[:, None]], dim=1)  # (R, 4)
    torch.testing.assert_close(boxes, expected.expand_as(boxes), rtol=0, atol=1e-4)


@pytest.mark.parametrize("size", [1.0, 4.0])
def test_initial_box_size_from_config(size: float) -> None:
    """``MODEL.MUSU.INITIAL_BOX_SIZE`` k: every initial box is k s x k s centred on its point."""
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    cfg.MODEL.MUSU.NUM_CONVS = 1
    cfg.MODEL.MUSU.INITIAL_BOX_SIZE = size
    head = MuSuHead(cfg, shapes_for(64))
    boxes, points, strides = decode_head_boxes(head, make_features(64))
    half = size / 2 * strides[:, None]  # (R, 1)
    expected = torch.cat([points - half, points + half], dim=1)  # (R, 4)
    torch.testing.assert_close(boxes, expected.expand_as(boxes), rtol=0, atol=1e-4)


def test_anchor_sizes_from_config_give_square_boxes_per_slot() -> None:
    """``MODEL.MUSU.ANCHOR_SIZES`` [4, 8] with two slots: at every location of every level, slot 0
    starts as a 4s x 4s square and slot 1 as an 8s x 8s square centred on the point, whatever
    INITIAL_BOX_SIZE says."""
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    cfg.MODEL.MUSU.NUM_CONVS = 1
    cfg.MODEL.MUSU.NUM_ANCHORS = 2
    cfg.MODEL.MUSU.INITIAL_BOX_SIZE = 3.0  # ignored when ANCHOR_SIZES is set
    cfg.MODEL.MUSU.ANCHOR_SIZES = [4.0, 8.0]
    head = MuSuHead(cfg, shapes_for(64))
    boxes, points, strides = decode_head_boxes(head, make_features(64, batch=1))
    boxes = boxes[0].view(-1, 2, 4)  # (locations, A, 4)
    points, strides = points.view(-1, 2, 2)[:, 0], strides.view(-1, 2)[:, 0]  # (locations, ...)
    for slot, side in enumerate((4.0, 8.0)):
        half = side / 2 * strides[:, None]  # (locations, 1)
        expected = torch.cat([points - half, points + half], dim=1)  # (locations, 4)
        torch.testing.assert_close(boxes[:, slot], expected, rtol=0, atol=1e-4)


def test_anchor_sizes_length_must_match_slots() -> None:
    """Three sizes for two slots is an error, not a silent truncation."""
    with pytest.raises(ValueError, match="3 anchor sizes given for 2 anchor slots"):
        initial_anchor_shapes(2, (1.0, 2.0), (0.5, 2.0), seed=0, sizes=(4.0, 6.0, 8.0))


def test_initial_box_size_scales_the_random_draw() -> None:
    """A > 1 with INITIAL_BOX_SIZE k: the paper's drawn scales times k / 2, ratios unchanged."""
    paper = initial_anchor_shapes(3, (1.0, 2.0), (0.5, 2.0), seed=0)  # (A, 2)
    scaled = initial_anchor_shapes(3, (1.0, 2.0), (0.5, 2.0), seed=0, initial_box_size=4.0)
    torch.testing.assert_close(scaled[:, 0], paper[:, 0] * 2.0)
    torch.testing.assert_close(scaled[:, 1], paper[:, 1])


@pytest.mark.parametrize("num_anchors", [2, 3, 5])
def test_multi_anchor_initial_shapes_in_paper_ranges(num_anchors: int) -> None:
    """A > 1: each slot's box has scale sqrt(w h) / 2s in [1, 2] and h / w in [1/2, 2], the same
    at every location and level, and the slots differ from one another."""
    head = make_head(num_anchors=num_anchors, channels=64)
    features = make_features(64, batch=1)
    boxes, points, strides = decode_head_boxes(head, features)
    boxes = boxes[0]  # (R, 4)
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]  # (R,) each
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (R, 2)
    torch.testing.assert_close(centres, points, rtol=0, atol=1e-3)
    scale = (width * height).sqrt() / (2 * strides)  # (R,)
    ratio = height / width
    eps = 1e-5
    assert bool(((scale >= 1 - eps) & (scale <= 2 + eps)).all()), scale
    assert bool(((ratio >= 0.5 - eps) & (ratio <= 2 + eps)).all()), ratio
    per_slot = torch.stack([scale, ratio], dim=1).view(-1, num_anchors, 2)  # (H*W summed, A, 2)
    torch.testing.assert_close(per_slot, per_slot[:1].expand_as(per_slot), rtol=1e-5, atol=1e-5)
    slots = per_slot[0]  # (A, 2)
    assert len({(round(float(s), 5), round(float(r), 5)) for s, r in slots}) == num_anchors
    # The decoded shapes are those returned by initial_anchor_shapes for the same seed.
    expected = initial_anchor_shapes(num_anchors, (1.0, 2.0), (0.5, 2.0), seed=0)  # (A, 2)
    torch.testing.assert_close(slots, expected, rtol=1e-5, atol=1e-5)


def test_anchor_shapes_reproducible_from_seed() -> None:
    """Same ANCHOR_INIT_SEED, same bias (whatever the global seed); another seed, another bias."""
    torch.manual_seed(1)
    first = make_head(num_anchors=3, anchor_init_seed=7).bbox_pred.bias.detach().clone()
    torch.manual_seed(12345)
    torch.rand(17)  # move the global generator on
    second = make_head(num_anchors=3, anchor_init_seed=7).bbox_pred.bias.detach().clone()
    other = make_head(num_anchors=3, anchor_init_seed=8).bbox_pred.bias.detach().clone()
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_anchor_init_does_not_touch_global_rng() -> None:
    """The anchor-shape draw uses its own generator: the global torch stream is unchanged."""
    torch.manual_seed(3)
    expected = torch.rand(5)
    torch.manual_seed(3)
    initial_anchor_shapes(4, (1.0, 2.0), (0.5, 2.0), seed=0)
    assert torch.equal(torch.rand(5), expected)


def test_anchor_init_seed_from_config() -> None:
    """``MODEL.MUSU.ANCHOR_INIT_SEED`` and the two ranges reach the head through the config."""
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    cfg.MODEL.MUSU.NUM_ANCHORS = 4
    cfg.MODEL.MUSU.NUM_CONVS = 1
    cfg.MODEL.MUSU.ANCHOR_INIT_SEED = 5
    cfg.MODEL.MUSU.ANCHOR_SCALE_RANGE = [1.5, 1.5]
    cfg.MODEL.MUSU.ANCHOR_ASPECT_RATIO_RANGE = [1.0, 4.0]
    head = MuSuHead(cfg, shapes_for(32))
    shapes = initial_anchor_shapes(4, (1.5, 1.5), (1.0, 4.0), seed=5)  # (A, 2)
    bias = head.bbox_pred.bias.detach().view(4, 4)  # (A, [l, t, r, b])
    # l = r = log(scale / sqrt(ar)), t = b = log(scale * sqrt(ar)).
    torch.testing.assert_close(bias[:, 0], (shapes[:, 0] / shapes[:, 1].sqrt()).log())
    torch.testing.assert_close(bias[:, 1], (shapes[:, 0] * shapes[:, 1].sqrt()).log())
    torch.testing.assert_close(bias[:, 2], bias[:, 0])
    torch.testing.assert_close(bias[:, 3], bias[:, 1])
    assert torch.allclose(shapes[:, 0], torch.tensor(1.5))
    assert bool(((shapes[:, 1] >= 1.0) & (shapes[:, 1] <= 4.0)).all())


# --------------------------------------------------------------------------------------------
# Forward shapes and the deformable variant.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_anchors", [1, 3])
def test_output_shapes_per_level(num_anchors: int) -> None:
    """Per level: logits (N, A*C, H, W), box outputs (N, A*4, H, W), objectness (N, A, H, W)."""
    num_classes = 7
    head = make_head(channels=64, num_classes=num_classes, num_anchors=num_anchors, num_convs=2)
    features = make_features(64, batch=2)
    logits, box_reg, objectness = head(features)
    assert len(logits) == len(box_reg) == len(objectness) == NUM_LEVELS
    for (h, w), cls_l, reg_l, obj_l in zip(FEATURE_SIZES, logits, box_reg, objectness):
        assert cls_l.shape == (2, num_anchors * num_classes, h, w)
        assert reg_l.shape == (2, num_anchors * 4, h, w)
        assert obj_l.shape == (2, num_anchors, h, w)


def test_wrong_number_of_levels_rejected() -> None:
    """The head has one scale per level: it refuses a different number of feature maps."""
    head = make_head(channels=64)
    with pytest.raises(ValueError):
        head(make_features(64)[:3])


def test_level_scales_multiply_regression_output() -> None:
    """Box outputs are scale_l times the raw conv output (learnable scale per level)."""
    head = make_head(channels=64, num_anchors=2)
    features = make_features(64, batch=1)
    with torch.no_grad():
        _, before, _ = head(features)
        head.scales.copy_(torch.arange(1, NUM_LEVELS + 1, dtype=torch.float32))
        _, after, _ = head(features)
    for level in range(NUM_LEVELS):
        torch.testing.assert_close(after[level], before[level] * (level + 1))


def _copy_into_deformable(regular: MuSuHead, deformable: MuSuHead) -> None:
    """Copy every weight of ``regular`` into ``deformable``, then halve the weights of the
    regular towers' last convs: a deformable conv with zero offsets and mask sigmoid(0) = 1/2
    computes 0.5 * conv(x) + bias, which is what the halved regular conv computes (bias 0)."""
    with torch.no_grad():
        for tower in ("cls_subnet", "bbox_subnet"):
            pairs = list(zip(getattr(regular, tower), getattr(deformable, tower)))
            num_deformable = 0
            for source, target in pairs:
                deforms = [m for m in target.modules() if isinstance(m, DeformConv2d)]
                if not deforms:
                    target.load_state_dict(source.state_dict())
                    continue
                num_deformable += 1
                deforms[0].weight.copy_(source.weight)
                deforms[0].bias.copy_(source.bias)
                assert torch.count_nonzero(source.bias) == 0  # initialized to 0
                source.weight.mul_(0.5)
            assert num_deformable == 1
        for name in ("cls_score", "bbox_pred", "objectness"):
            getattr(deformable, name).load_state_dict(getattr(regular, name).state_dict())
        deformable.scales.copy_(regular.scales)


@pytest.mark.parametrize("num_anchors", [1, 2])
def test_deformable_variant_runs_and_starts_as_regular_head(num_anchors: int) -> None:
    """DEFORMABLE_LAST_CONV: runs forward and backward on CPU, right shapes, finite, and starts
    out equal to the regular head whose last tower convs have half the weights (zero offsets,
    modulation mask 1/2)."""
    channels, num_classes = 64, 4
    torch.manual_seed(0)
    regular = make_head(channels=channels, num_classes=num_classes, num_anchors=num_anchors)
    deformable = make_head(
        channels=channels,
        num_classes=num_classes,
        num_anchors=num_anchors,
        deformable_last_conv=True,
    )
    for tower in (deformable.cls_subnet, deformable.bbox_subnet):
        assert sum(isinstance(m, DeformConv2d) for m in tower.modules()) == 1
    assert count_parameters(deformable) > count_parameters(regular)
    features = make_features(channels, batch=2)
    out_deformable = deformable(features)
    dims = (num_anchors * num_classes, num_anchors * 4, num_anchors)
    for outputs, dim in zip(out_deformable, dims):
        for (h, w), x in zip(FEATURE_SIZES, outputs):
            assert x.shape == (2, dim, h, w)
            assert bool(torch.isfinite(x).all())
    # Gradients flow through the deformable conv (including its offset/mask predictor).
    sum(x.sum() for outputs in out_deformable for x in outputs).backward()
    grads = [p.grad for p in deformable.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)

    _copy_into_deformable(regular, deformable)
    with torch.no_grad():
        expected = regular(features)
        actual = deformable(features)
    for expected_outputs, actual_outputs in zip(expected, actual):
        for e, a in zip(expected_outputs, actual_outputs):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_deformable_conv_starts_as_half_regular_conv() -> None:
    """The deformable tower conv at init: zero offsets and mask sigmoid(0) = 1/2, so its output
    is half the regular conv (no bias) plus the bias."""
    head = make_head(channels=64, num_convs=1, norm="", deformable_last_conv=True)
    conv = next(m for m in head.cls_subnet.modules() if isinstance(m, DeformConv2d))
    layer = head.cls_subnet[0]
    with torch.no_grad():
        conv.bias.normal_()
        x = torch.randn(2, 64, 6, 5)
        expected = 0.5 * nn.functional.conv2d(x, conv.weight, padding=1) + conv.bias[:, None, None]
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
