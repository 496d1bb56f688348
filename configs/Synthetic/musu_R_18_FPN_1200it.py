# LazyConfig twin of musu_R_18_FPN_1200it.yaml (the recommended MuSu on the synthetic data):
# the same model, data and schedule; train with tools/lazyconfig_train_net.py.
from ..common.data.small_data import dataloader, use_dataset
from ..common.models.musu import from_scratch_r18, model
from ..common.optim import SGD as optimizer
from ..common.schedule import multistep
from ..common.train import train

from_scratch_r18(model, channels=64, num_convs=2, num_classes=5)
model.head.num_anchors = 2
model.head.anchor_sizes = (4.0, 8.0)
model.test_score_thresh = 0.0025

use_dataset(
    dataloader, train="musu_synthetic_train", test="musu_synthetic_val", min_size=256, max_size=256
)
optimizer.lr = 0.02
lr_multiplier = multistep(max_iter=1200, steps=(900, 1100), warmup_iters=300)
train.max_iter = 1200
train.checkpointer.period = 400
train.output_dir = "./output/synthetic/musu_R_18_FPN_1200it_lazy"
