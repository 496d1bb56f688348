"""Registration of musu's datasets in Detectron2's ``DatasetCatalog`` / ``MetadataCatalog``.

Importing this module registers (names already registered are left alone):

* ``musu_synthetic_train`` / ``musu_synthetic_val``: the built-in synthetic shapes
  (:mod:`musu.data.synthetic`), generated under ``$MUSU_CACHE_DIR`` on first use, and
  ``musu_synthetic_{small,medium,large}_{train,val}``: the same with objects of one size band
  (:data:`musu.data.synthetic.BAND_LONGER_SIDES`), and ``musu_synthetic_medium_sparse_*``:
  medium objects, fewer per image (:data:`musu.data.synthetic.SPARSE_MAX_OBJECTS`).
* ``bccd_train`` / ``bccd_val``: BCCD blood cells in COCO format under :func:`datasets_root`.
* ``cards_train`` / ``cards_val``: playing cards (6 classes) in COCO format, same rule.

Import does no file I/O. Paths are resolved from the environment each time they are needed, and
the metadata fields ``json_file`` and ``image_root`` are computed on access by calling
:func:`ensure_dataset`: reading ``json_file`` (as ``COCOEvaluator`` does when constructed)
generates a missing synthetic split, or raises a ``FileNotFoundError`` naming the missing file and
``$MUSU_DATASETS`` for absent real data. Loading a dataset through ``DatasetCatalog.get`` does the
same before parsing the JSON with :func:`load_coco_detection_json`, which validates and cleans it
(:func:`check_coco_json`: the file parses and has ``images``, ``annotations`` and ``categories``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

from detectron2.data import DatasetCatalog, Metadata, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from . import synthetic

__all__ = [
    "BCCD_CLASSES",
    "BUILTIN_DATASETS",
    "CARDS_CLASSES",
    "COCO_REQUIRED_KEYS",
    "check_coco_json",
    "datasets_root",
    "ensure_dataset",
    "load_coco_detection_json",
    "register_builtin_datasets",
    "register_coco_dataset",
    "register_synthetic_split",
]

BCCD_CLASSES: tuple[str, ...] = ("RBC", "WBC", "Platelets")
_SYNTHETIC_SPLITS = {f"musu_synthetic_{split}": split for split in synthetic.SPLITS}
CARDS_CLASSES: tuple[str, ...] = ("nine", "ten", "jack", "queen", "king", "ace")
# Real datasets under datasets_root(): dataset name -> (folder, split, display name, classes).
_REAL_SPLITS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "bccd_train": ("bccd", "train", "BCCD", BCCD_CLASSES),
    "bccd_val": ("bccd", "val", "BCCD", BCCD_CLASSES),
    "cards_train": ("cards", "train", "Cards", CARDS_CLASSES),
    "cards_val": ("cards", "val", "Cards", CARDS_CLASSES),
}
BUILTIN_DATASETS: tuple[str, ...] = (*_SYNTHETIC_SPLITS, *_REAL_SPLITS)

logger = logging.getLogger(__name__)

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


def _real_paths(folder: str, split: str, display_name: str) -> tuple[str, str]:
    """``(json_file, image_root)`` of a real dataset under :func:`datasets_root`, i.e.
    ``<root>/<folder>/annotations/instances_<split>.json`` and ``<root>/<folder>/images``;
    ``FileNotFoundError`` naming the missing path and ``$MUSU_DATASETS`` if either is absent."""
    root = datasets_root()
    json_file = root / folder / "annotations" / f"instances_{split}.json"
    image_root = root / folder / "images"
    for path in (json_file, image_root):
        if not path.exists():
            raise FileNotFoundError(
                f"{display_name} dataset not found: {path} does not exist. Set $MUSU_DATASETS to "
                f"the folder that contains {folder}/annotations/instances_{split}.json and "
                f"{folder}/images (datasets root now: {root.resolve()}, MUSU_DATASETS="
                f"{os.environ.get('MUSU_DATASETS', '<unset>')!r})."
            )
    return str(json_file), str(image_root)


def ensure_dataset(name: str) -> tuple[str, str]:
    """Return ``(json_file, image_root)`` of dataset ``name``; both exist on return.

    Generates a missing or invalid synthetic split; raises ``FileNotFoundError`` (naming the
    missing path and ``$MUSU_DATASETS``) for absent real data (BCCD, cards). Other names are looked up in
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


def _category_error(json_file: str, dataset_name: str) -> ValueError:
    """The error for annotations whose category_id is not among the JSON's categories, naming the
    file, the first offending annotations and the known ids (the JSON is only re-read here)."""
    with open(json_file) as f:
        content = json.load(f)
    known = sorted(c["id"] for c in content.get("categories", []))
    images = {img["id"]: img.get("file_name") for img in content.get("images", [])}
    bad = [a for a in content.get("annotations", []) if a.get("category_id") not in set(known)]
    examples = "; ".join(
        f"annotation id {a.get('id')} (image id {a.get('image_id')}, "
        f"{images.get(a.get('image_id'))}) has category_id {a.get('category_id')!r}"
        for a in bad[:5]
    )
    return ValueError(
        f"{json_file} (dataset {dataset_name!r}): {len(bad)} annotation(s) have a category_id "
        f"that is not in the file's 'categories' (ids {known}): {examples}"
    )


COCO_REQUIRED_KEYS: tuple[str, ...] = ("images", "annotations", "categories")
"""Top-level lists every COCO-format detection JSON must have (``"annotations": []`` for a set of
images without labels)."""
_REGISTRATION_CHECK_MAX_BYTES = 64 << 20
_checked_files: set[tuple[str, int, int]] = set()


def _file_key(json_file: str) -> tuple[str, int, int]:
    stat = os.stat(json_file)
    return os.path.realpath(json_file), stat.st_mtime_ns, stat.st_size


def check_coco_json(json_file: str | os.PathLike, dataset_name: str) -> None:
    """Raise ``ValueError`` naming the file and the dataset unless ``json_file`` parses as JSON
    (the message gives line and column otherwise) and holds the lists :data:`COCO_REQUIRED_KEYS`
    (naming a missing key), with at least one category; ``FileNotFoundError`` if it does not
    exist. A file that passed is not read again until it changes."""
    json_file = os.fspath(json_file)
    where = f"{json_file} (dataset {dataset_name!r})"
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO JSON {where} does not exist")
    key = _file_key(json_file)
    if key in _checked_files:
        return
    with open(json_file, "rb") as f:
        raw = f.read()
    try:
        content = json.loads(raw)
    except UnicodeDecodeError as error:
        raise ValueError(f"COCO JSON {where} is not UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"COCO JSON {where} is not valid JSON: {error.msg} at line {error.lineno}, column "
            f"{error.colno} ({len(raw)} bytes; a truncated copy or another format?)"
        ) from None
    if not isinstance(content, dict):
        raise ValueError(
            f"COCO JSON {where} holds a {type(content).__name__}, not an object with the keys "
            f"{list(COCO_REQUIRED_KEYS)}"
        )
    for name in COCO_REQUIRED_KEYS:
        if name not in content:
            raise ValueError(
                f"COCO JSON {where} has no {name!r} key (it has {sorted(content)}); a COCO "
                f'detection file needs {list(COCO_REQUIRED_KEYS)} ("annotations": [] for '
                "images without labels)"
            )
        if not isinstance(content[name], list):
            raise ValueError(
                f"COCO JSON {where}: {name!r} must be a list, got {type(content[name]).__name__}"
            )
    if not content["categories"]:
        raise ValueError(f"COCO JSON {where}: 'categories' is empty; list the object classes")
    _checked_files.add(key)


def load_coco_detection_json(
    json_file: str | os.PathLike, image_root: str | os.PathLike, dataset_name: str
) -> list[dict]:
    """Detectron2's ``load_coco_json`` plus checks that name the file and the annotation.

    * A ``category_id`` missing from the JSON's ``categories``: ``ValueError``.
    * A ``bbox`` that is not 4 finite numbers: ``ValueError``.
    * A box of zero or negative width or height, or wholly outside its image: dropped, with one
      warning per file (count and examples). Detectron2's transforms would otherwise turn a
      negative-size box into a positive one (corners are re-sorted) and train on it.
    Boxes partly outside the image are kept (the mapper clips them), ``iscrowd`` objects too (the
    mapper drops them). Annotation ids are kept in each object's ``"id"``.
    The file's structure is checked first (:func:`check_coco_json`).
    """
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    check_coco_json(json_file, dataset_name)
    try:
        dicts = load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["id"])
    except KeyError as error:
        if "category_id" not in str(error):
            raise
        raise _category_error(json_file, dataset_name) from error
    dropped: list[str] = []
    for record in dicts:
        kept = []
        width, height = record["width"], record["height"]
        for obj in record["annotations"]:
            bbox = obj.get("bbox")
            where = f"annotation id {obj.get('id')} of image id {record['image_id']} " + (
                f"({record['file_name']})"
            )
            try:
                x, y, w, h = (float(v) for v in bbox)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{json_file}: {where}: bbox must be [x, y, width, height], got {bbox!r}"
                ) from None
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                raise ValueError(f"{json_file}: {where}: bbox has non-finite values {bbox!r}")
            if w <= 0 or h <= 0:
                dropped.append(f"{where}: size {w}x{h}")
                continue
            if x >= width or y >= height or x + w <= 0 or y + h <= 0:
                dropped.append(f"{where}: box {bbox} outside the {width}x{height} image")
                continue
            kept.append(obj)
        record["annotations"] = kept
    if dropped:
        logger.warning(
            "%s: dropped %d annotation(s) with an empty box or a box outside its image, e.g. %s",
            json_file,
            len(dropped),
            "; ".join(dropped[:5]),
        )
    return dicts


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
        return load_coco_detection_json(json_file, image_root, name)

    DatasetCatalog.register(name, load)
    fields = {k: v for k, v in MetadataCatalog.get(name).__dict__.items() if k != "name"}
    fields.update(thing_classes=list(classes), evaluator_type="coco")
    MetadataCatalog[name] = _LazyPathMetadata(name=name, **fields)


def register_builtin_datasets() -> None:
    """Register every name in :data:`BUILTIN_DATASETS`; already registered names are skipped,
    so calling it again is harmless. Does no file I/O."""
    for name, split in _SYNTHETIC_SPLITS.items():
        _register_lazy(name, lambda split=split: synthetic.ensure_split(split), synthetic.CLASSES)
    for name, (folder, split, display_name, classes) in _REAL_SPLITS.items():
        _register_lazy(
            name, lambda f=folder, s=split, d=display_name: _real_paths(f, s, d), classes
        )


def register_coco_dataset(
    name: str,
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Register a COCO-format detection dataset (your own data) under ``name``.

    Like Detectron2's ``register_coco_instances``, but ``DatasetCatalog.get(name)`` parses
    ``json_file`` (``file_name``s relative to ``image_root``) with the checks of
    :func:`load_coco_detection_json`; the metadata gets
    ``json_file``, ``image_root``, ``evaluator_type="coco"`` and ``metadata``; ``thing_classes``
    is filled from the JSON categories when the dataset is first loaded. Re-registering a name
    with different paths raises ``AssertionError``.

    Checked now, before any model is built: ``json_file`` exists (``FileNotFoundError``) and,
    up to 64 MiB, passes :func:`check_coco_json` (``ValueError`` naming the file and the key);
    larger files are checked when the dataset is loaded.
    """
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO JSON {json_file} of dataset {name!r} does not exist")
    if os.path.getsize(json_file) <= _REGISTRATION_CHECK_MAX_BYTES:
        check_coco_json(json_file, name)
    DatasetCatalog.register(name, lambda: load_coco_detection_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **dict(metadata or {})
    )


def register_synthetic_split(
    name: str,
    root: str | os.PathLike,
    split: str,
    *,
    num_images: int,
    seed: int,
    image_size: int = 256,
) -> synthetic.SyntheticSplit:
    """Generate (or reuse) a synthetic split of ``num_images`` images under ``root`` with
    :func:`musu.data.synthetic.ensure_split`, and register it as the COCO-format dataset
    ``name`` unless that name is already registered; returns its paths."""
    paths = synthetic.ensure_split(
        split, root, num_images=num_images, seed=seed, image_size=image_size
    )
    if name not in DatasetCatalog.list():
        register_coco_dataset(name, paths.json_file, paths.image_root)
    return paths


register_builtin_datasets()
