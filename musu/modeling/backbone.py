"""Backbone builder for MuSu: ResNet + FPN with P6/P7 computed from P5, as FCOS does."""

from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7

__all__ = ["build_musu_resnet_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_musu_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """ResNet (``MODEL.RESNETS``) + FPN (``MODEL.FPN``) giving P3-P7; P6 is a stride-2 conv on
    P5 (not on C5 as in Detectron2's RetinaNet builder), following FCOS and the MuSu paper."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
