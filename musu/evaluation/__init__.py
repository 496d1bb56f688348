"""Metrics beyond COCO AP: score/IoU consistency of dense detectors (paper Fig. 1 claim),
error analysis of COCO results (confusion matrix with background, precision/recall, PR curves
from pycocotools' COCOeval), AP / AP50 / AP75 and object counts per COCO size band
(:func:`size_band_metrics`, :func:`evaluate_size_bands`) and :func:`evaluate_checkpoint` (COCO
AP, per-band AP, inference time and consistency of one checkpoint, as ``tools/compare.py``
tabulates it)."""

from .checkpoint_eval import evaluate_checkpoint
from .consistency import (
    PRE_NMS_OPTS,
    ConsistencyEvaluator,
    object_consistency,
    rankdata,
    spearman,
    summarize_consistency,
)
from .errors import (
    ClassCurve,
    ImageResults,
    average_precision_markdown,
    confusion_matrix,
    errors_markdown,
    load_coco_results,
    plot_confusion_matrix,
    plot_pr_curves,
    pr_curves,
    precision_recall,
)
from .size_bands import evaluate_size_bands, size_band_metrics

__all__ = [
    "ClassCurve",
    "ImageResults",
    "average_precision_markdown",
    "confusion_matrix",
    "evaluate_checkpoint",
    "errors_markdown",
    "load_coco_results",
    "plot_confusion_matrix",
    "plot_pr_curves",
    "pr_curves",
    "precision_recall",
    "PRE_NMS_OPTS",
    "ConsistencyEvaluator",
    "object_consistency",
    "rankdata",
    "spearman",
    "summarize_consistency",
    "evaluate_size_bands",
    "size_band_metrics",
]
