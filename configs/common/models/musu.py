"""MuSu as a LazyConfig model, on the classes the YAML configs build.

``model`` is the paper's COCO model (configs/Base-MuSu.yaml + COCO-Detection/musu_R_50_FPN_1x.yaml):
R-50 with frozen BN, FPN P3-P7 (P6 from P5), the FCOS-style head with GN and one anchor slot, and
the paper's assigner. ``from_scratch_r18`` turns it into the small-data model that the
YAML small-data configs build (R-18 with BN trained from scratch, a narrower FPN and head).
"""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from omegaconf import DictConfig

from musu.modeling import MuSu, MuSuAssigner, MuSuHead

LEVELS = ["p3", "p4", "p5", "p6", "p7"]

model = L(MuSu)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=True, norm="FrozenBN"),
            out_features=["res3", "res4", "res5"],
            freeze_at=2,
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        norm="",
        top_block=L(LastLevelP6P7)(in_channels=256, out_channels=256, in_feature="p5"),
        fuse_type="sum",
    ),
    head=L(MuSuHead)(
        input_shape=[ShapeSpec(channels=256)] * len(LEVELS),
        num_classes="${..num_classes}",
        num_anchors=1,
        num_convs=4,
        norm="GN",
        prior_prob=0.01,
        initial_box_size=2.0,
        anchor_sizes=(),
    ),
    head_in_features=LEVELS,
    assigner=L(MuSuAssigner)(
        theta=4.0, bag_threshold=0.1, alpha=1 / 3, tau_ratio=2.0, temperature=None, soft=True
    ),
    num_classes=80,
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    beta=4.0,
    reg_loss_weight=1.0,
    test_score_thresh=0.05,
    test_topk_candidates=1000,
    test_nms_thresh=0.6,
    max_detections_per_image=100,
    pixel_mean=[103.53, 116.28, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
)


def from_scratch_r18(model: DictConfig, *, channels: int, num_convs: int, num_classes: int) -> None:
    """Make ``model`` the small-data model: R-18 with BN from scratch (nothing frozen), an FPN and
    head of ``channels`` channels with ``num_convs`` convs per tower, ``num_classes`` classes."""
    bottom_up = model.backbone.bottom_up
    bottom_up.stem.norm = "BN"
    bottom_up.stages.depth = 18
    bottom_up.stages.norm = "BN"
    del bottom_up.stages.stride_in_1x1  # R-18's BasicBlock has a single 3x3 conv per stride
    bottom_up.freeze_at = 0
    model.backbone.out_channels = channels
    model.backbone.top_block.in_channels = channels
    model.backbone.top_block.out_channels = channels
    model.head.input_shape = [ShapeSpec(channels=channels)] * len(LEVELS)
    model.head.num_convs = num_convs
    model.num_classes = num_classes
    model.pixel_std = [57.375, 57.120, 58.395]
