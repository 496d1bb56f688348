"""tools/demo.py on the synthetic paper-settings config and a Mutual Guidance config (random-init
weights): images and folders, a short video made here with OpenCV, --webcam, --register-coco,
--json-out."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import demo  # tools/demo.py (conftest.py puts tools/ on sys.path)
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from pycocotools.coco import COCO

import musu
from musu.data.synthetic import ensure_split

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "musu": REPO_ROOT / "configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml",
    "mg": REPO_ROOT
    / "projects/MutualGuidance/configs/Synthetic/retinanet_mg_R_18_FPN_synthetic.yaml",
}
# Every random-init detection kept, few per image, small inputs.
OPTS = [
    "MODEL.MUSU.SCORE_THRESH_TEST", "0.0",
    "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
    "TEST.DETECTIONS_PER_IMAGE", "3",
    "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "128",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory: pytest.TempPathFactory):
    return ensure_split(
        "val", tmp_path_factory.mktemp("demo_data"), num_images=3, seed=5, image_size=96
    )


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def weights(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """(config file, opts with MODEL.WEIGHTS of a random-init checkpoint of that config)."""
    config = str(CONFIGS[request.param])
    torch.manual_seed(0)
    model = build_model(musu.build_config(config, OPTS))
    path = tmp_path_factory.mktemp("weights") / f"{request.param}.pth"
    torch.save({"model": model.state_dict()}, path)
    return config, OPTS + ["MODEL.WEIGHTS", str(path)]


def test_help_names_inputs_and_outputs(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ["--input", "--video-input", "--webcam", "--output", "--json-out"]:
        assert option in text
    assert "--register-coco" in text and "--confidence-threshold" in text


def test_images_folder_with_registered_names_and_json(weights, tiny_split, tmp_path, capsys):
    config, opts = weights
    name = f"demo_tiny_{Path(config).stem}"
    out, json_out = tmp_path / "out", tmp_path / "results.json"
    argv = ["--config-file", config, "--input", str(tiny_split.image_root), "--output", str(out)]
    argv += ["--register-coco", name, str(tiny_split.json_file), str(tiny_split.image_root)]
    argv += ["--json-out", str(json_out), "--confidence-threshold", "0.0", "--progress-every", "2"]
    assert demo.main(argv + ["--opts", *opts]) == 0

    images = sorted(p.stem for p in Path(tiny_split.image_root).iterdir())
    assert sorted(p.stem for p in out.glob("*.jpg")) == images
    drawn = cv2.imread(str(out / f"{images[0]}.jpg"))
    assert drawn is not None and drawn.shape[:2] == (96, 96)
    printed = capsys.readouterr().out.splitlines()
    progress = [line for line in printed if line.startswith("[")]
    assert [line.split("]")[0] for line in progress] == ["[2/3", "[3/3"]

    # COCO results with the dataset's own ids: pycocotools evaluates them against the JSON.
    results = json.loads(json_out.read_text())
    assert len(results) == 3 * len(images)  # TEST.DETECTIONS_PER_IMAGE, threshold 0
    gt = COCO(str(tiny_split.json_file))
    assert {r["image_id"] for r in results} == set(gt.getImgIds())
    assert {r["category_id"] for r in results} <= set(gt.getCatIds())
    assert all(len(r["bbox"]) == 4 and 0.0 <= r["score"] <= 1.0 for r in results)
    assert len(gt.loadRes(str(json_out)).getAnnIds()) == len(results)


def test_confidence_threshold_filters(weights, tiny_split, tmp_path) -> None:
    config, opts = weights
    json_out = tmp_path / "results.json"
    argv = ["--config-file", config, "--input", str(tiny_split.image_root)]
    argv += ["--output", str(tmp_path), "--json-out", str(json_out)]
    demo.main(argv + ["--confidence-threshold", "1.0", "--opts", *opts])
    assert json.loads(json_out.read_text()) == []
    with pytest.raises(SystemExit):  # a threshold outside [0, 1] is a usage error
        demo.main(argv + ["--confidence-threshold", "1.01", "--opts", *opts])


def test_video_in_annotated_video_out(weights, tmp_path) -> None:
    config, opts = weights
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (128, 96))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for i in range(5):
        frame = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        cv2.rectangle(frame, (10 + 8 * i, 20), (60 + 8 * i, 70), (0, 0, 255), -1)
        writer.write(frame)
    writer.release()

    out, json_out = tmp_path / "out", tmp_path / "video.json"
    argv = ["--config-file", config, "--video-input", str(video), "--output", str(out)]
    argv += ["--json-out", str(json_out), "--confidence-threshold", "0.0", "--opts", *opts]
    assert demo.main(argv) == 0
    capture = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = []
    while (read := capture.read())[0]:
        frames.append(read[1])
    capture.release()
    assert len(frames) == 5 and frames[0].shape == (96, 128, 3)
    results = json.loads(json_out.read_text())
    assert sorted({r["image_id"] for r in results}) == [0, 1, 2, 3, 4]
    assert results[0]["file_name"] == "clip#0"


def test_webcam_without_camera_is_a_clear_error(weights, tmp_path) -> None:
    config, opts = weights
    camera = cv2.VideoCapture(0)
    has_camera = camera.isOpened()
    camera.release()
    argv = ["--config-file", config, "--webcam", "--output", str(tmp_path), "--max-frames", "1"]
    if has_camera:  # a machine with a camera: one annotated frame
        assert demo.main(argv + ["--opts", *opts]) == 0
        assert (tmp_path / "webcam.mp4").is_file()
    else:
        with pytest.raises(SystemExit, match="--webcam: no camera could be opened"):
            demo.main(argv + ["--opts", *opts])


def test_missing_weights_and_inputs_are_named(tiny_split, tmp_path) -> None:
    config = str(CONFIGS["musu"])
    with pytest.raises(SystemExit):
        demo.main(["--config-file", config, "--input", "x.jpg", "--output", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        demo.list_images([str(tmp_path / "nothing_here*.jpg")])
