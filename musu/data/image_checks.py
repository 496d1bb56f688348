"""Images that are missing or cannot be decoded, reported with their file name and dataset.

* :func:`check_image_files` (cheap: one ``stat`` per image, run by ``train_net.py`` before every
  training and evaluation): every missing file of a dataset, listed in one error.
* :func:`find_unreadable_images` (costly: decodes every image, ``train_net.py --check-data``):
  every file that is missing or that the reader cannot decode.
* :class:`NamingMapper`: wraps a dataset mapper so that an image that fails while training or
  evaluating raises :class:`UnreadableImageError` naming the file, the image id and the dataset.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence

from detectron2.data import detection_utils

__all__ = [
    "NamingMapper",
    "UnreadableImageError",
    "check_image_files",
    "find_unreadable_images",
]


class UnreadableImageError(RuntimeError):
    """An image of a dataset could not be read or decoded (the message names file and dataset)."""


def _names(dataset_names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in dataset_names) or "<unnamed>"


def _listing(problems: Sequence[str], limit: int = 20) -> str:
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"\n  {shown}{more}"


def check_image_files(records: Iterable[dict[str, Any]], dataset_names: Sequence[str]) -> None:
    """Raise ``FileNotFoundError`` listing every record whose ``file_name`` does not exist (local
    paths only; ``scheme://`` paths are not checked). One ``os.path.isfile`` per image."""
    missing = [
        f"{r['file_name']} (image id {r.get('image_id')})"
        for r in records
        if "://" not in r["file_name"] and not os.path.isfile(r["file_name"])
    ]
    if missing:
        raise FileNotFoundError(
            f"Dataset {_names(dataset_names)}: {len(missing)} image file(s) listed in its JSON do "
            f"not exist (check the image root the dataset was registered with):{_listing(missing)}"
        )


def find_unreadable_images(
    records: Iterable[dict[str, Any]], image_format: str = "BGR"
) -> list[tuple[str, str]]:
    """Decode every image with Detectron2's reader; returns ``(file_name, reason)`` for each that
    is missing or fails to decode (all of them, in order)."""
    bad = []
    for record in records:
        file_name = record["file_name"]
        try:
            detection_utils.read_image(file_name, format=image_format)
        except Exception as error:  # noqa: BLE001 - any failure of the reader is reported
            bad.append((file_name, f"{type(error).__name__}: {error}"))
    return bad


class NamingMapper:
    """``mapper(record)``, re-raising any failure as :class:`UnreadableImageError` naming the
    record's file, image id and the dataset(s). Picklable (for data loader workers)."""

    def __init__(self, mapper: Callable[[dict], Any], dataset_names: Sequence[str]) -> None:
        self.mapper = mapper
        self.dataset_names = tuple(dataset_names)

    def __call__(self, record: dict[str, Any]) -> Any:
        try:
            return self.mapper(record)
        except Exception as error:
            raise UnreadableImageError(
                f"Dataset {_names(self.dataset_names)}: image {record.get('file_name')} (image id "
                f"{record.get('image_id')}) could not be loaded: {type(error).__name__}: {error}"
            ) from error
