"""COCO AP, AP50 and AP75 per object size band, and the number of objects in each band.

COCO's summary (``COCOeval.summarize``, Detectron2's ``COCOEvaluator``) reports one number per
size band, ``APs`` / ``APm`` / ``APl`` (AP at IoU 0.50:0.95). This module reads the same
accumulated precision table to give AP50 and AP75 per band as well:

* :func:`size_band_metrics`: from a pycocotools ``COCOeval`` after ``evaluate()`` and
  ``accumulate()``;
* :func:`evaluate_size_bands`: from the detections of a registered Detectron2 dataset, e.g. the
  ``coco_instances_results.json`` that ``COCOEvaluator(dataset, output_dir=DIR)`` writes in
  ``DIR``; ground truth from the dataset's ``json_file`` metadata (Detectron2's
  ``convert_to_coco_json`` writes one when the dataset has none, as ``COCOEvaluator`` does).

Bands are COCO's: by the ground truth's ``area`` field, small ``[0, 32²]``, medium
``[32², 96²]``, large ``[96², 1e10]``, both ends included as ``COCOeval`` compares them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..size_bands import SIZE_BANDS

__all__ = ["evaluate_size_bands", "size_band_metrics"]

BAND_NAMES = tuple(name for name, _, _ in SIZE_BANDS)  # COCOeval's areaRngLbl after "all"
_MAX_DETS = 100


def _index(values: Sequence[float], wanted: float, what: str) -> int:
    found = np.flatnonzero(np.isclose(np.asarray(values, dtype=np.float64), wanted))
    if len(found) == 0:
        raise ValueError(f"COCOeval params.{what} {list(values)} lack {wanted}")
    return int(found[0])


def _mean_valid(precision: np.ndarray) -> float:
    """COCOeval.summarize's average: over entries > -1, in percent; NaN when there are none."""
    valid = precision[precision > -1]
    return float(valid.mean() * 100.0) if valid.size else float("nan")


def size_band_metrics(evaluation) -> Dict[str, float]:
    """Per size band ``b`` of :data:`musu.size_bands.SIZE_BANDS`: ``AP-b`` (IoU 0.50:0.95),
    ``AP50-b``, ``AP75-b`` in percent, from ``evaluation.eval["precision"]`` (shape
    [T, R, K, A, M]) at ``maxDets`` 100, averaged over entries > -1 exactly as
    ``COCOeval.summarize`` averages (so ``AP-small`` equals its ``APs``); NaN for a band without
    ground-truth objects. Also
    ``objects-b``: the non-crowd ground-truth objects of the evaluated images and categories
    whose ``area`` lies in the band (ends included, ``COCOeval``'s test). ``evaluation`` is a
    pycocotools ``COCOeval`` (or Detectron2's ``COCOeval_opt``) after ``evaluate()`` and
    ``accumulate()`` with areas labelled small / medium / large; ``ValueError`` otherwise."""
    params = evaluation.params
    accumulated = getattr(evaluation, "eval", None) or {}
    if "precision" not in accumulated:
        raise ValueError("COCOeval has no accumulated precision: call evaluate() and accumulate()")
    precision = accumulated["precision"]  # (T IoUs, R recall points, K classes, A areas, M dets)
    t50 = _index(params.iouThrs, 0.5, "iouThrs")
    t75 = _index(params.iouThrs, 0.75, "iouThrs")
    m = _index(params.maxDets, _MAX_DETS, "maxDets")
    labels = list(params.areaRngLbl)
    annotations = evaluation.cocoGt.loadAnns(
        evaluation.cocoGt.getAnnIds(
            imgIds=params.imgIds, catIds=params.catIds if params.useCats else []
        )
    )
    metrics: Dict[str, float] = {}
    for band in BAND_NAMES:
        if band not in labels:
            raise ValueError(f"COCOeval params.areaRngLbl {labels} lack {band!r}")
        a = labels.index(band)
        low, high = params.areaRng[a]
        metrics[f"AP-{band}"] = _mean_valid(precision[:, :, :, a, m])
        metrics[f"AP50-{band}"] = _mean_valid(precision[t50, :, :, a, m])
        metrics[f"AP75-{band}"] = _mean_valid(precision[t75, :, :, a, m])
        metrics[f"objects-{band}"] = sum(
            1 for ann in annotations if not ann.get("iscrowd", 0) and low <= ann["area"] <= high
        )
    return metrics


def _ground_truth_json(dataset_name: str, cache_dir: Optional[str]) -> str:
    """The dataset's COCO ``json_file`` metadata, else a COCO file written by Detectron2's
    ``convert_to_coco_json`` into ``cache_dir`` (a temporary folder when None)."""
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets.coco import convert_to_coco_json

    json_file = MetadataCatalog.get(dataset_name).get("json_file", None)
    if json_file:
        return str(json_file)
    folder = cache_dir or tempfile.mkdtemp(prefix="musu_size_bands_")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{dataset_name}_coco_format.json")
    convert_to_coco_json(dataset_name, path, allow_cached=True)
    return path


def evaluate_size_bands(
    dataset_name: str,
    predictions: Union[str, os.PathLike, List[dict]],
    cache_dir: Optional[str] = None,
    img_ids: Optional[Sequence[int]] = None,
) -> Dict[str, float]:
    """:func:`size_band_metrics` of COCO-format ``bbox`` detections (``image_id``,
    ``category_id`` in the dataset's ids, ``bbox`` XYWH, ``score``: a list, or the path of a JSON
    file such as ``COCOEvaluator``'s ``coco_instances_results.json``) against the ground truth
    of the registered Detectron2 dataset ``dataset_name``, on all its categories and its images
    (only ``img_ids`` when given), with
    ``maxDets`` 1/10/100 (``COCOEvaluator``'s defaults, so ``AP-b`` equals its ``APs/APm/APl``).
    Without detections AP is 0 in every band that has objects. ``ValueError`` naming the file or
    dataset for detections of unknown images or categories, or objects without ``area``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    source = "predictions"
    if isinstance(predictions, (str, os.PathLike)):
        source = str(predictions)
        with open(predictions) as f:
            predictions = json.load(f)
    if not isinstance(predictions, list):
        raise ValueError(f"{source}: COCO detections are a list of dicts")
    gt_json = _ground_truth_json(dataset_name, cache_dir)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO(gt_json)
    missing = [ann.get("id") for ann in coco_gt.dataset.get("annotations", []) if "area" not in ann]
    if missing:
        raise ValueError(f"{gt_json}: annotations {missing[:5]} have no 'area' (COCO's size key)")
    images, categories = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    for number, det in enumerate(predictions):
        if det.get("image_id") not in images or det.get("category_id") not in categories:
            raise ValueError(
                f"{source}: detection {number} (image_id {det.get('image_id')!r}, category_id "
                f"{det.get('category_id')!r}) is not an image and category of {dataset_name} "
                f"({gt_json})"
            )
    if not predictions:  # pycocotools cannot load an empty list; COCOeval gives precision 0
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_gt.dataset.get("images", []), "annotations": []}
            coco_dt.createIndex()
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(copy.deepcopy(predictions))  # loadRes edits its input
    evaluation = COCOeval(coco_gt, coco_dt, "bbox")
    evaluation.params.maxDets = [1, 10, _MAX_DETS]
    if img_ids is not None:
        evaluation.params.imgIds = sorted(set(img_ids))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation.evaluate()
        evaluation.accumulate()
    return size_band_metrics(evaluation)
