"""MuSuHead: FCOS-style towers, per-level scales, implicit objectness, A anchor slots (Sec. 4.1)."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

__all__ = ["MuSuHead", "initial_anchor_shapes"]


def initial_anchor_shapes(
    num_anchors: int,
    scale_range: Sequence[float],
    aspect_ratio_range: Sequence[float],
    seed: int,
    *,
    initial_box_size: float = 2.0,
    sizes: Sequence[float] = (),
) -> Tensor:
    """(A, 2) initial (scale, aspect ratio h/w) per anchor slot; scale 1 is a 2s x 2s box.

    With A == 1 the single slot is ``(initial_box_size / 2, 1)``: with the default 2, the 2s x 2s
    box of FCOS-style initialization. With A > 1 each slot draws scale ~ U(scale_range) and aspect
    ratio ~ U(aspect_ratio_range) (paper Sec. 4.2) from a generator seeded with ``seed`` (the same
    seed gives the same shapes), then scales by ``initial_box_size / 2``. Non-empty ``sizes``
    (one side in strides per slot, ``len(sizes) == num_anchors``) replace all of that with square
    boxes of those sides.
    """
    if len(sizes) > 0:
        if len(sizes) != num_anchors:
            raise ValueError(f"{len(sizes)} anchor sizes given for {num_anchors} anchor slots")
        return torch.tensor([[size / 2.0, 1.0] for size in sizes], dtype=torch.float32)
    if num_anchors == 1:
        shapes = torch.ones(1, 2)
    else:
        generator = torch.Generator().manual_seed(int(seed))
        uniform = torch.rand(num_anchors, 2, generator=generator, dtype=torch.float64)
        low = torch.tensor([scale_range[0], aspect_ratio_range[0]], dtype=torch.float64)
        high = torch.tensor([scale_range[1], aspect_ratio_range[1]], dtype=torch.float64)
        shapes = (low + uniform * (high - low)).float()
    shapes[:, 0] *= initial_box_size / 2.0
    return shapes


class ModulatedDeformConv3x3(nn.Module):
    """3x3 modulated deformable conv (DCNv2, torchvision op); offsets and mask come from a
    zero-initialized 3x3 conv, so it starts as a regular conv with its output halved."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.offset_mask = nn.Conv2d(channels, 3 * 9, kernel_size=3, padding=1)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        self.conv = DeformConv2d(channels, channels, kernel_size=3, padding=1)
        self.weight, self.bias = self.conv.weight, self.conv.bias  # initialized like nn.Conv2d

    def forward(self, x: Tensor) -> Tensor:
        offset_mask = self.offset_mask(x)  # (N, 27, H, W)
        offset, mask = offset_mask[:, :18], offset_mask[:, 18:].sigmoid()
        return self.conv(x, offset, mask)


def _tower(in_channels: int, num_convs: int, norm: str, deformable_last: bool) -> nn.Sequential:
    layers: List[nn.Module] = []
    for index in range(num_convs):
        if deformable_last and index == num_convs - 1:
            conv = ModulatedDeformConv3x3(in_channels)
        else:
            conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.constant_(conv.bias, 0.0)
        layers.append(conv)
        if norm:
            layers.append(get_norm(norm, in_channels))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MuSuHead(nn.Module):
    """Dense head of MuSu: per level, A x C class logits, A x 4 log-distances, A objectness logits.

    Regression outputs are ``scale_l * x``; the detector decodes distances as
    ``stride * exp(scale_l * x)``, so a zero output is a 2s x 2s box. At initialization every box
    is ``initial_box_size`` strides wide and high (times its slot's scale), or, when
    ``anchor_sizes`` is given, slot a is a square of side ``anchor_sizes[a]`` strides. With
    ``num_anchors == 1`` the parameters are exactly those of Detectron2's ``FCOSHead`` plus one
    scale per level; each extra anchor adds (C + 4 + 1) * (channels * 9 + 1) parameters (paper
    Table 7).
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_anchors: int = 1,
        num_convs: int = 4,
        norm: str = "GN",
        deformable_last_conv: bool = False,
        prior_prob: float = 0.01,
        anchor_scale_range: Sequence[float] = (1.0, 2.0),
        anchor_aspect_ratio_range: Sequence[float] = (0.5, 2.0),
        anchor_init_seed: int = 0,
        initial_box_size: float = 2.0,
        anchor_sizes: Sequence[float] = (),
    ) -> None:
        super().__init__()
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(f"MuSuHead needs equal channels on all levels, got {sorted(channels)}")
        in_channels = channels.pop()
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.num_levels = len(input_shape)

        self.cls_subnet = _tower(in_channels, num_convs, norm, deformable_last_conv)
        self.bbox_subnet = _tower(in_channels, num_convs, norm, deformable_last_conv)
        self.cls_score = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        self.objectness = nn.Conv2d(in_channels, num_anchors, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(self.num_levels))

        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.normal_(self.objectness.weight, std=0.01)
        nn.init.constant_(self.objectness.bias, 0.0)
        nn.init.zeros_(self.bbox_pred.weight)  # paper: stable early mutual supervision
        shapes = initial_anchor_shapes(
            num_anchors,
            anchor_scale_range,
            anchor_aspect_ratio_range,
            anchor_init_seed,
            initial_box_size=initial_box_size,
            sizes=anchor_sizes,
        )  # (A, 2)
        with torch.no_grad():
            self.bbox_pred.bias.copy_(self.anchor_bias(shapes))

    @staticmethod
    def anchor_bias(shapes: Tensor) -> Tensor:
        """(A * 4,) bias (l, t, r, b per slot) whose decoded box is 2s * scale wide and high,
        with h / w = aspect ratio: distance_l = s * scale / sqrt(ar), distance_t = s * scale * sqrt(ar).
        """
        log_scale = shapes[:, 0].log()  # (A,)
        half_log_ratio = 0.5 * shapes[:, 1].log()
        horizontal = log_scale - half_log_ratio
        vertical = log_scale + half_log_ratio
        return torch.stack([horizontal, vertical, horizontal, vertical], dim=1).reshape(-1)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]) -> dict:
        musu = cfg.MODEL.MUSU
        return {
            "input_shape": input_shape,
            "num_classes": musu.NUM_CLASSES,
            "num_anchors": musu.NUM_ANCHORS,
            "num_convs": musu.NUM_CONVS,
            "norm": musu.NORM,
            "deformable_last_conv": musu.DEFORMABLE_LAST_CONV,
            "prior_prob": musu.PRIOR_PROB,
            "anchor_scale_range": tuple(musu.ANCHOR_SCALE_RANGE),
            "anchor_aspect_ratio_range": tuple(musu.ANCHOR_ASPECT_RATIO_RANGE),
            "anchor_init_seed": musu.ANCHOR_INIT_SEED,
            "initial_box_size": musu.INITIAL_BOX_SIZE,
            "anchor_sizes": tuple(musu.ANCHOR_SIZES),
        }

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Per level: logits (N, A*C, H, W), scaled log-distances (N, A*4, H, W),
        objectness logits (N, A, H, W)."""
        if len(features) != self.num_levels:
            raise ValueError(f"MuSuHead expects {self.num_levels} levels, got {len(features)}")
        logits, box_reg, objectness = [], [], []
        for level, feature in enumerate(features):
            logits.append(self.cls_score(self.cls_subnet(feature)))
            box_feature = self.bbox_subnet(feature)
            box_reg.append(self.bbox_pred(box_feature) * self.scales[level])
            objectness.append(self.objectness(box_feature))
        return logits, box_reg, objectness
