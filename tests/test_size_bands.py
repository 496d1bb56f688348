"""musu.evaluation.size_bands: AP / AP50 / AP75 and object counts per COCO size band, checked
against values worked out by hand for tiny ground truths and detections."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from musu.evaluation import evaluate_size_bands, size_band_metrics

# One class; boxes XYWH far apart (no overlap across objects).
SMALL = [10.0, 10.0, 20.0, 20.0]  # area 400 < 32²
MEDIUM = [100.0, 10.0, 50.0, 50.0]  # area 2500 in [32², 96²]
LARGE = [200.0, 200.0, 100.0, 100.0]  # area 10000 > 96²
# Shifted right by 10: intersection 40 x 50, union 60 x 50, IoU 2/3: a hit at IoU 0.50..0.65
# (4 of COCO's 10 thresholds), a miss at 0.70..0.95.
MEDIUM_SHIFTED = [110.0, 10.0, 50.0, 50.0]


def _gt(boxes) -> dict:
    return {
        "images": [{"id": 1, "width": 320, "height": 320, "file_name": "a.png"}],
        "categories": [{"id": 7, "name": "thing"}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": 7, "bbox": box, "iscrowd": 0,
             "area": box[2] * box[3]}
            for i, box in enumerate(boxes)
        ],
    }  # fmt: skip


def _det(box, score) -> dict:
    return {"image_id": 1, "category_id": 7, "bbox": box, "score": score}


def _cocoeval(gt: dict, dets: list) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluation = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


DETECTIONS = [_det(SMALL, 0.9), _det(MEDIUM_SHIFTED, 0.8)]
EXPECTED = {
    "AP-small": 100.0, "AP50-small": 100.0, "AP75-small": 100.0, "objects-small": 1,
    "AP-medium": 40.0, "AP50-medium": 100.0, "AP75-medium": 0.0, "objects-medium": 1,
    "AP-large": 0.0, "AP50-large": 0.0, "AP75-large": 0.0, "objects-large": 1,
}  # fmt: skip


def test_hand_made_bands() -> None:
    evaluation = _cocoeval(_gt([SMALL, MEDIUM, LARGE]), DETECTIONS)
    metrics = size_band_metrics(evaluation)
    assert set(metrics) == set(EXPECTED)
    for key, value in EXPECTED.items():
        assert metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    # AP per band is COCOeval.summarize's APs / APm / APl (stats[3:6], fractions)
    assert [metrics[f"AP-{b}"] for b in ("small", "medium", "large")] == pytest.approx(
        list(evaluation.stats[3:6] * 100.0), rel=1e-12
    )


@pytest.mark.parametrize(
    "shift, hits, ap75",
    [
        (8.0, 5, 0.0),  # IoU 42/58 = 0.724: a hit at 0.50..0.70, a miss at 0.75
        (6.0, 6, 100.0),  # IoU 44/56 = 0.786: a hit at 0.50..0.75, a miss at 0.80
    ],
)
def test_iou_threshold_columns(shift: float, hits: int, ap75: float) -> None:
    detection = [MEDIUM[0] + shift, *MEDIUM[1:]]
    metrics = size_band_metrics(_cocoeval(_gt([MEDIUM]), [_det(detection, 0.5)]))
    # one object, one detection: precision 1 at every recall point where it hits, else 0
    assert metrics["AP-medium"] == pytest.approx(hits * 10.0, rel=1e-12)
    assert metrics["AP50-medium"] == pytest.approx(100.0, rel=1e-12)
    assert metrics["AP75-medium"] == pytest.approx(ap75, rel=1e-12, abs=1e-12)


def test_band_without_objects_is_nan() -> None:
    metrics = size_band_metrics(_cocoeval(_gt([SMALL, MEDIUM]), DETECTIONS))
    assert metrics["objects-large"] == 0
    for key in ("AP-large", "AP50-large", "AP75-large"):
        assert math.isnan(metrics[key]), key
    assert metrics["AP-small"] == pytest.approx(100.0, rel=1e-12)


def test_band_ends_are_included_and_crowd_is_not_counted() -> None:
    exactly_32 = [10.0, 100.0, 32.0, 32.0]  # area 1024: in small and in medium, as COCOeval tests
    gt = _gt([exactly_32, LARGE, MEDIUM])
    gt["annotations"][2]["iscrowd"] = 1
    metrics = size_band_metrics(_cocoeval(gt, [_det(exactly_32, 0.9)]))
    assert (metrics["objects-small"], metrics["objects-medium"], metrics["objects-large"]) == (
        1, 1, 1,
    )  # fmt: skip
    assert metrics["AP-small"] == pytest.approx(100.0, rel=1e-12)
    assert metrics["AP-medium"] == pytest.approx(100.0, rel=1e-12)


def test_not_accumulated_is_refused() -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = _gt([SMALL])
        coco_gt.createIndex()
        evaluation = COCOeval(coco_gt, coco_gt.loadRes(DETECTIONS[:1]), "bbox")
    with pytest.raises(ValueError, match="accumulate"):
        size_band_metrics(evaluation)
    evaluation.params.maxDets = [1, 10, 50]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation.evaluate()
        evaluation.accumulate()
    with pytest.raises(ValueError, match="maxDets"):
        size_band_metrics(evaluation)


def _register(tmp_path: Path, name: str, gt: dict) -> str:
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    json_file = tmp_path / "gt.json"
    json_file.write_text(json.dumps(gt))
    name = f"{name}_{abs(hash(str(tmp_path)))}"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(json_file), str(tmp_path))
    return name


def test_evaluate_size_bands_on_a_registered_dataset(tmp_path: Path) -> None:
    name = _register(tmp_path, "size_bands_tiny", _gt([SMALL, MEDIUM, LARGE]))
    results = tmp_path / "coco_instances_results.json"
    results.write_text(json.dumps(DETECTIONS))
    metrics = evaluate_size_bands(name, results)
    for key, value in EXPECTED.items():
        assert metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert evaluate_size_bands(name, DETECTIONS) == metrics  # a list works the same
    none = evaluate_size_bands(name, [])
    assert [none[f"AP-{b}"] for b in ("small", "medium", "large")] == [0.0, 0.0, 0.0]
    assert none["objects-medium"] == 1
    with pytest.raises(ValueError, match="detection 0 .*image_id 5"):
        evaluate_size_bands(name, [dict(DETECTIONS[0], image_id=5)])


def test_objects_without_area_are_refused(tmp_path: Path) -> None:
    gt = _gt([SMALL])
    del gt["annotations"][0]["area"]
    name = _register(tmp_path, "size_bands_no_area", gt)
    with pytest.raises(ValueError, match="no 'area'"):
        evaluate_size_bands(name, DETECTIONS[:1])


def test_img_ids_restrict_the_evaluation_to_the_images_run(tmp_path: Path) -> None:
    """A second image holds an undetected large object: over both images the large band scores
    0, over image 1 alone (what ``evaluate_checkpoint(max_images=1)`` runs) it has no object."""
    gt = _gt([SMALL, MEDIUM])
    gt["images"].append({"id": 2, "width": 320, "height": 320, "file_name": "b.png"})
    gt["annotations"].append(
        {"id": 9, "image_id": 2, "category_id": 7, "bbox": LARGE, "iscrowd": 0, "area": 1e4}
    )
    name = _register(tmp_path, "size_bands_two_images", gt)
    both = evaluate_size_bands(name, DETECTIONS)
    first = evaluate_size_bands(name, DETECTIONS, img_ids=[1])
    assert both["AP-large"] == 0.0 and both["objects-large"] == 1
    assert math.isnan(first["AP-large"]) and first["objects-large"] == 0
    assert first["AP-small"] == pytest.approx(both["AP-small"]) == pytest.approx(100.0)
