"""Datasets of musu. Importing this package registers them in Detectron2's catalogs (no I/O).

Built-in names: ``musu_synthetic_train``, ``musu_synthetic_val`` (generated on first use under
``$MUSU_CACHE_DIR``, default ``~/.cache/musu``), ``bccd_train``, ``bccd_val``, ``cards_train`` and
``cards_val`` (real data under ``$MUSU_DATASETS``). Use :func:`register_coco_dataset` for your own COCO-format data.
:mod:`musu.data.image_checks`: missing or undecodable images reported with file and dataset.
"""

from . import synthetic
from .cli import add_register_coco_argument, register_coco_datasets
from .datasets import (
    BCCD_CLASSES,
    BUILTIN_DATASETS,
    CARDS_CLASSES,
    datasets_root,
    ensure_dataset,
    register_builtin_datasets,
    register_coco_dataset,
    register_synthetic_split,
)
from .image_checks import (
    NamingMapper,
    UnreadableImageError,
    check_image_files,
    find_unreadable_images,
)

__all__ = [
    "add_register_coco_argument",
    "register_coco_datasets",
    "BCCD_CLASSES",
    "BUILTIN_DATASETS",
    "CARDS_CLASSES",
    "NamingMapper",
    "UnreadableImageError",
    "check_image_files",
    "find_unreadable_images",
    "datasets_root",
    "ensure_dataset",
    "register_builtin_datasets",
    "register_coco_dataset",
    "register_synthetic_split",
    "synthetic",
]
