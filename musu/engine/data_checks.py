"""Start-up checks of training data against the model config (fail before the first step)."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

__all__ = ["check_dataset_classes"]


def check_dataset_classes(
    dataset_dicts: Iterable[dict[str, Any]],
    num_classes: int,
    dataset_names: Sequence[str] = (),
    key: str = "MODEL.MUSU.NUM_CLASSES",
) -> None:
    """Raise ``ValueError`` if an annotation's contiguous ``category_id`` is outside
    ``[0, num_classes)``, naming the dataset(s), the image file, the image and annotation ids,
    the class index and the config ``key`` to change. Crowd annotations are checked too."""
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
