"""Tests of the FCOS-rule assigner: hand-written boxes, and equality with Detectron2's ``FCOS``
(``label_anchors`` / ``_match_anchors`` of a real instance) on random ground truth.

Notation: N images, R points, M objects. Points are MuSu's (j + 0.5) s cell centres; Detectron2
gets the same points as anchor boxes of side s centred on them.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.structures import Boxes, Instances
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from musu.modeling.assigners import (
    ASSIGNER_REGISTRY,
    AnchorGrid,
    AnchorList,
    FCOSAssigner,
    build_fcos_assigner,
)

STRIDES = [8, 16, 32, 64, 128]
NUM_CLASSES = 4


def feature_sizes(height: int, width: int) -> List[Tuple[int, int]]:
    return [(-(-height // s), -(-width // s)) for s in STRIDES]


def assign(boxes_per_image: List[Tensor], height: int, width: int, radius: float = 1.5):
    grid = AnchorGrid(tuple(feature_sizes(height, width)), tuple(STRIDES), 1)
    points, strides = grid.points(), grid.point_strides()
    num_images, num_points = len(boxes_per_image), len(points)
    classes = [torch.arange(len(b)) % NUM_CLASSES for b in boxes_per_image]
    result = FCOSAssigner(center_sampling_radius=radius)(
        grid,
        torch.zeros(num_images, num_points, NUM_CLASSES),
        torch.zeros(num_images, num_points, 4),
        boxes_per_image,
        classes,
    )
    return result, points, strides


class _FakeBackbone(Backbone):
    """Only ``output_shape`` matters: FCOS reads the strides of its input features."""

    def forward(self, x: Tensor) -> Dict[str, Tensor]:  # pragma: no cover - never called
        raise NotImplementedError

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {f"p{k + 3}": ShapeSpec(channels=8, stride=s) for k, s in enumerate(STRIDES)}


def detectron2_fcos(radius: float) -> FCOS:
    backbone = _FakeBackbone()
    shapes = list(backbone.output_shape().values())
    head = FCOSHead(input_shape=shapes, conv_dims=[8], num_classes=NUM_CLASSES)
    return FCOS(
        backbone=backbone,
        head=head,
        head_in_features=list(backbone.output_shape()),
        num_classes=NUM_CLASSES,
        center_sampling_radius=radius,
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    )


def random_boxes(gen: torch.Generator, num: int, height: int, width: int) -> Tensor:
    """Corners on a 4 px grid (areas are multiples of 16, so Detectron2's float32 quality
    1e8 - area is exact and its ties are true area ties), sizes 4 px to 1.25x the image, some
    boxes crossing the border, some exact copies and transposes (equal areas)."""
    size = (torch.randint(1, 80, (num, 2), generator=gen) * 4).float()
    size = torch.minimum(size, torch.tensor([width * 1.25, height * 1.25]).floor() // 4 * 4)
    corner = (torch.randint(-8, 80, (num, 2), generator=gen) * 4).float()
    boxes = torch.cat([corner, corner + size], dim=1)
    if num >= 3:
        boxes[1] = boxes[0]  # identical boxes: the lower index wins
        w, h = boxes[2, 2] - boxes[2, 0], boxes[2, 3] - boxes[2, 1]
        boxes[num - 1] = torch.stack([boxes[2, 0], boxes[2, 1], boxes[2, 0] + h, boxes[2, 1] + w])
    return boxes


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from([(256, 256), (320, 192), (200, 264)]),
    st.sampled_from([1.5, 2.5, 0.75]),
)
def test_matches_detectron2_fcos(seed: int, size: Tuple[int, int], radius: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    height, width = size
    counts = [int(torch.randint(0, 14, (), generator=gen)) for _ in range(3)]
    boxes = [random_boxes(gen, m, height, width) for m in counts]
    result, points, strides = assign(boxes, height, width, radius)

    fcos = detectron2_fcos(radius)
    anchors, start = [], 0
    for s, (h, w) in zip(STRIDES, feature_sizes(height, width)):
        level = points[start : start + h * w]
        anchors.append(Boxes(torch.cat([level - s / 2, level + s / 2], dim=1)))
        start += h * w
    instances = []
    for b in boxes:
        inst = Instances((height, width), gt_boxes=Boxes(b))
        inst.gt_classes = torch.arange(len(b)) % NUM_CLASSES
        instances.append(inst)
    d2_labels, d2_boxes = fcos.label_anchors(anchors, instances)
    for n, b in enumerate(boxes):
        if len(b):
            quality = fcos._match_anchors(Boxes(b), anchors)  # (M, R)
            value, d2_index = quality.max(dim=0)
            d2_index[value < 1e-5] = -1
        else:
            d2_index = torch.full((len(points),), -1)
        assert torch.equal(result.gt_index[n], d2_index)
        ours_labels = torch.where(
            result.gt_index[n] >= 0, (result.gt_index[n] % NUM_CLASSES), NUM_CLASSES
        )
        assert torch.equal(ours_labels, d2_labels[n])
        positive = result.gt_index[n] >= 0
        assert torch.equal(b[result.gt_index[n][positive]], d2_boxes[n][positive])
        assert torch.equal(result.cls_weight[n], positive.float())
        assert torch.equal(result.reg_weight[n], positive.float())
        expected_bag = torch.bincount(result.gt_index[n][positive], minlength=max(len(b), 1))
        assert torch.equal(result.stats["bag_size"][n, : len(b)], expected_bag[: len(b)])
    assert set(result.stats) == {"bag_size"}  # no temperature


def test_hand_written_boxes() -> None:
    """The 256 x 256 box of a 256 x 256 image, centre (128, 128), radius 1.5 s. By hand:
    P3 points within 12 px of the centre (124, 132) are 132 px from a side (> 64); P4 ones
    (120, 136) 136 px (> 128); P5 ones (112, 144) 144 px, inside (128, 256): positives;
    P6 ones (96, 160) 160 px (< 256); P7 ones (64, 192) 192 px (< 512)."""
    big = torch.tensor([[0.0, 0.0, 256.0, 256.0]])
    result, points, strides = assign([big], 256, 256, radius=1.5)
    pos = result.gt_index[0] >= 0
    assert sorted(points[pos].tolist()) == [[112, 112], [112, 144], [144, 112], [144, 144]]
    assert strides[pos].tolist() == [32.0] * 4
    assert int(result.stats["bag_size"][0, 0]) == 4


def test_ambiguous_point_goes_to_smallest_box_and_ties_to_lowest_index() -> None:
    small = [100.0, 100.0, 140.0, 140.0]  # P3 point (116, 116) and (124, 124) ... inside both
    large = [96.0, 96.0, 148.0, 148.0]
    same_as_small = small
    result, points, _ = assign([torch.tensor([large, small, same_as_small])], 256, 256)
    index = ((points[:, 0] == 116) & (points[:, 1] == 116)).nonzero().item()
    assert result.gt_index[0, index] == 1
    assert int(result.stats["bag_size"][0, 2]) == 0  # the duplicate never wins


def test_without_center_sampling_every_inside_point_of_the_right_level_matches() -> None:
    box = torch.tensor([[8.0, 8.0, 56.0, 40.0]])  # largest distance < 48: P3 only
    result, points, strides = assign([box], 128, 128, radius=0.0)
    inside = (points[:, 0] > 8) & (points[:, 0] < 56) & (points[:, 1] > 8) & (points[:, 1] < 40)
    assert torch.equal(result.gt_index[0] >= 0, inside & (strides == 8))
    assert int(result.stats["bag_size"][0, 0]) == 6 * 4


def test_empty_ground_truth_and_padding() -> None:
    empty = torch.zeros(0, 4)
    result, points, _ = assign([empty, torch.tensor([[0.0, 0.0, 64.0, 64.0]]), empty], 128, 128)
    assert bool((result.gt_index[[0, 2]] == -1).all())
    assert bool((result.cls_weight[[0, 2]] == 0).all())
    assert result.stats["bag_size"].shape == (3, 1) and int(result.stats["bag_size"][1, 0]) > 0
    result, _, _ = assign([empty, empty], 64, 64)
    assert result.stats["bag_size"].shape == (2, 0) and bool((result.gt_index == -1).all())


def test_explicit_points_and_strides() -> None:
    explicit = FCOSAssigner()(
        AnchorList(torch.tensor([[32.0, 32.0]]), strides=torch.tensor([8.0])),
        torch.zeros(1, 1, 1),
        torch.zeros(1, 1, 4),
        [torch.tensor([[0.0, 0.0, 64.0, 64.0]])],
        [torch.tensor([0])],
    )
    assert explicit.gt_index.tolist() == [[0]]
    with pytest.raises(ValueError, match="strides"):
        FCOSAssigner()(
            AnchorList(torch.tensor([[32.0, 32.0]])),
            torch.zeros(1, 1, 1),
            torch.zeros(1, 1, 4),
            [torch.tensor([[0.0, 0.0, 64.0, 64.0]])],
            [torch.tensor([0])],
        )


def test_registered_and_validated() -> None:
    assert ASSIGNER_REGISTRY.get("build_fcos_assigner") is build_fcos_assigner
    with pytest.raises(ValueError, match="center_sampling_radius"):
        FCOSAssigner(center_sampling_radius=-1.0)
