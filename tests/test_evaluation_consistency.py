"""Consistency metrics on hand-made predictions: Spearman(score, IoU) and top-1 localization."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from musu.evaluation import (
    PRE_NMS_OPTS,
    ConsistencyEvaluator,
    object_consistency,
    rankdata,
    spearman,
    summarize_consistency,
)

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # one 10x10 object of class 0
# Boxes sliding right: IoU with GT = 100/100, 90/110, 80/120, 70/130 (strictly decreasing).
SHIFTED = torch.tensor([[float(dx), 0.0, 10.0 + dx, 10.0] for dx in range(4)])
IOUS = [1.0, 90 / 110, 80 / 120, 70 / 130]


def test_rankdata_average_ties() -> None:
    assert rankdata(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]


def test_spearman_hand_computed() -> None:
    # Rank differences (0, 1, 1, 0): rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([1, 3, 2, 4.0])) == pytest.approx(0.8)
    assert spearman(np.array([1, 2, 3.0]), np.array([30, 20, 10.0])) == pytest.approx(-1.0)
    assert math.isnan(spearman(np.array([1, 1, 1.0]), np.array([1, 2, 3.0])))
    assert math.isnan(spearman(np.array([1.0]), np.array([1.0])))


def test_consistent_scores_give_rho_one_and_top1_hit() -> None:
    scores = torch.tensor([0.9, 0.7, 0.5, 0.3])  # ordered like the IoUs
    (record,) = object_consistency(SHIFTED, scores, torch.zeros(4), GT, torch.tensor([0]))
    assert record["num_overlap"] == 4
    assert record["spearman"] == pytest.approx(1.0)
    assert record["top1"] == 1.0
    assert record["top1_iou"] == pytest.approx(1.0)
    assert record["best_iou"] == pytest.approx(1.0)


def test_reversed_scores_give_rho_minus_one_and_top1_miss() -> None:
    scores = torch.tensor([0.3, 0.5, 0.7, 0.9])  # best score on the worst box
    (record,) = object_consistency(SHIFTED, scores, torch.zeros(4), GT, torch.tensor([0]))
    assert record["spearman"] == pytest.approx(-1.0)
    assert record["top1"] == 0.0
    assert record["top1_iou"] == pytest.approx(IOUS[3])
    assert record["best_iou"] == pytest.approx(1.0)


def test_other_classes_and_non_overlapping_predictions_are_ignored() -> None:
    boxes = torch.cat([SHIFTED[:2], torch.tensor([[0.0, 0, 10, 10], [50.0, 50, 60, 60]])])
    scores = torch.tensor([0.9, 0.8, 0.99, 0.99])
    classes = torch.tensor([1, 1, 2, 1])  # the perfect box has the wrong class; last is far away
    (record,) = object_consistency(boxes, scores, classes, GT, torch.tensor([1]))
    assert record["num_overlap"] == 2
    assert record["spearman"] == pytest.approx(1.0)
    assert record["top1"] == 1.0


def test_iou_threshold_restricts_overlap() -> None:
    scores = torch.tensor([0.9, 0.7, 0.5, 0.3])
    (record,) = object_consistency(SHIFTED, scores, torch.zeros(4), GT, torch.tensor([0]), 0.7)
    assert record["num_overlap"] == 2  # IoUs 1.0 and 0.818 only


def test_summary_counts_excluded_objects_separately() -> None:
    gt = torch.tensor([[0.0, 0, 10, 10], [100.0, 100, 110, 110], [200.0, 200, 210, 210]])
    boxes = torch.cat(
        [
            SHIFTED,  # object 0: four predictions, reversed scores
            torch.tensor([[100.0, 100, 110, 110]]),  # object 1: a single prediction
            torch.tensor([[200.0, 200, 210, 210], [201.0, 200, 211, 210]]),  # object 2: tie
        ]
    )
    scores = torch.tensor([0.3, 0.5, 0.7, 0.9, 0.8, 0.6, 0.6])
    records = object_consistency(boxes, scores, torch.zeros(7), gt, torch.zeros(3))
    summary = summarize_consistency(
        records + object_consistency(boxes[:0], scores[:0], torch.zeros(0), GT, torch.zeros(1))
    )
    assert summary["num_objects"] == 4
    assert summary["num_evaluated"] == 1  # only object 0
    assert summary["num_few"] == 2  # the single-prediction object and the missed one
    assert summary["num_missed"] == 1
    assert summary["num_constant"] == 1  # object 2: equal scores, rho undefined
    assert summary["spearman"] == pytest.approx(-1.0)
    assert summary["top1"] == 0.0
    assert summary["mean_overlap"] == pytest.approx((4 + 1 + 2 + 0) / 4)


def test_per_band_keys_top_score_and_near_duplicates() -> None:
    """A 10 px (small) and a 50 px (medium) object; no large one, so no large keys."""
    gt = torch.tensor([[0.0, 0, 10, 10], [100.0, 100, 150, 150]])
    boxes = torch.cat(
        [
            SHIFTED,  # small object: IoUs 1, 0.818, 0.667, 0.538; scores reversed
            torch.tensor([[100.0, 100, 150, 150], [110.0, 100, 160, 150], [130.0, 100, 180, 150]]),
        ]
    )  # medium object: IoUs 1, 40 / 60, 20 / 80
    scores = torch.tensor([0.3, 0.5, 0.7, 0.9, 0.6, 0.8, 0.1])
    records = object_consistency(boxes, scores, torch.zeros(7), gt, torch.zeros(2))
    assert [r["band"] for r in records] == ["small", "medium"]
    assert [r["num_iou50"] for r in records] == [4.0, 2.0]
    assert [r["top1_score"] for r in records] == pytest.approx([0.9, 0.8])
    summary = summarize_consistency(records)
    assert summary["top1_small"] == 0.0 and summary["top1_iou_small"] == pytest.approx(IOUS[3])
    assert summary["top1_medium"] == 0.0 and summary["top1_iou_medium"] == pytest.approx(40 / 60)
    assert summary["num_iou50_medium"] == 2.0 and summary["num_objects_medium"] == 1
    assert summary["num_iou50"] == pytest.approx(3.0)
    assert summary["top1_score"] == pytest.approx((0.9 + 0.8) / 2)
    assert not any(key.endswith("_large") for key in summary)


def test_evaluator_on_a_registered_dataset() -> None:
    name = "test_consistency_tiny"
    dicts = [
        {
            "image_id": 7,
            "height": 64,
            "width": 64,
            "annotations": [
                {"bbox": [0.0, 0.0, 10.0, 10.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
                {"bbox": [30, 30, 40, 40], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1},
                {"bbox": [0, 0, 64, 64], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1,
                 "iscrowd": 1},
            ],  # fmt: skip
        }
    ]
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: dicts)
    instances = Instances((64, 64))
    second = torch.tensor([[30.0, 30, 40, 40], [31.0, 30, 41, 40], [32.0, 30, 42, 40]])
    instances.pred_boxes = Boxes(torch.cat([SHIFTED, second]))
    instances.scores = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.2, 0.6, 0.4])
    instances.pred_classes = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    evaluator = ConsistencyEvaluator(name)
    evaluator.reset()
    evaluator.process([{"image_id": 7}], [{"instances": instances}])
    result = evaluator.evaluate()["consistency"]
    assert result["num_objects"] == 2  # the crowd box is not an object
    assert result["num_evaluated"] == 2
    # Object 0: rho 1, hit. Object 1: scores (0.2, 0.6, 0.4) vs decreasing IoU: rho -0.5, miss.
    assert result["spearman"] == pytest.approx((1.0 - 0.5) / 2)
    assert result["top1"] == pytest.approx(0.5)


def test_pre_nms_opts_disable_nms_and_keep_all_candidates() -> None:
    opts = dict(zip(PRE_NMS_OPTS[::2], PRE_NMS_OPTS[1::2]))
    assert float(opts["MODEL.MUSU.NMS_THRESH_TEST"]) == 1.0
    assert float(opts["MODEL.RETINANET.NMS_THRESH_TEST"]) == 1.0
    assert int(opts["TEST.DETECTIONS_PER_IMAGE"]) >= 5 * 1000  # 5 levels x top-k 1000
