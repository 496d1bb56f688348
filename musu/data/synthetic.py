"""Built-in synthetic shape-detection dataset, generated deterministically and cached on disk.

The images and their boxes come from :func:`musu.data.shapes.render_image` (shapes of
:data:`CLASSES` on textured backgrounds, every labelled shape at least
:data:`MIN_VISIBLE_FRACTION` visible).

A split is a folder ``<cache root>/synthetic_v1/<split>/`` holding ``images/``,
``annotations.json`` (COCO format, category ids ``1..K``) and ``manifest.json`` (generator
version, parameters, JSON checksum, image file sizes). :func:`ensure_split` regenerates the split
when any of these does not match, generates into a temporary folder that it renames into place,
and serializes concurrent generators with a lock file, so readers never see a partial split.

The cache root is ``$MUSU_CACHE_DIR``, or ``~/.cache/musu`` when unset; it is read at call time.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from .shapes import CLASSES, MIN_VISIBLE_FRACTION, render_image

__all__ = [
    "BAND_LONGER_SIDES",
    "CLASSES",
    "GENERATOR_VERSION",
    "MIN_VISIBLE_FRACTION",
    "SPARSE_MAX_OBJECTS",
    "SPLITS",
    "SyntheticConfig",
    "SyntheticSplit",
    "cache_root",
    "ensure_split",
    "is_split_valid",
    "render_image",
    "split_dir",
    "write_split",
]

GENERATOR_VERSION = 1

ANNOTATIONS_FILE = "annotations.json"
MANIFEST_FILE = "manifest.json"
IMAGES_DIR = "images"
_JPEG_QUALITY = 92


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines the content of a split (recorded in its manifest).

    Each shape's longer side is drawn log-uniformly from ``min_object_size`` to
    ``max_object_size`` pixels (None: half the image), at most three quarters of the image.
    """

    num_images: int
    seed: int
    image_size: int = 256
    image_format: str = "jpg"
    max_objects: int = 12
    min_object_size: int = 12
    max_object_size: int | None = None

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")
        largest = self.image_size // 2 if self.max_object_size is None else self.max_object_size
        if not largest <= self.image_size * 3 // 4:
            raise ValueError(
                f"max_object_size must be at most 3/4 of image_size ({self.image_size * 3 // 4}), "
                f"got {self.max_object_size}"
            )
        if not 4 <= self.min_object_size <= largest:
            raise ValueError(
                f"min_object_size must be in [4, {largest}] (max_object_size, or image_size / 2 "
                f"when unset), got {self.min_object_size} for image_size {self.image_size}"
            )


BAND_LONGER_SIDES: dict[str, tuple[int, int]] = {
    "small": (8, 32),
    "medium": (56, 100),
    "large": (168, 192),
}
"""Longer-side ranges (px, at 256 x 256) of the size-band splits ``<band>_train`` /
``<band>_val``: these put most objects in COCO's small (area < 32^2), medium (32^2-96^2) and
large (> 96^2) bands; docs/study/size_bands.md measures the shares."""

SPARSE_MAX_OBJECTS = 4
"""``max_objects`` of the ``medium_sparse_*`` splits: medium objects (the ``medium`` band's sizes)
at about 2.5 per image, the density of the ``large`` splits, whose large objects leave room
for few (``medium_train`` holds 6.4 per image). With ``medium`` and ``large`` it separates
object size from objects per image; docs/study/size_bands.md measures both."""

SPLITS: dict[str, SyntheticConfig] = {
    "train": SyntheticConfig(num_images=800, seed=20210901),
    "val": SyntheticConfig(num_images=100, seed=20210902),
    **{
        f"{band}_{split}": SyntheticConfig(
            num_images=num_images, seed=seed, min_object_size=low, max_object_size=high
        )
        for offset, (band, (low, high)) in enumerate(BAND_LONGER_SIDES.items())
        for split, num_images, seed in (
            ("train", 800, 20210911 + offset),
            ("val", 100, 20210921 + offset),
        )
    },
    **{
        f"medium_sparse_{split}": SyntheticConfig(
            num_images=num_images,
            seed=seed,
            max_objects=SPARSE_MAX_OBJECTS,
            min_object_size=BAND_LONGER_SIDES["medium"][0],
            max_object_size=BAND_LONGER_SIDES["medium"][1],
        )
        for split, num_images, seed in (("train", 800, 20210914), ("val", 100, 20210924))
    },
}
"""Configurations of the built-in splits (``musu_synthetic_train`` / ``_val``, and
``musu_synthetic_<band>_train`` / ``_val`` for each band of :data:`BAND_LONGER_SIDES`: the same
classes and image counts, objects of one size band; ``musu_synthetic_medium_sparse_*``: medium
objects, at most :data:`SPARSE_MAX_OBJECTS` per image)."""


class SyntheticSplit(NamedTuple):
    """Paths of a generated split: COCO JSON file and the folder its ``file_name``s are under."""

    json_file: str
    image_root: str


# ---------------------------------------------------------------------------------------------
# Writing and validating a split
# ---------------------------------------------------------------------------------------------


def _manifest_params(split: str, config: SyntheticConfig) -> dict[str, Any]:
    """Recorded parameters; an unset (None) field is left out, so adding an optional field
    keeps the splits generated before it valid."""
    fields = {k: v for k, v in asdict(config).items() if v is not None}
    return {"split": split, "classes": list(CLASSES), **fields}


def write_split(out_dir: str | os.PathLike, config: SyntheticConfig, split: str = "") -> Path:
    """Write ``config.num_images`` images, ``annotations.json`` and ``manifest.json`` into
    ``out_dir`` (created if needed; not atomic: see :func:`ensure_split`).

    The written bytes depend only on ``config`` and ``split`` (the OpenCV codec aside).
    Returns the path of the COCO JSON file.
    """
    import cv2

    out = Path(out_dir)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    ext = "." + config.image_format
    params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY] if ext == ".jpg" else []
    images, annotations, sizes = [], [], {}
    for index in range(config.num_images):
        image, objects = render_image(
            config.seed,
            index,
            config.image_size,
            config.max_objects,
            config.min_object_size,
            config.max_object_size,
        )
        ok, encoded = cv2.imencode(ext, image, params)
        if not ok:
            raise RuntimeError(f"OpenCV could not encode a {ext} image")
        file_name = f"{index:06d}{ext}"
        data = encoded.tobytes()
        (out / IMAGES_DIR / file_name).write_bytes(data)
        sizes[file_name] = len(data)
        image_id = index + 1
        height, width = image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj}
            )

    coco = {
        "info": {"description": "musu synthetic shapes", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)
        ],
    }
    json_bytes = json.dumps(coco, separators=(",", ":")).encode()
    json_file = out / ANNOTATIONS_FILE
    json_file.write_bytes(json_bytes)
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "params": _manifest_params(split, config),
        "num_images": config.num_images,
        "json_sha256": hashlib.sha256(json_bytes).hexdigest(),
        "image_bytes": sizes,
    }
    # The manifest is written last: a folder without it is never considered valid.
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return json_file


def is_split_valid(directory: str | os.PathLike, config: SyntheticConfig, split: str = "") -> bool:
    """True iff ``directory`` holds a complete split written by this generator version with
    ``config``: manifest matches, JSON checksum matches and parses, and every image listed in
    the JSON exists with the size recorded in the manifest."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        if (
            manifest.get("generator_version") != GENERATOR_VERSION
            or manifest.get("params") != _manifest_params(split, config)
            or manifest.get("num_images") != config.num_images
        ):
            return False
        json_bytes = (directory / ANNOTATIONS_FILE).read_bytes()
        if hashlib.sha256(json_bytes).hexdigest() != manifest.get("json_sha256"):
            return False
        images = json.loads(json_bytes)["images"]
        sizes = manifest["image_bytes"]
        if len(images) != config.num_images:
            return False
        for image in images:
            name = image["file_name"]
            if (directory / IMAGES_DIR / name).stat().st_size != sizes[name]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """The cache root: ``$MUSU_CACHE_DIR`` if set and non-empty, else ``~/.cache/musu``."""
    env = os.environ.get("MUSU_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "musu"


def split_dir(split: str, root: str | os.PathLike | None = None) -> Path:
    """Folder of ``split`` under ``root`` (default :func:`cache_root`)."""
    base = Path(root) if root is not None else cache_root()
    return base / f"synthetic_v{GENERATOR_VERSION}" / split


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (POSIX ``flock``; no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on rename-based publishing alone
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _split_config(
    split: str, num_images: int | None, seed: int | None, **params: Any
) -> SyntheticConfig:
    """The config of ``split``: :data:`SPLITS` ``[split]`` with the given (not None) values
    replaced; ``num_images`` and ``seed`` are required for other split names."""
    given = {k: v for k, v in params.items() if v is not None}
    if split in SPLITS:
        base = asdict(SPLITS[split])
    elif num_images is None or seed is None:
        raise ValueError(
            f"unknown synthetic split {split!r} (known: {sorted(SPLITS)}): pass num_images and seed"
        )
    else:
        base = {}
    base.update(given)
    if num_images is not None:
        base["num_images"] = num_images
    if seed is not None:
        base["seed"] = seed
    return SyntheticConfig(**base)


def _remove_stale(parent: Path, split: str) -> None:
    """Delete the temporary and old folders of ``split`` that a crashed generator left."""
    for kind in ("tmp", "old"):
        for stale in parent.glob(f".{glob.escape(split)}.{kind}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _generate_and_publish(target: Path, config: SyntheticConfig, split: str) -> None:
    """Write the split into a temporary sibling of ``target``, then rename it into place
    (moving an existing ``target`` aside first). The caller holds the split's lock."""
    parent = target.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=parent))
    try:
        write_split(tmp, config, split)
        if target.exists():
            old = parent / f".{split}.old-{uuid.uuid4().hex}"
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # A generator that could not take the lock published first: keep its copy.
            if not is_split_valid(target, config, split):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_split(
    split: str,
    root: str | os.PathLike | None = None,
    *,
    num_images: int | None = None,
    seed: int | None = None,
    image_size: int | None = None,
    image_format: str | None = None,
    max_objects: int | None = None,
    min_object_size: int | None = None,
    max_object_size: int | None = None,
) -> SyntheticSplit:
    """Return the paths of ``split``, generating it first unless a valid copy is cached.

    Every argument left None takes its value from :data:`SPLITS` ``[split]`` (from
    :class:`SyntheticConfig`'s defaults for other split names, which need ``num_images`` and
    ``seed``). A cached split whose manifest, JSON or images do not match is regenerated. The
    split is generated in a temporary sibling folder and renamed into place under a lock file,
    so a crash never leaves a folder that passes :func:`is_split_valid` with wrong content, and
    concurrent callers generate it once.
    """
    config = _split_config(
        split,
        num_images,
        seed,
        image_size=image_size,
        image_format=image_format,
        max_objects=max_objects,
        min_object_size=min_object_size,
        max_object_size=max_object_size,
    )
    target = split_dir(split, root)
    result = SyntheticSplit(str(target / ANNOTATIONS_FILE), str(target / IMAGES_DIR))
    if is_split_valid(target, config, split):
        return result

    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{split}.lock"):
        if is_split_valid(target, config, split):  # another process generated it meanwhile
            return result
        _remove_stale(target.parent, split)
        _generate_and_publish(target, config, split)
    return result
