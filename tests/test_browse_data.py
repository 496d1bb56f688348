"""tools/browse_data.py on the synthetic paper-settings config and a Mutual Guidance config:
pictures of the stored annotations and of the training loader's output after augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import browse_data  # tools/browse_data.py (conftest.py puts tools/ on sys.path)
import cv2
import numpy as np
import pytest

from musu.data.synthetic import ensure_split

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    "configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml",
    "projects/MutualGuidance/configs/Synthetic/retinanet_mg_R_18_FPN_synthetic.yaml",
]


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory: pytest.TempPathFactory):
    return ensure_split(
        "train", tmp_path_factory.mktemp("browse"), num_images=3, seed=7, image_size=96
    )


@pytest.mark.parametrize("config", CONFIGS)
def test_annotations_and_loader_pictures(config: str, tiny_split, tmp_path: Path, capsys) -> None:
    name = f"browse_tiny_{Path(config).stem}"
    out = tmp_path / "out"
    argv = ["--config-file", str(REPO_ROOT / config), "--dataset", name, "--output", str(out)]
    argv += ["--register-coco", name, str(tiny_split.json_file), str(tiny_split.image_root)]
    argv += ["--num-images", "3", "--progress-every", "2", "--opts", "DATALOADER.NUM_WORKERS", "0"]
    # The loader resizes 96 px images to 64 px: its pictures show the augmented input.
    argv += ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"]
    assert browse_data.main(argv) == 0

    content = json.loads(Path(tiny_split.json_file).read_text())
    files = sorted(Path(image["file_name"]).stem for image in content["images"])
    annotation = sorted(out.glob("annotation/*.jpg"))
    assert [p.stem for p in annotation] == files
    # The stored annotations are drawn: the picture differs from the image far more than the
    # JPEG round trip of the image itself does.
    image = content["images"][0]
    original = cv2.imread(str(Path(tiny_split.image_root) / image["file_name"]))
    drawn = cv2.imread(str(out / "annotation" / (Path(image["file_name"]).stem + ".jpg")))
    assert drawn.shape == original.shape
    noise = cv2.imdecode(cv2.imencode(".jpg", original)[1], cv2.IMREAD_COLOR)
    drawn_diff = np.abs(drawn.astype(int) - original.astype(int)).mean()
    noise_diff = np.abs(noise.astype(int) - original.astype(int)).mean()
    assert drawn_diff > 5 * noise_diff, (drawn_diff, noise_diff)

    loader = sorted(out.glob("dataloader/*.jpg"))
    assert len(loader) == 3
    assert all(cv2.imread(str(p)).shape[:2] == (64, 64) for p in loader)
    printed = capsys.readouterr().out
    assert "[annotation 2/3]" in printed and "[dataloader 3/3]" in printed and "64x64 px" in printed


def test_source_choice_and_unknown_dataset(tiny_split, tmp_path: Path) -> None:
    config = str(REPO_ROOT / CONFIGS[0])
    out = tmp_path / "out"
    argv = ["--config-file", config, "--dataset", "browse_tiny_only", "--output", str(out)]
    argv += ["--register-coco", "browse_tiny_only", str(tiny_split.json_file)]
    argv += [str(tiny_split.image_root), "--source", "annotation", "--num-images", "1"]
    assert browse_data.main(argv) == 0
    assert len(list(out.glob("annotation/*.jpg"))) == 1 and not (out / "dataloader").exists()
    with pytest.raises(SystemExit):
        browse_data.main(["--config-file", config, "--dataset", "nope", "--output", str(out)])


def test_help_names_inputs_and_outputs(capsys) -> None:
    with pytest.raises(SystemExit):
        browse_data.main(["--help"])
    text = capsys.readouterr().out
    for item in ["--config-file", "--dataset", "--source", "annotation/", "dataloader/"]:
        assert item in text
