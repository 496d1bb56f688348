"""musu.evaluation.errors on hand-made detections with known answers, and tools/analyze_errors.py
on results files and by running the Quick start and a Mutual Guidance model (random init)."""

from __future__ import annotations

import json
from pathlib import Path

import analyze_errors  # tools/analyze_errors.py (conftest.py puts tools/ on sys.path)
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

import musu
from musu.data.synthetic import ensure_split
from musu.evaluation import (
    ImageResults,
    confusion_matrix,
    errors_markdown,
    load_coco_results,
    pr_curves,
    precision_recall,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Categories "a" (id 1) and "b" (id 3); boxes XYWH as in COCO files.
GT = {
    "images": [{"id": i, "file_name": f"{i}.png", "width": 300, "height": 300} for i in (1, 2, 3)],
    "categories": [{"id": 3, "name": "b"}, {"id": 1, "name": "a"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [20, 20, 10, 10], "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 10, 10], "iscrowd": 0},
        {"id": 4, "image_id": 3, "category_id": 1, "bbox": [0, 0, 100, 100], "iscrowd": 1},
        {"id": 5, "image_id": 3, "category_id": 1, "bbox": [200, 200, 10, 10], "iscrowd": 0},
    ],
}
RESULTS = [
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},  # a: correct
    {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "score": 0.8},  # b taken for a
    {"image_id": 1, "category_id": 3, "bbox": [50, 50, 10, 10], "score": 0.2},  # b on background
    {"image_id": 2, "category_id": 3, "bbox": [40, 40, 10, 10], "score": 0.7},  # b on background
    {"image_id": 3, "category_id": 1, "bbox": [10, 10, 10, 10], "score": 0.6},  # in a crowd
]
# Rows / columns: a, b, background (a is index 0: categories sorted by id).
EXPECTED_AT_03 = np.array([[1, 0, 1], [1, 0, 1], [0, 1, 0]])


@pytest.fixture()
def coco_files(tmp_path: Path) -> tuple[str, str]:
    gt, results = tmp_path / "gt.json", tmp_path / "results.json"
    gt.write_text(json.dumps(GT))
    results.write_text(json.dumps(RESULTS))
    return str(gt), str(results)


def test_confusion_matrix_and_precision_recall_known_answers(coco_files) -> None:
    names, images = load_coco_results(*coco_files)
    assert names == ["a", "b"]
    matrix = confusion_matrix(images, 2, score_threshold=0.3, iou_threshold=0.5)
    np.testing.assert_array_equal(matrix, EXPECTED_AT_03)
    precision, recall = precision_recall(matrix)
    np.testing.assert_allclose(precision, [0.5, 0.0])
    np.testing.assert_allclose(recall, [0.5, 0.0])
    # A lower score threshold admits the 0.2 "b" detection: one more false positive of b.
    lower = confusion_matrix(images, 2, score_threshold=0.1, iou_threshold=0.5)
    np.testing.assert_array_equal(lower, EXPECTED_AT_03 + np.array([[0] * 3, [0] * 3, [0, 1, 0]]))
    table = errors_markdown(matrix, names, 0.3, 0.5)
    assert "| b | 1 | 0 | 1 |" in table  # row of true b: taken for a once, missed once
    assert "| a | 2 | 2 | 1 | 0.500 | 0.500 |" in table


def test_iou_threshold_and_same_class_preference() -> None:
    # Detection of IoU 0.6 with its object: a match at 0.5, a false positive + a miss at 0.7.
    image = ImageResults([[0, 0, 10, 10]], [0], [[0, 0, 10, 6]], [0.9], [0])
    np.testing.assert_array_equal(confusion_matrix([image], 1, 0.0, 0.5), [[1, 0], [0, 0]])
    np.testing.assert_array_equal(confusion_matrix([image], 1, 0.0, 0.7), [[0, 1], [1, 0]])
    # Two overlapping objects; the class-1 detection overlaps the class-0 object more, yet is
    # matched to the class-1 object (same class preferred), so nothing is confused.
    two = ImageResults([[0, 0, 10, 10], [0, 0, 10, 8]], [0, 1], [[0, 0, 10, 9.5]], [0.9], [1])
    np.testing.assert_array_equal(
        confusion_matrix([two], 2, 0.0, 0.5), [[0, 0, 1], [0, 1, 0], [0, 0, 0]]
    )


def test_pr_curves_known_answers(coco_files) -> None:
    names, images = load_coco_results(*coco_files)
    a, b = pr_curves(images, len(names), iou_threshold=0.5)
    # a: 0.9 correct, 0.8 wrong (no "a" there), 0.6 inside a crowd region (ignored); 2 objects.
    np.testing.assert_allclose(a.scores, [0.9, 0.8])
    np.testing.assert_allclose(a.precision, [1.0, 0.5])
    np.testing.assert_allclose(a.recall, [0.5, 0.5])
    assert a.average_precision == pytest.approx(0.5) and a.num_gt == 2
    np.testing.assert_allclose(b.precision, [0.0, 0.0])
    assert b.average_precision == 0.0 and b.num_gt == 2


def test_bad_results_are_named(coco_files, tmp_path: Path) -> None:
    gt, _ = coco_files
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**RESULTS[0], "category_id": 2}]))
    with pytest.raises(ValueError, match="category_id 2"):
        load_coco_results(gt, str(bad))
    bad.write_text(json.dumps([{**RESULTS[0], "image_id": 9}]))
    with pytest.raises(ValueError, match="image_id 9"):
        load_coco_results(gt, str(bad))
    with pytest.raises(ValueError, match="iou_threshold"):
        confusion_matrix([], 2, 0.3, 0.0)


def test_tool_on_a_results_file(coco_files, tmp_path: Path, capsys) -> None:
    gt, results = coco_files
    out = tmp_path / "out"
    argv = ["--results", results, "--gt-json", gt, "--output", str(out)]
    assert analyze_errors.main(argv) == 0
    for name in ["confusion_matrix.png", "pr_curves.png"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    text = (out / "errors.md").read_text()
    assert "| background | 0 | 1 | 0 |" in text and "| b | 2 | 1 | 0 | 0.000 | 0.000 |" in text
    assert "| a | 1 | 0 | 1 |" in capsys.readouterr().out


def test_tool_help_names_inputs_and_outputs(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        analyze_errors.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for item in ["--results", "--config-file", "confusion_matrix.png", "errors.md", "pr_curves"]:
        assert item in text


@pytest.mark.parametrize(
    "config",
    [
        "configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml",
        "projects/MutualGuidance/configs/Synthetic/retinanet_mg_R_18_FPN_synthetic.yaml",
    ],
)
def test_tool_runs_the_model(config: str, tmp_path: Path) -> None:
    split = ensure_split("val", tmp_path / "data", num_images=2, seed=3, image_size=96)
    opts = ["MODEL.MUSU.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
    opts += ["TEST.DETECTIONS_PER_IMAGE", "4", "INPUT.MIN_SIZE_TEST", "96"]
    torch.manual_seed(0)
    model = build_model(musu.build_config(str(REPO_ROOT / config), opts))
    torch.save({"model": model.state_dict()}, tmp_path / "w.pth")
    name = f"errors_tiny_{Path(config).stem}"
    out = tmp_path / "out"
    argv = ["--config-file", str(REPO_ROOT / config), "--dataset", name, "--output", str(out)]
    argv += ["--register-coco", name, str(split.json_file), str(split.image_root)]
    argv += ["--score-threshold", "0.0", "--opts", *opts, "MODEL.WEIGHTS", str(tmp_path / "w.pth")]
    assert analyze_errors.main(argv) == 0
    results = json.loads((out / "coco_instances_results.json").read_text())
    assert len(results) == 2 * 4
    names, images = load_coco_results(
        str(split.json_file), str(out / "coco_instances_results.json")
    )
    matrix = confusion_matrix(images, len(names), 0.0, 0.5)
    assert matrix[:, :-1].sum() == len(results)  # every detection is counted once (no crowd)
    assert matrix[:-1, :].sum() == sum(len(i.gt_classes) for i in images)
    assert (out / "confusion_matrix.png").is_file() and (out / "pr_curves.png").is_file()
