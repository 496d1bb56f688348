"""Metrics beyond COCO AP: score/IoU consistency of dense detectors (paper Fig. 1 claim)."""

from .consistency import (
    PRE_NMS_OPTS,
    ConsistencyEvaluator,
    object_consistency,
    rankdata,
    spearman,
    summarize_consistency,
)

__all__ = [
    "PRE_NMS_OPTS",
    "ConsistencyEvaluator",
    "object_consistency",
    "rankdata",
    "spearman",
    "summarize_consistency",
]
