"""Command-line registration of COCO-format datasets, shared by ``train_net.py`` and the tools.

``add_register_coco_argument(parser)`` adds the repeatable ``--register-coco NAME JSON_FILE
IMAGE_ROOT`` option; ``register_coco_datasets(args.register_coco)`` registers each named dataset
with :func:`musu.data.register_coco_dataset` (a name already registered in this process is kept).
"""

from __future__ import annotations

import argparse
from typing import Iterable, Optional, Sequence

from detectron2.data import DatasetCatalog

from .datasets import register_coco_dataset

__all__ = ["add_register_coco_argument", "register_coco_datasets"]


def add_register_coco_argument(
    parser: argparse.ArgumentParser,
    help: str = "register a COCO-format dataset under NAME (repeatable)",  # noqa: A002
) -> None:
    """Add ``--register-coco NAME JSON_FILE IMAGE_ROOT`` (repeatable; ``None`` when absent)."""
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        metavar=("NAME", "JSON_FILE", "IMAGE_ROOT"),
        help=help,
    )


def register_coco_datasets(triples: Optional[Iterable[Sequence[str]]]) -> None:
    """Register every ``(name, json_file, image_root)`` not registered yet in this process."""
    for name, json_file, image_root in triples or []:
        if name not in DatasetCatalog.list():
            register_coco_dataset(name, json_file, image_root)
