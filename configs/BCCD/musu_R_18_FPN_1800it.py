# LazyConfig twin of musu_R_18_FPN_1800it.yaml (the recommended MuSu for small data, on BCCD):
# the same model, data and schedule; train with tools/lazyconfig_train_net.py.
from ..common.data.small_data import dataloader, use_dataset
from ..common.models.musu import from_scratch_r18, model
from ..common.optim import SGD as optimizer
from ..common.schedule import multistep
from ..common.train import train

from_scratch_r18(model, channels=128, num_convs=4, num_classes=3)
model.head.num_anchors = 2
model.head.anchor_sizes = (4.0, 8.0)
model.test_score_thresh = 0.0025

use_dataset(dataloader, train="bccd_train", test="bccd_val", min_size=320, max_size=427)
optimizer.lr = 0.02
lr_multiplier = multistep(max_iter=1800, steps=(1260, 1620), warmup_iters=150)
train.max_iter = 1800
train.checkpointer.period = 100
train.output_dir = "./output/bccd/musu_R_18_FPN_1800it_lazy"
