"""Registration of musu's datasets in Detectron2's ``DatasetCatalog`` / ``MetadataCatalog``.

Importing this module registers (names already registered are left alone):

* ``musu_synthetic_train`` / ``musu_synthetic_val``: the built-in synthetic shapes
  (:mod:`musu.data.synthetic`), generated under ``$MUSU_CACHE_DIR`` on first use.
* ``bccd_train`` / ``bccd_val``: BCCD blood cells in COCO format under :func:`datasets_root`.

Import does no file I/O. Paths are resolved from the environment each time they are needed, and
the metadata fields ``json_file`` and ``image_root`` are computed on access by calling
:func:`ensure_dataset`: reading ``json_file`` (as ``COCOEvaluator`` does when constructed)
generates a missing synthetic split, or raises a ``FileNotFoundError`` naming the missing file and
``$MUSU_DATASETS`` for absent real data. Loading a dataset through ``DatasetCatalog.get`` does the
same before parsing the JSON with ``load_coco_json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from detectron2.data import DatasetCatalog, Metadata, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from . import synthetic

__all__ = [
    "BCCD_CLASSES",
    "BUILTIN_DATASETS",
    "datasets_root",
    "ensure_dataset",
    "register_builtin_datasets",
    "register_coco_dataset",
]

BCCD_CLASSES: tuple[str, ...] = ("RBC", "WBC", "Platelets")
_SYNTHETIC_SPLITS = {"musu_synthetic_train": "train", "musu_synthetic_val": "val"}
_BCCD_SPLITS = {"bccd_train": "train", "bccd_val": "val"}
BUILTIN_DATASETS: tuple[str, ...] = (*_SYNTHETIC_SPLITS, *_BCCD_SPLITS)

# Where each built-in dataset's (json_file, image_root) come from; called at use time.
_RESOLVERS: dict[str, Callable[[], tuple[str, str]]] = {}


def datasets_root() -> Path:
    """Root folder of real datasets, resolved now: ``$MUSU_DATASETS`` if set and non-empty;
    else ``<repository>/../shared/data`` if that folder exists; else ``./datasets``."""
    env = os.environ.get("MUSU_DATASETS")
    if env:
        return Path(env).expanduser()
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path("datasets")


def _bccd_paths(split: str) -> tuple[str, str]:
    root = datasets_root()
    json_file = root / "bccd" / "annotations" / f"instances_{split}.json"
    image_root = root / "bccd" / "images"
    for path in (json_file, image_root):
        if not path.exists():
            raise FileNotFoundError(
                f"BCCD dataset not found: {path} does not exist. Set $MUSU_DATASETS to the folder "
                f"that contains bccd/annotations/instances_{split}.json and bccd/images "
                f"(datasets root now: {root.resolve()}, MUSU_DATASETS="
                f"{os.environ.get('MUSU_DATASETS', '<unset>')!r})."
            )
    return str(json_file), str(image_root)


def ensure_dataset(name: str) -> tuple[str, str]:
    """Return ``(json_file, image_root)`` of dataset ``name``; both exist on return.

    Generates a missing or invalid synthetic split; raises ``FileNotFoundError`` (naming the
    missing path and ``$MUSU_DATASETS``) for absent BCCD data. Other names are looked up in
    ``MetadataCatalog`` (e.g. datasets registered by :func:`register_coco_dataset`); ``KeyError``
    if the name has no ``json_file`` / ``image_root`` metadata.
    """
    if name in _RESOLVERS:
        return _RESOLVERS[name]()
    meta = MetadataCatalog.get(name)
    json_file, image_root = meta.get("json_file"), meta.get("image_root")
    if json_file is None or image_root is None:
        raise KeyError(f"dataset {name!r} has no json_file / image_root metadata")
    for path in (json_file, image_root):
        if not os.path.exists(path):
            raise FileNotFoundError(f"dataset {name!r}: {path} does not exist")
    return str(json_file), str(image_root)


class _LazyPathMetadata(Metadata):
    """Metadata whose ``json_file`` / ``image_root`` are computed by :func:`ensure_dataset` on
    each access, so they follow the environment and exist once read. Other fields are plain."""

    def __getattr__(self, key: str) -> Any:
        if key in ("json_file", "image_root") and self.__dict__.get("name") in _RESOLVERS:
            json_file, image_root = ensure_dataset(self.__dict__["name"])
            return json_file if key == "json_file" else image_root
        return super().__getattr__(key)


def _register_lazy(name: str, resolver: Callable[[], tuple[str, str]], classes: tuple) -> None:
    if name in DatasetCatalog:
        return
    _RESOLVERS[name] = resolver

    def load() -> list[dict]:
        json_file, image_root = ensure_dataset(name)
        return load_coco_json(json_file, image_root, name)

    DatasetCatalog.register(name, load)
    fields = {k: v for k, v in MetadataCatalog.get(name).__dict__.items() if k != "name"}
    fields.update(thing_classes=list(classes), evaluator_type="coco")
    MetadataCatalog[name] = _LazyPathMetadata(name=name, **fields)


def register_builtin_datasets() -> None:
    """Register every name in :data:`BUILTIN_DATASETS`; already registered names are skipped,
    so calling it again is harmless. Does no file I/O."""
    for name, split in _SYNTHETIC_SPLITS.items():
        _register_lazy(name, lambda split=split: synthetic.ensure_split(split), synthetic.CLASSES)
    for name, split in _BCCD_SPLITS.items():
        _register_lazy(name, lambda split=split: _bccd_paths(split), BCCD_CLASSES)


def register_coco_dataset(
    name: str,
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Register a COCO-format detection dataset (your own data) under ``name``.

    Thin wrapper of Detectron2's ``register_coco_instances``: ``DatasetCatalog.get(name)`` then
    parses ``json_file`` (``file_name``s relative to ``image_root``), and the metadata gets
    ``json_file``, ``image_root``, ``evaluator_type="coco"`` and ``metadata``; ``thing_classes``
    is filled from the JSON categories when the dataset is first loaded. Paths are fixed now but
    only read at load time. Re-registering a name with different paths raises ``AssertionError``.
    """
    register_coco_instances(name, dict(metadata or {}), os.fspath(json_file), os.fspath(image_root))


register_builtin_datasets()
