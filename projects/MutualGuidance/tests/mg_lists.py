"""Implementation results as plain lists, in the form ``reference_mg.as_lists`` gives the
reference's, so tests compare the two with ``==``."""

from __future__ import annotations

from typing import Dict, List, Sequence

from musu.modeling.assigners import Assignment


def implementation_lists(result: Assignment, gt_boxes: Sequence[List]) -> Dict[str, list]:
    """Owners, ignore mask and per-object counts (padding objects dropped) as nested lists."""
    counts = [len(b) for b in gt_boxes]
    return {
        "cls_owner": result.gt_index.tolist(),
        "ignore": result.ignore.tolist(),
        "reg_owner": result.reg_gt_index.tolist(),
        "num_pos": [row[:m] for row, m in zip(result.stats["bag_size"].tolist(), counts)],
        "num_ignored": [row[:m] for row, m in zip(result.stats["num_ignored"].tolist(), counts)],
    }
