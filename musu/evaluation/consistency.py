"""Score/IoU consistency of a detector: does its ranking by score follow its localization quality?

Per ground-truth object j, the *overlapping predictions* are the predictions of j's class whose
IoU with j exceeds ``iou_threshold`` (default 0: any overlap). On them:

(a) ``spearman``: Spearman rank correlation between score and IoU (average ranks for ties),
    averaged over objects. Objects with fewer than 2 overlapping predictions are excluded and
    counted in ``num_few``; objects whose scores or IoUs are all equal (correlation undefined) are
    excluded and counted in ``num_constant``.
(b) ``top1``: the fraction of the same objects (>= 2 overlapping, non-constant) whose
    highest-scoring prediction is also their best-localized one, i.e. its IoU equals the maximum
    IoU (an IoU tie counts as a hit). Objects with exactly one overlapping prediction would be
    trivial hits, so they are not counted.
(c) ``top1_iou`` / ``best_iou``: mean IoU of the highest-scoring and of the best overlapping
    prediction over those objects: what NMS keeps against what it could have kept.
(d) ``top1_score``: mean over the same objects of the highest overlapping score, and
    ``num_iou50``: mean over all objects of the predictions of their class with IoU >= 0.5 (after
    NMS, every one beyond the first is a false positive at AP50).

Each metric is also given per COCO size band of the object (:data:`musu.size_bands.SIZE_BANDS`,
by the side sqrt(w x h) of its box in the evaluated image), with the band's name as suffix
(``top1_medium``, ``num_objects_large``, ...); a band without objects has no keys.

What NMS needs is consistency among its *input* candidates. A detector's final outputs are
post-NMS, where near-duplicates are already gone; to measure pre-NMS candidates, run inference
with NMS disabled: :data:`PRE_NMS_OPTS` (``MODEL.MUSU.NMS_THRESH_TEST 1.0`` keeps every box,
``TEST.DETECTIONS_PER_IMAGE`` large keeps all of them). The MuSu META_ARCH and the D2FCOS
adaptor read these keys, RetinaNet-based detectors ``MODEL.RETINANET.NMS_THRESH_TEST``; the
score threshold and per-level top-k still apply, as they do before NMS. ``tools/compare.py``
runs this pass.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from torch import Tensor
from torchvision.ops import box_iou

from ..size_bands import SIZE_BANDS, box_size_bands

__all__ = [
    "ConsistencyEvaluator",
    "PRE_NMS_OPTS",
    "object_consistency",
    "rankdata",
    "spearman",
    "summarize_consistency",
]

logger = logging.getLogger(__name__)

# Config overrides for the pre-NMS consistency pass (see the module docstring).
PRE_NMS_OPTS: List[str] = [
    "MODEL.MUSU.NMS_THRESH_TEST",
    "1.0",
    "MODEL.RETINANET.NMS_THRESH_TEST",  # RetinaNet-based detectors (projects/MutualGuidance)
    "1.0",
    "TEST.DETECTIONS_PER_IMAGE",
    "100000",
]


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-d array, ties given their average rank (as scipy's default)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start index of each run of equal values, and each element's run.
    run_start = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    run_id = np.cumsum(run_start) - 1
    starts = np.flatnonzero(run_start)
    ends = np.concatenate([starts[1:], [len(values)]])
    average = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = average[run_id]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two 1-d arrays; nan if either is constant or n < 2."""
    if len(x) < 2:
        return float("nan")
    rank_x, rank_y = rankdata(x), rankdata(y)
    rank_x -= rank_x.mean()
    rank_y -= rank_y.mean()
    denominator = np.sqrt((rank_x**2).sum() * (rank_y**2).sum())
    if denominator == 0:
        return float("nan")
    return float((rank_x * rank_y).sum() / denominator)


def object_consistency(
    pred_boxes: Tensor,
    pred_scores: Tensor,
    pred_classes: Tensor,
    gt_boxes: Tensor,
    gt_classes: Tensor,
    iou_threshold: float = 0.0,
) -> List[Dict[str, float]]:
    """One record per ground-truth object of one image.

    Args:
        pred_boxes (P, 4) XYXY, pred_scores (P,), pred_classes (P,); gt_boxes (M, 4) XYXY,
        gt_classes (M,); predictions overlap an object when same class and IoU > iou_threshold.
    Returns:
        M dicts: ``num_overlap``, ``num_iou50`` (same class, IoU >= 0.5), ``spearman`` (nan
        unless defined), ``top1`` (1/0, nan if < 2 overlapping), ``top1_iou``, ``best_iou``,
        ``top1_score`` (nan if none overlapping), and ``band`` (the name of the object's size
        band, :func:`musu.size_bands.box_size_bands`).
    """
    num_gt = len(gt_boxes)
    if num_gt == 0:
        return []
    if len(pred_boxes) == 0:
        iou = torch.zeros(num_gt, 0, dtype=torch.float64)
    else:
        iou = box_iou(gt_boxes.double(), pred_boxes.double())  # (M, P)
    same_class = gt_classes[:, None].long() == pred_classes[None, :].long()  # (M, P)
    overlap = same_class & (iou > iou_threshold)  # (M, P)
    scores = pred_scores.double().cpu().numpy()
    iou_np, overlap_np = iou.cpu().numpy(), overlap.cpu().numpy()
    near = (same_class & (iou >= 0.5)).sum(dim=1).tolist()  # (M,)
    bands = [SIZE_BANDS[b][0] for b in box_size_bands(gt_boxes.double()).tolist()]  # (M,)
    records = []
    for j in range(num_gt):
        idx = np.flatnonzero(overlap_np[j])
        record = {
            "band": bands[j],
            "num_overlap": float(len(idx)),
            "num_iou50": float(near[j]),
            "spearman": float("nan"),
            "top1": float("nan"),
            "top1_iou": float("nan"),
            "best_iou": float("nan"),
            "top1_score": float("nan"),
        }
        if len(idx) > 0:
            obj_scores, obj_ious = scores[idx], iou_np[j, idx]
            top = int(np.argmax(obj_scores))
            record["top1_score"] = float(obj_scores[top])
            record["top1_iou"] = float(obj_ious[top])
            record["best_iou"] = float(obj_ious.max())
            if len(idx) >= 2:
                record["spearman"] = spearman(obj_scores, obj_ious)
                record["top1"] = float(obj_ious[top] >= obj_ious.max())
        records.append(record)
    return records


def summarize_consistency(records: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Aggregate per-object records into the metrics described in the module docstring, over
    all objects and, for records with a ``band``, per size band (keys suffixed ``_<band>``)."""
    summary = _summarize(records)
    for name, _, _ in SIZE_BANDS:
        in_band = [r for r in records if r.get("band") == name]
        if in_band:
            summary.update({f"{k}_{name}": v for k, v in _summarize(in_band).items()})
    return summary


def _summarize(records: Sequence[Dict[str, float]]) -> Dict[str, float]:
    num_objects = len(records)
    few = [r for r in records if r["num_overlap"] < 2]
    many = [r for r in records if r["num_overlap"] >= 2]
    constant = [r for r in many if np.isnan(r["spearman"])]
    valid = [r for r in many if not np.isnan(r["spearman"])]

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in valid])) if valid else float("nan")

    def mean_all(key: str) -> float:
        return float(np.mean([r[key] for r in records])) if records else 0.0

    return {
        "spearman": mean("spearman"),
        "top1": mean("top1"),
        "top1_iou": mean("top1_iou"),
        "best_iou": mean("best_iou"),
        "top1_score": mean("top1_score"),
        "num_objects": float(num_objects),
        "num_evaluated": float(len(valid)),
        "num_few": float(len(few)),
        "num_missed": float(sum(r["num_overlap"] == 0 for r in records)),
        "num_constant": float(len(constant)),
        "mean_overlap": mean_all("num_overlap"),
        "num_iou50": mean_all("num_iou50"),
    }


def _ground_truth(dataset_name: str) -> Dict[int, Dict[str, Tensor]]:
    """image_id -> {"boxes": (M, 4) XYXY_ABS, "classes": (M,)} (crowd boxes dropped)."""
    ground_truth = {}
    for record in DatasetCatalog.get(dataset_name):
        annotations = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
        ground_truth[record["image_id"]] = {
            "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
            "classes": torch.tensor([a["category_id"] for a in annotations], dtype=torch.long),
        }
    return ground_truth


class ConsistencyEvaluator(DatasetEvaluator):
    """Detectron2 ``DatasetEvaluator`` of score/IoU consistency (metrics: module docstring).

    Measures whatever the model outputs; for pre-NMS candidates build the model with
    :data:`PRE_NMS_OPTS` merged into its config. Results are under the task ``"consistency"``.
    """

    def __init__(self, dataset_name: str, iou_threshold: float = 0.0) -> None:
        self._dataset_name = dataset_name
        self._iou_threshold = float(iou_threshold)
        self._ground_truth = _ground_truth(dataset_name)
        self._records: List[Dict[str, float]] = []

    def reset(self) -> None:
        self._records = []

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            gt = self._ground_truth[inp["image_id"]]
            instances = out["instances"].to("cpu")
            self._records.extend(
                object_consistency(
                    instances.pred_boxes.tensor,
                    instances.scores,
                    instances.pred_classes,
                    gt["boxes"],
                    gt["classes"],
                    self._iou_threshold,
                )
            )

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        if comm.get_world_size() > 1:
            comm.synchronize()
            gathered = comm.gather(self._records, dst=0)
            if not comm.is_main_process():
                return {}
            records = list(itertools.chain(*gathered))
        else:
            records = self._records
        summary = summarize_consistency(records)
        logger.info(f"Consistency on {self._dataset_name}: {summary}")
        return OrderedDict(consistency=summary)
