"""Metrics beyond COCO AP: score/IoU consistency of dense detectors (paper Fig. 1 claim) and
error analysis of COCO results (confusion matrix with background, precision/recall, PR curves)."""

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

__all__ = [
    "ClassCurve",
    "ImageResults",
    "average_precision_markdown",
    "confusion_matrix",
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
]
