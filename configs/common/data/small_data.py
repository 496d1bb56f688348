"""Data loaders of the small-data configs: one shortest-edge size, horizontal flips in training.

``use_dataset`` sets the dataset names, the input size and the batch, as the YAML keys
``DATASETS.TRAIN / TEST``, ``INPUT.MIN_SIZE_* / MAX_SIZE_*``, ``SOLVER.IMS_PER_BATCH`` and
``DATALOADER.NUM_WORKERS`` do.
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from omegaconf import DictConfig, OmegaConf

import musu  # noqa: F401  (registers the built-in datasets)

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names=["musu_synthetic_train"]),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(256,), max_size=256, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="BGR",
    ),
    total_batch_size=8,
    num_workers=1,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names=["musu_synthetic_val"], filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=256, max_size=256)],
        image_format="BGR",
    ),
    num_workers=1,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names[0]}")


def use_dataset(
    dataloader: DictConfig,
    *,
    train: str,
    test: str,
    min_size: int,
    max_size: int,
    batch_size: int = 8,
    num_workers: int = 1,
) -> None:
    """Train on ``train`` and evaluate on ``test`` at shortest edge ``min_size`` (longest at most
    ``max_size``), ``batch_size`` images per step over all processes."""
    dataloader.train.dataset.names = [train]
    dataloader.test.dataset.names = [test]
    resize_train, _ = dataloader.train.mapper.augmentations
    resize_train.short_edge_length = (min_size,)
    resize_train.max_size = max_size
    (resize_test,) = dataloader.test.mapper.augmentations
    resize_test.short_edge_length = min_size
    resize_test.max_size = max_size
    dataloader.train.total_batch_size = batch_size
    dataloader.train.num_workers = num_workers
    dataloader.test.num_workers = num_workers
