"""Bad input to ``train_net.py``: every failure names what is wrong, and nothing written is lost.

* An image that cannot be decoded (truncated, not an image) fails training and evaluation with an
  error naming the file and the dataset; ``--check-data`` lists every bad file before training.
* A dataset JSON that names missing image files, an empty dataset, a missing config file, weights
  of another architecture (training) or another class count (evaluation): a clear error before
  the first step, and the checkpoints already in ``OUTPUT_DIR`` are left untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

import musu
from musu.data import UnreadableImageError, register_coco_dataset
from musu.data.synthetic import ensure_split
from musu.engine import AtomicCheckpointer

import train_net  # the root script (conftest.py puts the root on sys.path)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "Synthetic" / "musu_paper_R_18_FPN_1200it.yaml"


def _dataset(tmp_path: Path, name: str, break_images=None, images=None) -> tuple[Path, Path]:
    """A 4-image 64 px split copied under ``tmp_path`` and registered as ``name``;
    ``break_images(image_root, file_names)`` damages it first."""
    source = ensure_split("train", tmp_path / "source", num_images=4, seed=61, image_size=64)
    root = tmp_path / name
    shutil.copytree(source.image_root, root / "images")
    content = json.loads(Path(source.json_file).read_text())
    if images is not None:
        content["images"], content["annotations"] = images, []
    json_file = root / "annotations.json"
    json_file.write_text(json.dumps(content))
    if break_images:
        break_images(root / "images", [image["file_name"] for image in content["images"]])
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_dataset(name, json_file, root / "images")
    return json_file, root / "images"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _args(output_dir: Path, dataset: str, *flags: str, config: Path | str = CONFIG):
    argv = [
        *flags,
        "--config-file", str(config),
        "MODEL.DEVICE", "cpu",
        "OUTPUT_DIR", str(output_dir),
        "DATASETS.TRAIN", f"('{dataset}',)",
        "DATASETS.TEST", f"('{dataset}',)",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "2",
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64",
    ]  # fmt: skip
    return train_net.argument_parser().parse_args(argv)


def _existing_run(output_dir: Path) -> dict[str, bytes]:
    """Files of an earlier run in ``output_dir``; returns their content to compare later."""
    output_dir.mkdir(parents=True)
    files = {"model_0000009.pth": b"weights", "last_checkpoint": b"model_0000009.pth"}
    files["metrics.json"] = b'{"iteration": 9}\n'
    for name, content in files.items():
        (output_dir / name).write_bytes(content)
    return files


def _assert_unchanged(output_dir: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        assert (output_dir / name).read_bytes() == content, name
    assert not list(output_dir.glob("model_final*"))


def test_undecodable_image_names_file_and_dataset_in_training_and_evaluation(
    tmp_path: Path,
) -> None:
    def damage(root: Path, names: list[str]) -> None:
        _truncate(root / names[2])

    _dataset(tmp_path, "inputs_truncated", damage)
    cfg = train_net.setup(_args(tmp_path / "out", "inputs_truncated"))
    loader = iter(train_net.Trainer.build_train_loader(cfg))
    with pytest.raises(UnreadableImageError) as raised:
        for _ in range(4):  # 2 batches of 2 cover the 4 images
            next(loader)
    message = str(raised.value)
    assert "'inputs_truncated'" in message and "000002.jpg" in message and "truncated" in message

    with pytest.raises(UnreadableImageError, match=r"'inputs_truncated'.*000002\.jpg"):
        list(train_net.Trainer.build_test_loader(cfg, "inputs_truncated"))


def test_check_data_lists_every_bad_file_before_training(tmp_path: Path) -> None:
    def damage(root: Path, names: list[str]) -> None:
        _truncate(root / names[0])
        (root / names[3]).write_text("not an image")

    _dataset(tmp_path, "inputs_check", damage)
    output_dir = tmp_path / "out"
    files = _existing_run(output_dir)
    with pytest.raises(UnreadableImageError) as raised:
        train_net.main(_args(output_dir, "inputs_check", "--check-data", "--resume"))
    message = str(raised.value)
    assert "2 image(s) cannot be read" in message
    assert "inputs_check: " in message and "000000.jpg" in message and "000003.jpg" in message
    assert "000001.jpg" not in message and "000002.jpg" not in message
    _assert_unchanged(output_dir, files)


def test_missing_image_files_are_listed_before_training_and_evaluation(tmp_path: Path) -> None:
    def damage(root: Path, names: list[str]) -> None:
        (root / names[1]).unlink()
        (root / names[2]).unlink()

    _dataset(tmp_path, "inputs_missing", damage)
    output_dir = tmp_path / "out"
    files = _existing_run(output_dir)
    with pytest.raises(FileNotFoundError) as raised:
        train_net.main(_args(output_dir, "inputs_missing", "--resume"))
    message = str(raised.value)
    assert "'inputs_missing'" in message and "2 image file(s)" in message
    assert "000001.jpg" in message and "000002.jpg" in message
    _assert_unchanged(output_dir, files)
    cfg = train_net.setup(_args(tmp_path / "eval", "inputs_missing", "--eval-only"))
    with pytest.raises(FileNotFoundError, match="(?s)'inputs_missing'.*000001.jpg"):
        train_net.Trainer.build_test_loader(cfg, "inputs_missing")
    _assert_unchanged(output_dir, files)


def test_empty_dataset_and_missing_config_fail_naming_them(tmp_path: Path) -> None:
    _dataset(tmp_path, "inputs_empty", images=[])
    output_dir = tmp_path / "out"
    files = _existing_run(output_dir)
    with pytest.raises(AssertionError, match="inputs_empty"):
        train_net.main(_args(output_dir, "inputs_empty", "--resume"))
    _assert_unchanged(output_dir, files)

    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        train_net.main(_args(output_dir, "inputs_empty", config=missing))
    with pytest.raises(ValueError, match="--config-file is required"):
        train_net.main(_args(output_dir, "inputs_empty", config=""))
    _assert_unchanged(output_dir, files)


def test_weights_of_another_class_count_or_architecture_fail_naming_the_file(
    tmp_path: Path,
) -> None:
    _dataset(tmp_path, "inputs_weights")
    three_classes = build_model(
        musu.build_config(CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.MUSU.NUM_CLASSES", "3"])
    )
    AtomicCheckpointer(three_classes, str(tmp_path)).save("three_classes")
    other = {"model": {"layer.weight": torch.zeros(2, 2), "layer.bias": torch.zeros(2)}}
    torch.save(other, tmp_path / "other_architecture.pth")
    output_dir = tmp_path / "out"
    files = _existing_run(output_dir)

    # Evaluation needs all of the model's weights: 3-class weights for a 5-class model fail.
    weights = ["MODEL.WEIGHTS", str(tmp_path / "three_classes.pth")]
    args = _args(output_dir, "inputs_weights", "--eval-only")
    args.opts += weights
    with pytest.raises(ValueError) as raised:
        train_net.main(args)
    message = str(raised.value)
    assert "three_classes.pth" in message and "head.cls_score" in message
    assert "MODEL.MUSU.NUM_CLASSES" in message
    with pytest.raises(ValueError, match="--eval-only needs weights"):
        train_net.main(_args(output_dir / "empty", "inputs_weights", "--eval-only"))

    # Training accepts partly fitting weights (fine-tuning) but not weights that fit nothing.
    args = _args(output_dir, "inputs_weights")
    args.opts += ["MODEL.WEIGHTS", str(tmp_path / "other_architecture.pth")]
    with pytest.raises(ValueError, match=r"other_architecture\.pth fill none of the model"):
        train_net.main(args)
    _assert_unchanged(output_dir, files)
