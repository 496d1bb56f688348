"""Start-up checks of training data against the model config (fail before the first step)."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

from detectron2.data import MetadataCatalog

__all__ = ["check_dataset_classes"]

logger = logging.getLogger(__name__)


def check_dataset_classes(
    dataset_dicts: Iterable[dict[str, Any]],
    num_classes: int,
    dataset_names: Sequence[str] = (),
    key: str = "MODEL.MUSU.NUM_CLASSES",
) -> None:
    """Raise ``ValueError`` if an annotation's contiguous ``category_id`` is outside
    ``[0, num_classes)``, naming the dataset(s), the image file, the image and annotation ids,
    the class index and the config ``key`` to change. Crowd annotations are checked too.

    Log a warning naming both numbers and ``key`` when the model has more classes than the
    datasets name (the largest ``thing_classes`` among ``dataset_names``; datasets without
    ``thing_classes`` metadata are not counted): the extra outputs never see a positive."""
    _warn_if_more_classes(num_classes, dataset_names, key)
    for record in dataset_dicts:
        for index, annotation in enumerate(record.get("annotations", ())):
            category = annotation.get("category_id")
            if isinstance(category, int) and 0 <= category < num_classes:
                continue
            annotation_id = annotation.get("id", f"#{index} of the image")
            raise ValueError(
                f"Dataset {list(dataset_names)}: annotation {annotation_id} of image "
                f"{record.get('image_id')!r} ({record.get('file_name')}) has class index "
                f"{category!r}, but the model has {key} = {num_classes} (valid indices "
                f"0..{num_classes - 1}). Set {key} to the number of classes of the dataset."
            )


def _warn_if_more_classes(num_classes: int, dataset_names: Sequence[str], key: str) -> None:
    counts = {
        name: len(MetadataCatalog.get(name).get("thing_classes", None) or [])
        for name in dataset_names
    }
    counts = {name: count for name, count in counts.items() if count}
    if counts and num_classes > max(counts.values()):
        logger.warning(
            "%s = %d, but the training data names only %d categories (%s): %d class output(s) "
            "will never see a positive example and only learn to say 'no'. Set %s = %d unless "
            "that is intended (e.g. classes added later).",
            key,
            num_classes,
            max(counts.values()),
            ", ".join(f"{name}: {count}" for name, count in counts.items()),
            num_classes - max(counts.values()),
            key,
            max(counts.values()),
        )
