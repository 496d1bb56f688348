"""musu.evaluation.errors on hand-made detections with known answers, and tools/analyze_errors.py
on results files and by running the synthetic paper-settings config and a Mutual Guidance model
(random init)."""

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
    a, b = pr_curves(*coco_files, iou_threshold=0.5)
    # a: 0.9 correct, 0.8 wrong (no "a" there), 0.6 inside a crowd region (ignored); 2 objects.
    # Precision 1 up to recall 0.5 (51 of COCO's 101 recall points), 0 beyond.
    np.testing.assert_allclose(a.recall, np.linspace(0, 1, 101))
    np.testing.assert_allclose(a.precision, [1.0] * 51 + [0.0] * 50)
    np.testing.assert_allclose(a.scores[:51], 0.9)
    assert a.average_precision == pytest.approx(51 / 101) and a.num_gt == 2
    np.testing.assert_allclose(b.precision, 0.0)
    assert b.average_precision == 0.0 and b.num_gt == 2


# Two classes, four images, detections at several IoUs and scores (one crowd region).
GT_EVAL = {
    "images": [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in range(4)],
    "categories": [{"id": 1, "name": "cell"}, {"id": 2, "name": "platelet"}],
    "annotations": [
        {"id": 1, "image_id": 0, "category_id": 1, "bbox": [10, 10, 40, 40], "iscrowd": 0},
        {"id": 2, "image_id": 0, "category_id": 1, "bbox": [100, 100, 30, 50], "iscrowd": 0},
        {"id": 3, "image_id": 0, "category_id": 2, "bbox": [60, 10, 12, 12], "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 60, 60], "iscrowd": 0},
        {"id": 5, "image_id": 1, "category_id": 2, "bbox": [150, 150, 20, 20], "iscrowd": 0},
        {"id": 6, "image_id": 2, "category_id": 2, "bbox": [30, 30, 15, 15], "iscrowd": 0},
        {"id": 7, "image_id": 2, "category_id": 1, "bbox": [100, 0, 100, 100], "iscrowd": 1},
        {"id": 8, "image_id": 3, "category_id": 1, "bbox": [50, 50, 80, 60], "iscrowd": 0},
    ],
}
for _ann in GT_EVAL["annotations"]:  # COCOEvaluator reads each object's area from the file
    _ann["area"] = _ann["bbox"][2] * _ann["bbox"][3]
RESULTS_EVAL = [  # XYWH, as COCOEvaluator writes them
    {"image_id": 0, "category_id": 1, "bbox": [12, 11, 40, 38], "score": 0.95},
    {"image_id": 0, "category_id": 1, "bbox": [105, 110, 30, 45], "score": 0.40},
    {"image_id": 0, "category_id": 2, "bbox": [62, 12, 12, 12], "score": 0.80},
    {"image_id": 0, "category_id": 1, "bbox": [60, 10, 12, 12], "score": 0.85},
    {"image_id": 1, "category_id": 1, "bbox": [5, 5, 60, 60], "score": 0.70},
    {"image_id": 1, "category_id": 2, "bbox": [10, 150, 20, 20], "score": 0.90},
    {"image_id": 1, "category_id": 2, "bbox": [152, 149, 19, 22], "score": 0.30},
    {"image_id": 2, "category_id": 2, "bbox": [28, 33, 15, 15], "score": 0.60},
    {"image_id": 2, "category_id": 1, "bbox": [120, 20, 30, 30], "score": 0.75},
    {"image_id": 3, "category_id": 1, "bbox": [50, 50, 60, 60], "score": 0.65},
    {"image_id": 3, "category_id": 1, "bbox": [0, 0, 30, 30], "score": 0.55},
]


def _coco_evaluator_results(gt_json: Path, name: str) -> dict:
    """Detectron2's COCOEvaluator on RESULTS_EVAL, fed as model outputs."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    register_coco_instances(name, {}, str(gt_json), str(gt_json.parent))
    DatasetCatalog.get(name)  # sets the dataset-id <-> contiguous-id metadata, as a loader does
    evaluator = COCOEvaluator(name, tasks=("bbox",), distributed=False)
    evaluator.reset()
    for image_id in range(4):
        dets = [d for d in RESULTS_EVAL if d["image_id"] == image_id]
        instances = Instances((200, 200))
        instances.pred_boxes = Boxes(
            torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)])
        )
        instances.scores = torch.tensor([d["score"] for d in dets])
        instances.pred_classes = torch.tensor([d["category_id"] - 1 for d in dets])
        evaluator.process([{"image_id": image_id}], [{"instances": instances}])
    return evaluator.evaluate()["bbox"]


def test_tool_ap50_equals_coco_evaluator(tmp_path: Path) -> None:
    gt_json, results_json = tmp_path / "gt.json", tmp_path / "results.json"
    gt_json.write_text(json.dumps(GT_EVAL))
    results_json.write_text(json.dumps(RESULTS_EVAL))
    reference = _coco_evaluator_results(gt_json, "errors_ap_equality")
    out = tmp_path / "out"
    argv = ["--results", str(results_json), "--gt-json", str(gt_json), "--output", str(out)]
    assert analyze_errors.main(argv) == 0
    text = (out / "errors.md").read_text()
    ap50 = {
        name: float(text.split(f"\n| {name} | ")[-1].split("|")[1]) for name in ("cell", "platelet")
    }
    # COCOEvaluator's AP50 is the mean of the per-class AP50 (both classes have objects).
    assert np.mean(list(ap50.values())) == pytest.approx(reference["AP50"], abs=1e-4)
    assert 0 < min(ap50.values()) and max(ap50.values()) < 100  # neither trivial
    # Per class, the mean over COCO's ten IoU thresholds is COCOEvaluator's per-class AP.
    thresholds = np.linspace(0.5, 0.95, 10)
    per_threshold = [pr_curves(str(gt_json), str(results_json), t) for t in thresholds]
    for k, name in enumerate(["cell", "platelet"]):
        ap = np.mean([curves[k].average_precision for curves in per_threshold])
        assert 100 * ap == pytest.approx(reference[f"AP-{name}"], abs=1e-9)
        assert per_threshold[0][k].average_precision * 100 == pytest.approx(ap50[name], abs=1e-4)


def test_pr_curves_without_detections(coco_files, tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    a, b = pr_curves(coco_files[0], str(empty))
    assert a.average_precision == 0.0 and b.average_precision == 0.0 and a.num_gt == 2


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
