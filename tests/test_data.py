"""Tests of musu.data: the synthetic generator, its cache, and the dataset registrations."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as d2_utils

from musu.data import (
    datasets_root,
    ensure_dataset,
    register_builtin_datasets,
    register_coco_dataset,
    synthetic,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMALL = dict(num_images=6, seed=123, image_size=128)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    """Every test gets its own cache dir, so nothing touches ~/.cache/musu."""
    monkeypatch.setenv("MUSU_CACHE_DIR", str(tmp_path / "cache"))


def _read(split: synthetic.SyntheticSplit) -> dict:
    return json.loads(Path(split.json_file).read_text())


def _image_bytes(split: synthetic.SyntheticSplit) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(split.image_root).iterdir())}


def test_generation_is_deterministic(tmp_path):
    a = synthetic.ensure_split("val", tmp_path / "a", **SMALL)
    b = synthetic.ensure_split("val", tmp_path / "b", **SMALL)
    assert Path(a.json_file).read_bytes() == Path(b.json_file).read_bytes()
    assert _image_bytes(a) == _image_bytes(b) and len(_image_bytes(a)) == 6
    image, objects = synthetic.render_image(123, 4, image_size=128)
    image2, objects2 = synthetic.render_image(123, 4, image_size=128)
    assert np.array_equal(image, image2) and objects == objects2
    other = synthetic.ensure_split("val", tmp_path / "c", **{**SMALL, "seed": 124})
    assert Path(other.json_file).read_bytes() != Path(a.json_file).read_bytes()


@pytest.mark.parametrize("image_format", ["jpg", "png"])
def test_json_is_valid_coco(tmp_path, image_format):
    from pycocotools.coco import COCO

    split = synthetic.ensure_split("val", tmp_path, **SMALL, image_format=image_format)
    coco = COCO(split.json_file)
    assert sorted(coco.getCatIds()) == list(range(1, len(synthetic.CLASSES) + 1))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(synthetic.CLASSES)
    assert len(coco.getImgIds()) == 6
    for img in coco.loadImgs(coco.getImgIds()):
        path = Path(split.image_root) / img["file_name"]
        assert path.suffix == "." + image_format and path.is_file()
        pixels = d2_utils.read_image(str(path), format="BGR")
        assert pixels.shape == (img["height"], img["width"], 3) == (128, 128, 3)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert 1 <= len(anns) <= 12
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img["width"] and y + h <= img["height"]
            assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h
            assert ann["category_id"] in coco.getCatIds()
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)


def test_statistics_overlaps_sizes_aspect_ratios(tmp_path):
    size = 256
    split = synthetic.ensure_split("stats", tmp_path, num_images=40, seed=7, image_size=size)
    data = _read(split)
    boxes = {}
    for ann in data["annotations"]:
        boxes.setdefault(ann["image_id"], []).append(ann["bbox"])
    counts = [len(v) for v in boxes.values()]
    assert len(boxes) == 40 and min(counts) >= 1 and max(counts) >= 8
    assert 3 <= np.mean(counts) <= 10

    def overlap(a, b):
        return min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0]) and min(
            a[1] + a[3], b[1] + b[3]
        ) > max(a[1], b[1])

    with_overlap = sum(
        any(overlap(a, b) for a, b in itertools.combinations(v, 2)) for v in boxes.values()
    )
    assert with_overlap >= 0.4 * len(boxes)

    wh = np.array([a["bbox"][2:] for a in data["annotations"]])
    long_side = wh.max(axis=1)
    assert long_side.min() <= 16 and long_side.max() >= 0.4 * size
    assert np.mean(long_side < 32) > 0.15 and np.mean(long_side > 64) > 0.15  # spread of sizes
    ratio = wh[:, 0] / wh[:, 1]
    assert np.mean(ratio < 0.6) > 0.05 and np.mean(ratio > 1.6) > 0.05
    # Occlusion: an unoccluded axis-aligned rectangle fills its box; occluded ones do not.
    rect_fill = [
        a["area"] / (a["bbox"][2] * a["bbox"][3])
        for a in data["annotations"]
        if a["category_id"] == 2
    ]
    assert np.mean(np.array(rect_fill) == 1.0) > 0.5 and np.mean(np.array(rect_fill) < 0.95) > 0.03
    per_class = {c: 0 for c in range(1, len(synthetic.CLASSES) + 1)}
    for ann in data["annotations"]:
        per_class[ann["category_id"]] += 1
    assert min(per_class.values()) >= 0.1 * len(data["annotations"])


def test_size_band_splits_hold_objects_of_their_band(tmp_path):
    """Longer sides stay in the band's range (stars stretch up to 1.25x along x); the bands are
    ordered, and a split generated without max_object_size keeps its manifest valid."""
    sides = {}
    for band, (low, high) in synthetic.BAND_LONGER_SIDES.items():
        split = synthetic.ensure_split(
            band, tmp_path, num_images=12, seed=3, min_object_size=low, max_object_size=high
        )
        wh = np.array([a["bbox"][2:] for a in _read(split)["annotations"]])
        sides[band] = wh.max(axis=1)
        # Visible extents: occlusion only shrinks a box, and no shape is drawn past 1.25 x high.
        assert sides[band].max() <= 1.25 * high + 2, band
        assert np.median(sides[band]) >= 0.5 * low, band
    assert np.median(sides["small"]) < 32 < np.median(sides["medium"]) < 96
    assert np.median(sides["large"]) > 96
    # The sparse split draws the medium band at most SPARSE_MAX_OBJECTS per image.
    counts = {}
    for name, max_objects in (("medium", 12), ("medium_sparse", synthetic.SPARSE_MAX_OBJECTS)):
        split = synthetic.ensure_split(
            name,
            tmp_path,
            num_images=12,
            seed=3,
            max_objects=max_objects,
            min_object_size=synthetic.BAND_LONGER_SIDES["medium"][0],
            max_object_size=synthetic.BAND_LONGER_SIDES["medium"][1],
        )
        ids = [a["image_id"] for a in _read(split)["annotations"]]
        counts[name] = np.bincount(ids)[np.unique(ids)]
    assert counts["medium_sparse"].max() <= synthetic.SPARSE_MAX_OBJECTS
    assert counts["medium_sparse"].mean() < counts["medium"].mean()
    default = synthetic.SyntheticConfig(num_images=3, seed=1, image_size=128)
    manifest_params = synthetic._manifest_params("val", default)
    assert "max_object_size" not in manifest_params and manifest_params["min_object_size"] == 12


def test_size_band_configs_and_registration():
    for band, (low, high) in synthetic.BAND_LONGER_SIDES.items():
        for split, images in (("train", 800), ("val", 100)):
            config = synthetic.SPLITS[f"{band}_{split}"]
            assert (config.min_object_size, config.max_object_size) == (low, high)
            assert config.num_images == images and config.image_size == 256
            meta = MetadataCatalog.get(f"musu_synthetic_{band}_{split}")
            assert meta.thing_classes == list(synthetic.CLASSES)
    medium = synthetic.BAND_LONGER_SIDES["medium"]
    for split, images in (("train", 800), ("val", 100)):
        config = synthetic.SPLITS[f"medium_sparse_{split}"]
        assert (config.min_object_size, config.max_object_size) == medium
        assert (
            config.max_objects
            == synthetic.SPARSE_MAX_OBJECTS
            < synthetic.SPLITS["medium_train"].max_objects
        )
        assert config.num_images == images and config.image_size == 256
        assert MetadataCatalog.get(f"musu_synthetic_medium_sparse_{split}").thing_classes == list(
            synthetic.CLASSES
        )
    seeds = [c.seed for c in synthetic.SPLITS.values()]
    assert len(set(seeds)) == len(seeds)  # no two built-in splits share images


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(max_object_size=200, image_size=256), "at most 3/4 of image_size"),
        (dict(min_object_size=60, max_object_size=50), "min_object_size must be in"),
        (dict(min_object_size=70, image_size=128), "min_object_size must be in"),
    ],
)
def test_size_range_errors_name_the_field(params, message):
    with pytest.raises(ValueError, match=message):
        synthetic.SyntheticConfig(num_images=1, seed=0, **params)


def test_cache_reuse_and_regeneration(tmp_path):
    split = synthetic.ensure_split("val", **SMALL)  # under $MUSU_CACHE_DIR
    assert Path(split.json_file).parent == Path(os.environ["MUSU_CACHE_DIR"]) / "synthetic_v1/val"
    json_file, first_image = Path(split.json_file), Path(split.image_root) / "000000.jpg"
    stamp = json_file.stat().st_mtime_ns, first_image.stat().st_mtime_ns
    original = json_file.read_bytes()

    assert synthetic.ensure_split("val", **SMALL) == split
    assert (json_file.stat().st_mtime_ns, first_image.stat().st_mtime_ns) == stamp

    (Path(split.image_root) / "000003.jpg").unlink()
    synthetic.ensure_split("val", **SMALL)
    assert (Path(split.image_root) / "000003.jpg").is_file()
    assert first_image.stat().st_mtime_ns != stamp[1]  # the whole split was rewritten

    json_file.write_bytes(original[: len(original) // 2])
    synthetic.ensure_split("val", **SMALL)
    assert json_file.read_bytes() == original

    with open(first_image, "r+b") as f:  # truncated image
        f.truncate(100)
    assert not synthetic.is_split_valid(json_file.parent, synthetic.SyntheticConfig(**SMALL), "val")
    synthetic.ensure_split("val", **SMALL)
    assert synthetic.is_split_valid(json_file.parent, synthetic.SyntheticConfig(**SMALL), "val")

    bigger = synthetic.ensure_split("val", **{**SMALL, "num_images": 7})  # parameters changed
    assert len(_read(bigger)["images"]) == 7


def test_crashed_generation_leaves_no_valid_split(tmp_path, monkeypatch):
    real_write = synthetic.write_split

    def crash(out_dir, config, split=""):
        (Path(out_dir) / "images").mkdir(parents=True)
        (Path(out_dir) / "images" / "000000.jpg").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_split", crash)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_split("val", tmp_path, **SMALL)
    version_dir = tmp_path / "synthetic_v1"
    assert not (version_dir / "val").exists()
    assert not list(version_dir.glob(".val.tmp-*"))

    (version_dir / ".val.tmp-killed").mkdir()  # left by a process killed mid-generation
    monkeypatch.setattr(synthetic, "write_split", real_write)
    split = synthetic.ensure_split("val", tmp_path, **SMALL)
    assert len(_read(split)["images"]) == 6
    assert sorted(p.name for p in version_dir.iterdir()) == [".val.lock", "val"]


def test_concurrent_callers_generate_once(tmp_path, monkeypatch):
    calls = []
    real_write = synthetic.write_split

    def counting_write(*args, **kwargs):
        calls.append(1)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(synthetic, "write_split", counting_write)
    results, barrier = [], threading.Barrier(3)

    def worker():
        barrier.wait()
        results.append(synthetic.ensure_split("val", tmp_path, **SMALL))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1 and len(calls) == 1


def test_concurrent_processes(tmp_path):
    """Two processes generating the same split at once leave one valid split."""
    script = (
        "import sys\n"
        "from musu.data import synthetic\n"
        "synthetic.ensure_split('val', sys.argv[1], num_images=20, seed=5, image_size=128)\n"
    )
    args = [sys.executable, "-c", script, str(tmp_path)]
    procs = [subprocess.Popen(args) for _ in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    config = synthetic.SyntheticConfig(num_images=20, seed=5, image_size=128)
    assert synthetic.is_split_valid(tmp_path / "synthetic_v1" / "val", config, "val")
    assert sorted(p.name for p in (tmp_path / "synthetic_v1").iterdir()) == [".val.lock", "val"]


def test_detectron2_synthetic_registration():
    register_builtin_datasets()  # re-registration is harmless
    meta = MetadataCatalog.get("musu_synthetic_val")
    assert meta.thing_classes == list(synthetic.CLASSES) and meta.evaluator_type == "coco"
    # json_file is usable before the dataset is loaded (what COCOEvaluator needs).
    assert Path(meta.json_file).is_file()
    assert Path(meta.json_file).is_relative_to(os.environ["MUSU_CACHE_DIR"])

    dicts = DatasetCatalog.get("musu_synthetic_val")
    assert len(dicts) == synthetic.SPLITS["val"].num_images
    for d in dicts[:5]:
        image = d2_utils.read_image(d["file_name"], format="BGR")
        d2_utils.check_image_size(d, image)
        instances = d2_utils.annotations_to_instances(d["annotations"], image.shape[:2])
        assert len(instances) == len(d["annotations"]) >= 1
        boxes = instances.gt_boxes.tensor
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0
        assert boxes[:, 2:].max() <= 256
        assert set(instances.gt_classes.tolist()) <= set(range(len(synthetic.CLASSES)))

    from detectron2.evaluation import COCOEvaluator

    COCOEvaluator("musu_synthetic_val", output_dir=None)  # reads meta.json_file


@pytest.mark.parametrize(
    "folder, split, images, boxes, classes",
    [
        ("bccd", "val", 72, 945, ["RBC", "WBC", "Platelets"]),
        ("cards", "val", 67, 143, ["nine", "ten", "jack", "queen", "king", "ace"]),
        ("cards", "train", 296, 527, ["nine", "ten", "jack", "queen", "king", "ace"]),
    ],
)
def test_real_dataset(monkeypatch, folder, split, images, boxes, classes):
    # counts from ../shared/data/<folder>/SOURCE.md
    assert (SHARED_DATA / folder).is_dir(), f"test data missing: {SHARED_DATA / folder}"
    monkeypatch.delenv("MUSU_DATASETS", raising=False)
    assert datasets_root().resolve() == SHARED_DATA.resolve()
    name = f"{folder}_{split}"
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == images and sum(len(d["annotations"]) for d in dicts) == boxes
    assert MetadataCatalog.get(name).thing_classes == classes
    monkeypatch.setenv("MUSU_DATASETS", str(SHARED_DATA))
    expected = f"{folder}/annotations/instances_{split}.json"
    assert ensure_dataset(name)[0].endswith(expected)


@pytest.mark.parametrize("name, folder", [("bccd_val", "bccd"), ("cards_train", "cards")])
def test_real_dataset_missing(tmp_path, monkeypatch, name, folder):
    monkeypatch.setenv("MUSU_DATASETS", str(tmp_path))
    split = name.split("_")[1]
    expected = str(tmp_path / folder / "annotations" / f"instances_{split}.json")
    with pytest.raises(FileNotFoundError) as err:
        DatasetCatalog.get(name)
    assert expected in str(err.value) and "MUSU_DATASETS" in str(err.value)
    with pytest.raises(FileNotFoundError, match="MUSU_DATASETS"):
        MetadataCatalog.get(name).json_file


def test_register_coco_dataset(tmp_path):
    split = synthetic.ensure_split("custom", tmp_path, **SMALL)
    name = "musu_test_custom_coco"
    register_coco_dataset(name, Path(split.json_file), Path(split.image_root))
    try:
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == 6 and os.path.isfile(dicts[0]["file_name"])
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(synthetic.CLASSES) and meta.evaluator_type == "coco"
        assert ensure_dataset(name) == (split.json_file, split.image_root)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_register_synthetic_split_generates_registers_once(tmp_path):
    from musu.data import register_synthetic_split

    name = "reg_split_test"
    paths = register_synthetic_split(name, tmp_path, "val", num_images=3, seed=9, image_size=64)
    records = DatasetCatalog.get(name)
    assert len(records) == 3 and all(os.path.isfile(r["file_name"]) for r in records)
    assert MetadataCatalog.get(name).json_file == paths.json_file
    again = register_synthetic_split(name, tmp_path, "val", num_images=3, seed=9, image_size=64)
    assert again == paths and len(DatasetCatalog.get(name)) == 3  # no second registration
