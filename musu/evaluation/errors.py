"""Error analysis of a detector's COCO results: confusion matrix, precision/recall, PR curves.

Classes are the dataset's categories in ascending id order (index ``0..C-1``); index ``C`` is
*background*. All boxes are XYXY pixels; crowd ground truth (``iscrowd``) is never a target.

* :func:`confusion_matrix` (rows: true class, columns: predicted class, both ``C + 1`` long):
  per image, the detections scoring at least ``score_threshold`` are taken in descending score
  order; each one is matched to a not yet matched ground-truth object with IoU >= ``iou_threshold``,
  preferring the same class (highest IoU among those), else the highest-IoU object of another
  class (a confusion). A matched detection adds 1 at ``[true class, predicted class]``; an
  unmatched one at ``[C, predicted class]`` (a false positive on background) unless it lies
  inside a crowd region (intersection / its own area >= ``iou_threshold``), where it is ignored;
  an object that no detection matched adds 1 at ``[true class, C]`` (missed).
* :func:`precision_recall` at that operating point: per class ``TP / (column sum)`` and
  ``TP / (row sum)``, NaN where the denominator is 0.
* :func:`pr_curves`: per class, every detection of that class in descending score order matched
  greedily to the same class only (Pascal VOC / COCO style), with the cumulative precision and
  recall and the all-point interpolated average precision.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ClassCurve",
    "ImageResults",
    "box_iou",
    "confusion_matrix",
    "errors_markdown",
    "load_coco_results",
    "plot_confusion_matrix",
    "plot_pr_curves",
    "pr_curves",
    "precision_recall",
]


@dataclass
class ImageResults:
    """Ground truth and detections of one image; classes are contiguous indices ``0..C-1``."""

    gt_boxes: np.ndarray  # (M, 4) XYXY
    gt_classes: np.ndarray  # (M,) int
    det_boxes: np.ndarray  # (D, 4) XYXY
    det_scores: np.ndarray  # (D,)
    det_classes: np.ndarray  # (D,) int
    gt_crowd: np.ndarray | None = None  # (M,) bool; None: no crowd

    def __post_init__(self) -> None:
        self.gt_boxes = np.asarray(self.gt_boxes, dtype=np.float64).reshape(-1, 4)
        self.gt_classes = np.asarray(self.gt_classes, dtype=np.int64).reshape(-1)
        self.det_boxes = np.asarray(self.det_boxes, dtype=np.float64).reshape(-1, 4)
        self.det_scores = np.asarray(self.det_scores, dtype=np.float64).reshape(-1)
        self.det_classes = np.asarray(self.det_classes, dtype=np.int64).reshape(-1)
        if self.gt_crowd is None:
            self.gt_crowd = np.zeros(len(self.gt_boxes), dtype=bool)
        self.gt_crowd = np.asarray(self.gt_crowd, dtype=bool).reshape(-1)
        if not len(self.gt_boxes) == len(self.gt_classes) == len(self.gt_crowd):
            raise ValueError("gt_boxes, gt_classes and gt_crowd must have the same length")
        if not len(self.det_boxes) == len(self.det_scores) == len(self.det_classes):
            raise ValueError("det_boxes, det_scores and det_classes must have the same length")


@dataclass
class ClassCurve:
    """Precision/recall of one class over descending score thresholds (``scores``)."""

    precision: np.ndarray
    recall: np.ndarray
    scores: np.ndarray
    average_precision: float  # NaN when the class has no ground truth
    num_gt: int


def box_iou(a: np.ndarray, b: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
    """(len(a), len(b)) IoU of XYXY boxes; for columns where ``crowd`` is True, the
    intersection over the area of the ``a`` box (COCO's rule for crowd regions)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    if crowd is not None:
        union = np.where(np.asarray(crowd, dtype=bool)[None, :], area_a[:, None], union)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _check_thresholds(score_threshold: float, iou_threshold: float) -> None:
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if not np.isfinite(score_threshold):
        raise ValueError(f"score_threshold must be finite, got {score_threshold}")


def confusion_matrix(
    images: list[ImageResults], num_classes: int, score_threshold: float, iou_threshold: float
) -> np.ndarray:
    """``(C + 1, C + 1)`` int64 counts, rows true class, columns predicted class, index ``C``
    background (the matching rule is in the module docstring). Row sums (but the last) are the
    number of non-crowd objects per class; column sums (but the last) the detections kept per
    predicted class, less those ignored in crowd regions."""
    _check_thresholds(score_threshold, iou_threshold)
    C = num_classes
    matrix = np.zeros((C + 1, C + 1), dtype=np.int64)
    for image in images:
        _check_classes(image, C)
        keep = image.det_scores >= score_threshold
        order = np.argsort(-image.det_scores[keep], kind="stable")
        boxes, classes = image.det_boxes[keep][order], image.det_classes[keep][order]
        real = ~image.gt_crowd
        gt_boxes, gt_classes = image.gt_boxes[real], image.gt_classes[real]
        iou = box_iou(boxes, gt_boxes)  # (D, M)
        crowd_boxes = image.gt_boxes[image.gt_crowd]
        crowd_overlap = box_iou(boxes, crowd_boxes, np.ones(len(crowd_boxes), bool))
        matched = np.zeros(len(gt_boxes), dtype=bool)
        for d, label in enumerate(classes):
            candidates = (iou[d] >= iou_threshold) & ~matched
            same = candidates & (gt_classes == label)
            pool = same if same.any() else candidates
            if pool.any():
                j = int(np.argmax(np.where(pool, iou[d], -1.0)))
                matched[j] = True
                matrix[gt_classes[j], label] += 1
            elif not (crowd_overlap.shape[1] and crowd_overlap[d].max() >= iou_threshold):
                matrix[C, label] += 1
        np.add.at(matrix, (gt_classes[~matched], C), 1)
    return matrix


def precision_recall(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class precision and recall ``(C,)`` of a :func:`confusion_matrix` (NaN: no detection
    of that class / no object of that class)."""
    C = matrix.shape[0] - 1
    tp = np.diag(matrix)[:C].astype(np.float64)
    predicted = matrix[:, :C].sum(axis=0).astype(np.float64)
    actual = matrix[:C, :].sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return tp / predicted, tp / actual


def pr_curves(
    images: list[ImageResults], num_classes: int, iou_threshold: float
) -> list[ClassCurve]:
    """One :class:`ClassCurve` per class: all detections of the class ranked by score, each a
    true positive when it matches (IoU >= ``iou_threshold``) a not yet matched object of the
    class; detections inside a crowd region of any class (intersection / own area >=
    ``iou_threshold``) that match nothing are ignored. AP is the area under the precision
    envelope (all-point interpolation)."""
    _check_thresholds(0.0, iou_threshold)
    scores: list[list[float]] = [[] for _ in range(num_classes)]
    hits: list[list[int]] = [[] for _ in range(num_classes)]  # 1 TP, 0 FP
    num_gt = np.zeros(num_classes, dtype=np.int64)
    for image in images:
        _check_classes(image, num_classes)
        real = ~image.gt_crowd
        gt_boxes, gt_classes = image.gt_boxes[real], image.gt_classes[real]
        num_gt += np.bincount(gt_classes, minlength=num_classes)
        crowd_boxes = image.gt_boxes[image.gt_crowd]
        for c in np.unique(image.det_classes):
            pick = np.flatnonzero(image.det_classes == c)
            pick = pick[np.argsort(-image.det_scores[pick], kind="stable")]
            targets = gt_classes == c
            iou = box_iou(image.det_boxes[pick], gt_boxes[targets])
            crowd = box_iou(image.det_boxes[pick], crowd_boxes, np.ones(len(crowd_boxes), bool))
            matched = np.zeros(int(targets.sum()), dtype=bool)
            for d, index in enumerate(pick):
                candidates = (iou[d] >= iou_threshold) & ~matched
                if candidates.any():
                    matched[int(np.argmax(np.where(candidates, iou[d], -1.0)))] = True
                    hit = 1
                elif len(crowd_boxes) and crowd[d].max() >= iou_threshold:
                    continue
                else:
                    hit = 0
                scores[c].append(float(image.det_scores[index]))
                hits[c].append(hit)
    curves = []
    for c in range(num_classes):
        order = np.argsort(-np.asarray(scores[c]), kind="stable")
        tp = np.cumsum(np.asarray(hits[c], dtype=np.float64)[order])
        fp = np.cumsum(1.0 - np.asarray(hits[c], dtype=np.float64)[order])
        precision = tp / np.maximum(tp + fp, 1e-12)
        recall = tp / num_gt[c] if num_gt[c] else np.full_like(tp, np.nan)
        curves.append(
            ClassCurve(
                precision=precision,
                recall=recall,
                scores=np.asarray(scores[c])[order],
                average_precision=_average_precision(precision, recall, int(num_gt[c])),
                num_gt=int(num_gt[c]),
            )
        )
    return curves


def _average_precision(precision: np.ndarray, recall: np.ndarray, num_gt: int) -> float:
    if num_gt == 0:
        return float("nan")
    if len(precision) == 0:
        return 0.0
    r = np.concatenate([[0.0], recall])
    p = np.concatenate([[0.0], precision])
    envelope = np.maximum.accumulate(p[::-1])[::-1]
    return float(np.sum((r[1:] - r[:-1]) * envelope[1:]))


def _check_classes(image: ImageResults, num_classes: int) -> None:
    for what, classes in (("ground truth", image.gt_classes), ("detection", image.det_classes)):
        if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
            raise ValueError(
                f"{what} class index {int(classes.max())} outside 0..{num_classes - 1}"
            )


def load_coco_results(gt_json: str, results_json: str) -> tuple[list[str], list[ImageResults]]:
    """Class names (categories by ascending id) and one :class:`ImageResults` per image of the
    ground-truth COCO file, with the detections of a COCO results file (``image_id``,
    ``category_id``, ``bbox`` XYWH, ``score``; e.g. ``coco_instances_results.json`` of
    Detectron2's ``COCOEvaluator``). Raises ``ValueError`` naming the file for a detection whose
    image or category is not in the ground truth."""
    with open(gt_json) as f:
        gt = json.load(f)
    with open(results_json) as f:
        results = json.load(f)
    if not isinstance(results, list):
        raise ValueError(f"{results_json}: a COCO results file is a list of detections")
    categories = sorted(gt.get("categories", []), key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    per_image: dict = {img["id"]: ([], [], [], [], [], []) for img in gt.get("images", [])}
    for ann in gt.get("annotations", []):
        if ann["category_id"] not in index or ann["image_id"] not in per_image:
            raise ValueError(f"{gt_json}: annotation {ann.get('id')} has an unknown category/image")
        x, y, w, h = ann["bbox"]
        rows = per_image[ann["image_id"]]
        rows[0].append([x, y, x + w, y + h])
        rows[1].append(index[ann["category_id"]])
        rows[2].append(bool(ann.get("iscrowd", 0)))
    for number, det in enumerate(results):
        if det.get("image_id") not in per_image:
            raise ValueError(
                f"{results_json}: detection {number} has image_id {det.get('image_id')!r}, "
                f"which {os.path.basename(gt_json)} does not hold"
            )
        if det.get("category_id") not in index:
            raise ValueError(
                f"{results_json}: detection {number} has category_id {det.get('category_id')!r}, "
                f"not among the categories of {os.path.basename(gt_json)} ({sorted(index)})"
            )
        x, y, w, h = det["bbox"]
        rows = per_image[det["image_id"]]
        rows[3].append([x, y, x + w, y + h])
        rows[4].append(det["score"])
        rows[5].append(index[det["category_id"]])
    images = [
        ImageResults(
            gt_boxes=r[0], gt_classes=r[1], gt_crowd=r[2], det_boxes=r[3], det_scores=r[4],
            det_classes=r[5],
        )  # fmt: skip
        for r in per_image.values()
    ]
    return [c["name"] for c in categories], images


def errors_markdown(
    matrix: np.ndarray, class_names: list[str], score_threshold: float, iou_threshold: float
) -> str:
    """The confusion matrix and per-class precision/recall as two Markdown tables."""
    names = list(class_names) + ["background"]
    precision, recall = precision_recall(matrix)
    lines = [
        f"Score threshold {score_threshold:g}, IoU threshold {iou_threshold:g}. Rows: true "
        "class; columns: predicted class; background row: false positives; background column: "
        "missed objects.",
        "",
        "| true \\ predicted | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in matrix[i]) + " |")
    lines += ["", "| class | objects | detections | TP | precision | recall |"]
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for c, name in enumerate(class_names):
        detections, objects = int(matrix[:, c].sum()), int(matrix[c, :].sum())
        lines.append(
            f"| {name} | {objects} | {detections} | {int(matrix[c, c])} | "
            f"{_fmt(precision[c])} | {_fmt(recall[c])} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f}"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "musu's error plots need matplotlib: python -m pip install matplotlib"
        ) from error
    return plt


def plot_confusion_matrix(
    matrix: np.ndarray, class_names: list[str], path: str, title: str = ""
) -> None:
    """Write the confusion matrix as a PNG: counts in the cells, colours normalized per row."""
    plt = _pyplot()
    names = list(class_names) + ["background"]
    rows = matrix.sum(axis=1, keepdims=True)
    shade = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    size = 1.6 + 0.55 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(shade, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            colour = "white" if shade[i, j] > 0.6 else "black"
            ax.text(j, i, str(int(value)), ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pr_curves(curves: list[ClassCurve], class_names: list[str], path: str, title="") -> None:
    """Write every class's precision/recall curve in one PNG, AP in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for curve, name in zip(curves, class_names):
        if curve.num_gt == 0:
            continue
        label = f"{name} (AP {100 * curve.average_precision:.1f}, {curve.num_gt} objects)"
        ax.plot(np.concatenate([[0.0], curve.recall]), np.concatenate([[1.0], curve.precision]),
                label=label, drawstyle="steps-post")  # fmt: skip
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
