# MuSu's head and assigner on ViTDet's backbone: a small plain ViT (ViT-Tiny widths, 6 blocks)
# with a SimpleFeaturePyramid giving P3-P7, trained from scratch on the synthetic data with the
# recommended small-data MuSu settings. A composition the YAML configs cannot express.
from functools import partial

from detectron2.config import LazyCall as L
from detectron2.modeling import SimpleFeaturePyramid, ViT
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from torch import nn

from ..common.optim import AdamW as optimizer
from .musu_R_18_FPN_1200it import dataloader, lr_multiplier, model, train

CHANNELS = 64
model.backbone = L(SimpleFeaturePyramid)(
    net=L(ViT)(
        img_size=256,
        patch_size=16,
        embed_dim=192,
        depth=6,
        num_heads=3,
        mlp_ratio=4.0,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_abs_pos=True,
        pretrain_img_size=256,
        pretrain_use_cls_token=False,
        out_feature="last_feat",
    ),
    in_feature="last_feat",
    out_channels=CHANNELS,
    scale_factors=(2.0, 1.0, 0.5),  # strides 8, 16, 32 from the ViT's stride 16: P3-P5
    top_block=L(LastLevelP6P7)(in_channels=CHANNELS, out_channels=CHANNELS, in_feature="p5"),
    norm="LN",
    square_pad=256,
)
optimizer.lr = 1e-4
train.output_dir = "./output/synthetic/musu_vitdet_tiny_1200it"
