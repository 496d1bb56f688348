# LazyConfig twin of musu_R_50_FPN_1x.yaml (paper Table 1 / 5 main row): R-50 from ImageNet,
# frozen BN, 90k iterations of 16 images, A = 1.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from ..common.data.small_data import dataloader
from ..common.models.musu import model
from ..common.optim import SGD as optimizer
from ..common.schedule import multistep
from ..common.train import train

dataloader.train.dataset.names = ["coco_2017_train"]
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(800,), max_size=1333, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 16
dataloader.train.num_workers = 4
dataloader.test.dataset.names = ["coco_2017_val"]
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)
]
dataloader.test.num_workers = 4

optimizer.lr = 0.01
lr_multiplier = multistep(max_iter=90000, steps=(60000, 80000), warmup_iters=500)
train.max_iter = 90000
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.output_dir = "./output/coco/musu_R_50_FPN_1x_lazy"
train.seed = -1  # SEED -1: a random seed per run, as the YAML config
