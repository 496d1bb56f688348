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
* :func:`pr_curves`: per class, pycocotools' ``COCOeval`` precision at COCO's 101 recall points
  and its mean, the average precision Detectron2's ``COCOEvaluator`` reports.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ClassCurve",
    "ImageResults",
    "average_precision_markdown",
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
    """Precision of one class at increasing recall (COCO's 101 points), with the score at which
    the detector reaches each; precision is NaN where the class has no objects."""

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


def pr_curves(gt_json: str, results_json: str, iou_threshold: float = 0.5) -> list[ClassCurve]:
    """One :class:`ClassCurve` per class (categories by ascending id), from pycocotools'
    ``COCOeval`` at IoU ``iou_threshold`` (all areas, 100 detections per image): precision at
    COCO's 101 recall points (``eval["precision"][0, :, k, 0, -1]``), the score reached there,
    and AP as their mean, the number Detectron2's ``COCOEvaluator`` computes for this class at
    this IoU. Crowd objects and the detections they absorb count as COCO counts them. AP is NaN
    for a class without objects, 0 for one without detections."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _check_thresholds(0.0, iou_threshold)
    with open(gt_json) as f:
        gt = json.load(f)
    with open(results_json) as f:
        results = json.load(f)
    for ann in gt.get("annotations", []):  # COCOeval's area ranges need every object's area
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    categories = sorted(c["id"] for c in gt.get("categories", []))
    num_gt = {c: 0 for c in categories}
    for ann in gt.get("annotations", []):
        if not ann.get("iscrowd", 0):
            num_gt[ann["category_id"]] += 1
    recall = np.linspace(0.0, 1.0, 101)
    if results:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            evaluation = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
            evaluation.params.iouThrs = np.array([iou_threshold])
            evaluation.params.recThrs = recall
            evaluation.evaluate()
            evaluation.accumulate()
        precisions = evaluation.eval["precision"][0, :, :, 0, -1]  # (R=101, K)
        scores = evaluation.eval["scores"][0, :, :, 0, -1]  # (R, K)
    else:  # pycocotools cannot load an empty results list: no detection, precision 0
        precisions = np.array([[0.0 if num_gt[c] else -1.0 for c in categories]] * len(recall))
        scores = np.zeros_like(precisions)
    curves = []
    for k, category in enumerate(categories):
        precision = precisions[:, k].astype(np.float64)
        valid = precision > -1
        curves.append(
            ClassCurve(
                precision=np.where(valid, precision, np.nan),
                recall=recall,
                scores=scores[:, k].astype(np.float64),
                average_precision=float(precision[valid].mean()) if valid.any() else float("nan"),
                num_gt=num_gt[category],
            )
        )
    return curves


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


def average_precision_markdown(
    curves: list[ClassCurve], class_names: list[str], iou_threshold: float
) -> str:
    """Per-class AP of :func:`pr_curves` (in percent, as ``COCOEvaluator`` prints it) as a
    Markdown table."""
    lines = [f"| class | objects | AP{100 * iou_threshold:g} |", "| --- | ---: | ---: |"]
    for curve, name in zip(curves, class_names):
        ap = "n/a" if np.isnan(curve.average_precision) else f"{100 * curve.average_precision:.4f}"
        lines.append(f"| {name} | {curve.num_gt} | {ap} |")
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
        ax.plot(curve.recall, curve.precision, label=label, drawstyle="steps-post")
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
