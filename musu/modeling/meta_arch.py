"""The MuSu meta-architecture: backbone + MuSuHead + MuSuAssigner + base losses.

Shapes: N images, R anchor slots over all levels (H_l x W_l x A per level, in that order),
C classes, M_max objects per image after padding.

Robustness: training inputs are checked before the backbone runs (class index outside
``[0, NUM_CLASSES)`` or non-finite box: ``ValueError`` naming the image file); objects marked
``gt_is_crowd`` are never candidates and their regions get no classification loss; a non-finite
loss raises ``FloatingPointError`` naming the term, the iteration and the likely cause.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms
from detectron2.modeling import Backbone, build_backbone
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import Tensor

from ..config import validate_musu_config
from .assigner import AnchorGrid, Assignment, assignment_stats, pad_ground_truth
from .build import build_assigner
from .head import MuSuHead
from .losses import musu_classification_loss, weighted_giou_loss

__all__ = ["MuSu", "anchor_points", "decode_boxes"]

logger = logging.getLogger(__name__)

# exp() input bound for box distances: stride * e^12 (~1.6e5 * stride) is beyond any image.
_MAX_LOG_DISTANCE = 12.0


def anchor_points(
    feature_sizes: List[Tuple[int, int]], strides: List[int], num_anchors: int, device
) -> Tuple[Tensor, Tensor]:
    """Anchor points (R, 2) at cell centres ((j + 0.5) * s, (i + 0.5) * s), and strides (R,);
    cached per layout and device (read-only, see :meth:`AnchorGrid.points`).

    Order matches the head outputs flattened as (level, H, W, A): every location's point is
    repeated for its A slots. The points are ``AnchorGrid(...).points()``.
    """
    grid = AnchorGrid(tuple(tuple(size) for size in feature_sizes), tuple(strides), num_anchors)
    return grid.points(device), grid.point_strides(device)


def decode_boxes(points: Tensor, strides: Tensor, log_distances: Tensor) -> Tensor:
    """XYXY boxes (..., R, 4) from points (R, 2), strides (R,) and (..., R, 4) outputs:
    distances (l, t, r, b) = stride * exp(output)."""
    distances = strides[:, None] * log_distances.clamp(max=_MAX_LOG_DISTANCE).exp()
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def check_in_features(backbone: Backbone, names: List[str]) -> Dict[str, ShapeSpec]:
    shapes = backbone.output_shape()
    missing = [f for f in names if f not in shapes]
    if missing:
        raise ValueError(
            f"MODEL.MUSU.IN_FEATURES names {missing}, which the backbone "
            f"({type(backbone).__name__}) does not output (it has {sorted(shapes)})"
        )
    return shapes


def _reduce_mean_normalizer(total: Tensor) -> Tensor:
    """Sum across processes divided by the world size, at least 1 (never divides by zero)."""
    total = total.detach().float()
    world_size = comm.get_world_size()
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        total = total.clone()
        dist.all_reduce(total)
        total = total / world_size
    return total.clamp(min=1.0)


def _split_crowd(
    gt_instances: List[Instances],
) -> Tuple[List[Tensor], List[Tensor], Optional[List[Tensor]]]:
    """Non-crowd boxes (M_n, 4) and classes (M_n,) per image, and crowd boxes (K_n, 4) per image
    (None when no image has a ``gt_is_crowd`` field)."""
    has_crowd = any(x.has("gt_is_crowd") for x in gt_instances)
    boxes, classes, crowd = [], [], []
    for x in gt_instances:
        box, cls = x.gt_boxes.tensor.float(), x.gt_classes
        is_crowd = x.gt_is_crowd.bool() if x.has("gt_is_crowd") else torch.zeros_like(cls).bool()
        boxes.append(box[~is_crowd])
        classes.append(cls[~is_crowd])
        crowd.append(box[is_crowd])
    return boxes, classes, (crowd if has_crowd else None)


def _ignore_crowd_regions(
    assignment: Assignment, points: Tensor, crowd_boxes: List[Tensor]
) -> Assignment:
    """Mark unassigned anchors whose point lies inside a crowd box of their image as ignored."""
    inside = torch.zeros_like(assignment.gt_index, dtype=torch.bool)  # (N, R)
    for n, boxes in enumerate(crowd_boxes):  # crowd boxes are few: (K, R) per image
        if len(boxes):
            px, py = points[:, 0], points[:, 1]  # (R,)
            boxes = boxes.to(points.device)
            hit = (px > boxes[:, 0, None]) & (px < boxes[:, 2, None])  # (K, R)
            hit &= (py > boxes[:, 1, None]) & (py < boxes[:, 3, None])
            inside[n] = hit.any(dim=0)
    ignore = inside & (assignment.gt_index < 0)
    if assignment.ignore is not None:
        ignore |= assignment.ignore
    return dataclasses.replace(assignment, ignore=ignore)


def _check_finite_losses(
    losses: Dict[str, Tensor], cls_logits: Tensor, obj_logits: Tensor, pred_boxes: Tensor
) -> None:
    """Raise ``FloatingPointError`` naming every non-finite loss term, the iteration (when run
    by a trainer) and whether the head outputs were already non-finite. One device sync."""
    values = torch.stack([v.detach().float() for v in losses.values()])
    if bool(torch.isfinite(values).all()):
        return
    bad = {k: v for k, v in zip(losses, values.tolist()) if not math.isfinite(v)}
    try:
        iteration: object = get_event_storage().iter
    except AssertionError:  # not run by a trainer
        iteration = "? (no EventStorage)"
    outputs = {"cls_logits": cls_logits, "obj_logits": obj_logits, "pred_boxes": pred_boxes}
    broken = [k for k, v in outputs.items() if not bool(torch.isfinite(v.detach()).all())]
    cause = (
        f"the head outputs {broken} are already non-finite: the weights or the input images hold"
        " NaN/Inf (training diverged: lower SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS or "
        "enable SOLVER.CLIP_GRADIENTS; or check the images)"
        if broken
        else "the head outputs are finite: check the ground-truth boxes of this batch"
    )
    raise FloatingPointError(f"MuSu: non-finite loss at iteration {iteration}: {bad}; {cause}")


@META_ARCH_REGISTRY.register()
class MuSu(DenseDetector):
    """One-stage detector trained by Mutual Supervision (Gao et al., ICCV 2021).

    Training: the assigner sees detached merged scores and decoded boxes; classification loss is
    Eq. 7 normalized by the sum of cls weights, regression loss is weighted GIoU normalized by the
    sum of reg weights (both all-reduced across processes). Inference: score threshold, top-k per
    level, class-wise NMS, at most ``max_detections_per_image`` detections.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: MuSuHead,
        head_in_features: List[str],
        assigner: Callable[..., Assignment],
        num_classes: int,
        warmup_assigner: Optional[Callable[..., Assignment]] = None,
        warmup_assigner_iters: int = 0,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        beta: float = 4.0,
        reg_loss_weight: float = 1.0,
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 100,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
    ) -> None:
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        shapes = check_in_features(backbone, head_in_features)
        self.strides = [shapes[f].stride for f in head_in_features]
        self.num_classes = num_classes
        self.num_anchors = head.num_anchors
        self.assigner = assigner
        self.warmup_assigner = warmup_assigner
        self.warmup_assigner_iters = warmup_assigner_iters if warmup_assigner is not None else 0
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.beta = beta
        self.reg_loss_weight = reg_loss_weight
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image

    @classmethod
    def from_config(cls, cfg) -> dict:
        validate_musu_config(cfg)
        musu = cfg.MODEL.MUSU
        backbone = build_backbone(cfg)
        shapes = check_in_features(backbone, musu.IN_FEATURES)
        head = MuSuHead(cfg, [shapes[f] for f in musu.IN_FEATURES])
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": list(musu.IN_FEATURES),
            "assigner": build_assigner(cfg),
            "num_classes": musu.NUM_CLASSES,
            "warmup_assigner": (
                build_assigner(cfg, "WARMUP_ASSIGNER") if musu.WARMUP_ASSIGNER_ITERS > 0 else None
            ),
            "warmup_assigner_iters": musu.WARMUP_ASSIGNER_ITERS,
            "focal_loss_alpha": musu.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": musu.FOCAL_LOSS_GAMMA,
            "beta": musu.BETA,
            "reg_loss_weight": musu.REG_LOSS_WEIGHT,
            "test_score_thresh": musu.SCORE_THRESH_TEST,
            "test_topk_candidates": musu.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": musu.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """Detectron2's forward; in training, the ground truth is checked first."""
        if self.training:
            self._check_ground_truth(batched_inputs)
        return super().forward(batched_inputs)

    def _check_ground_truth(self, batched_inputs: List[Dict[str, Any]]) -> None:
        """``ValueError`` naming the image for class indices the model cannot represent or
        non-finite boxes: indexing with them would fail far away or silently train on garbage.
        One batched test (on the loader's CPU tensors); images are only searched on failure."""
        instances = [x["instances"] for x in batched_inputs if "instances" in x]
        if not instances:
            return
        classes = torch.cat([x.gt_classes for x in instances])  # (sum M,)
        boxes = torch.cat([x.gt_boxes.tensor for x in instances])  # (sum M, 4)
        if bool(
            ((classes >= 0) & (classes < self.num_classes)).all() & torch.isfinite(boxes).all()
        ):
            return
        for index, item in enumerate(batched_inputs):
            if "instances" not in item:
                continue
            where = (
                f"image {item.get('file_name', f'#{index} of the batch')} "
                f"(image_id {item.get('image_id', '?')})"
            )
            classes = item["instances"].gt_classes
            bad = (classes < 0) | (classes >= self.num_classes)
            if bool(bad.any()):
                raise ValueError(
                    f"{where}: object(s) {bad.nonzero().flatten().tolist()[:10]} have class "
                    f"indices {classes[bad].unique().tolist()[:10]} outside [0, {self.num_classes})"
                    f": MODEL.MUSU.NUM_CLASSES ({self.num_classes}) is smaller than the dataset's"
                    " number of classes, or the dataset maps category ids wrongly"
                )
            finite = torch.isfinite(item["instances"].gt_boxes.tensor).all(dim=1)
            if not bool(finite.all()):
                raise ValueError(
                    f"{where}: object(s) {(~finite).nonzero().flatten().tolist()[:10]} have "
                    "non-finite box coordinates"
                )

    def _flatten_predictions(
        self, predictions: List[List[Tensor]]
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Per level (N, H*W*A, C), (N, H*W*A, 4), (N, H*W*A)."""
        logits, box_reg, objectness = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1]
        )
        return logits, box_reg, [x.squeeze(-1) for x in objectness]

    def _grid(self, features: List[Tensor]) -> AnchorGrid:
        sizes = tuple((f.shape[-2], f.shape[-1]) for f in features)
        return AnchorGrid(sizes, tuple(self.strides), self.num_anchors)

    def _points(self, features: List[Tensor]) -> Tuple[Tensor, Tensor]:
        sizes = [(f.shape[-2], f.shape[-1]) for f in features]
        return anchor_points(sizes, self.strides, self.num_anchors, features[0].device)

    def forward_training(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: List[List[Tensor]],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        logits, box_reg, objectness = self._flatten_predictions(predictions)
        # Assignment and losses run in float32 even under mixed precision.
        with torch.autocast(device_type=images.tensor.device.type, enabled=False):
            cls_logits = torch.cat(logits, dim=1).float()  # (N, R, C)
            log_distances = torch.cat(box_reg, dim=1).float()  # (N, R, 4)
            obj_logits = torch.cat(objectness, dim=1).float()  # (N, R)
            points, strides = self._points(features)  # (R, 2), (R,)
            pred_boxes = decode_boxes(points, strides, log_distances)  # (N, R, 4)

            gt_boxes, gt_classes, crowd_boxes = _split_crowd(gt_instances)
            with torch.no_grad():
                scores = cls_logits.detach().sigmoid() * obj_logits.detach().sigmoid()[..., None]
                assigner = self._current_assigner()
                # Assigners that accept the grid layout list inside pairs per box (O(pairs)).
                takes_grid = "grid" in inspect.signature(assigner).parameters
                extra = {"grid": self._grid(features)} if takes_grid else {}
                assignment = assigner(
                    points, scores, pred_boxes.detach(), gt_boxes, gt_classes, **extra
                )
                if crowd_boxes is not None:
                    assignment = _ignore_crowd_regions(assignment, points, crowd_boxes)
            self._log_assignment(assignment)
            return self.losses(cls_logits, obj_logits, pred_boxes, gt_boxes, gt_classes, assignment)

    def _current_assigner(self) -> Callable[..., Assignment]:
        """The warm-up assigner during the first ``warmup_assigner_iters`` iterations of the
        trainer's EventStorage, else (and outside a trainer) the main assigner."""
        if self.warmup_assigner_iters > 0:
            try:
                iteration = get_event_storage().iter
            except AssertionError:  # no EventStorage: not inside a trainer
                return self.assigner
            if iteration < self.warmup_assigner_iters:
                return self.warmup_assigner
        return self.assigner

    def losses(
        self,
        cls_logits: Tensor,
        obj_logits: Tensor,
        pred_boxes: Tensor,
        gt_boxes: List[Tensor],
        gt_classes: List[Tensor],
        assignment: Assignment,
    ) -> Dict[str, Tensor]:
        """Eq. 7 and weighted GIoU, each normalized by its summed weights (Eq. 5)."""
        padded_boxes, padded_classes, _ = pad_ground_truth(
            gt_boxes, gt_classes, pred_boxes.dtype, pred_boxes.device
        )  # (N, M_max, 4), (N, M_max)
        assigned = assignment.gt_index >= 0  # (N, R)
        safe_index = assignment.gt_index.clamp(min=0)
        if padded_classes.shape[1] > 0:
            target_classes = padded_classes.gather(1, safe_index)  # (N, R)
        else:
            target_classes = torch.zeros_like(safe_index)
        target_classes = torch.where(assigned, target_classes, -1)

        loss_cls = musu_classification_loss(
            cls_logits,
            obj_logits,
            target_classes,
            assignment.cls_weight,
            focal_alpha=self.focal_loss_alpha,
            gamma=self.focal_loss_gamma,
            beta=self.beta,
            ignore=assignment.ignore,
        )
        reg_mask = assignment.reg_weight > 0  # (N, R)
        reg_gt_index = (
            assignment.gt_index if assignment.reg_gt_index is None else assignment.reg_gt_index
        )
        image_index, anchor_index = reg_mask.nonzero(as_tuple=True)
        target_boxes = padded_boxes[image_index, reg_gt_index[reg_mask]]  # (P, 4)
        loss_reg = weighted_giou_loss(
            pred_boxes[image_index, anchor_index], target_boxes, assignment.reg_weight[reg_mask]
        )
        cls_normalizer = _reduce_mean_normalizer(assignment.cls_weight.sum())
        reg_normalizer = _reduce_mean_normalizer(assignment.reg_weight.sum())
        losses = {
            "loss_musu_cls": loss_cls / cls_normalizer,
            "loss_musu_reg": self.reg_loss_weight * loss_reg / reg_normalizer,
        }
        _check_finite_losses(losses, cls_logits, obj_logits, pred_boxes)
        return losses

    def _log_assignment(self, assignment: Assignment) -> None:
        try:
            storage = get_event_storage()
        except AssertionError:  # called outside a trainer (no EventStorage): nothing to log
            return
        for name, value in assignment_stats(assignment).items():
            storage.put_scalar(f"musu/{name}", value)

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ) -> List[Instances]:
        logits, box_reg, objectness = self._flatten_predictions(predictions)
        sizes = [(f.shape[-2], f.shape[-1]) for f in features]
        level_points = [  # per level: points (H*W*A, 2), strides (H*W*A,); shared by all images
            anchor_points([size], [stride], self.num_anchors, self.device)
            for size, stride in zip(sizes, self.strides)
        ]
        results: List[Instances] = []
        for image_index, image_size in enumerate(images.image_sizes):
            per_level = []
            for level, (points, strides) in enumerate(level_points):
                scores = (
                    logits[level][image_index].sigmoid()
                    * objectness[level][image_index].sigmoid()[:, None]
                )  # (H*W*A, C)
                per_level.append(
                    self._decode_level(
                        scores, box_reg[level][image_index], points, strides, image_size
                    )
                )
            candidates = Instances.cat(per_level)
            keep = batched_nms(
                candidates.pred_boxes.tensor,
                candidates.scores,
                candidates.pred_classes,
                self.test_nms_thresh,
            )
            results.append(candidates[keep[: self.max_detections_per_image]])
        return results

    def _decode_level(
        self,
        scores: Tensor,
        log_distances: Tensor,
        points: Tensor,
        strides: Tensor,
        image_size: Tuple[int, int],
    ) -> Instances:
        """Threshold, keep the top-k (anchor, class) pairs of one level, decode their boxes."""
        flat_scores = scores.reshape(-1)  # (H*W*A*C,)
        keep = (flat_scores > self.test_score_thresh).nonzero(as_tuple=True)[0]
        kept_scores = flat_scores[keep]
        num_topk = min(len(keep), self.test_topk_candidates)
        kept_scores, order = kept_scores.topk(num_topk)
        keep = keep[order]
        anchor_index = keep // self.num_classes
        boxes = decode_boxes(
            points[anchor_index], strides[anchor_index], log_distances[anchor_index].float()
        )
        return Instances(
            image_size,
            pred_boxes=Boxes(boxes),
            scores=kept_scores,
            pred_classes=keep % self.num_classes,
        )
