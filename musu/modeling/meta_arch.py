"""The MuSu meta-architecture: backbone + MuSuHead + an assigner + base losses.

The assigner (``MODEL.MUSU.ASSIGNER``, see ``musu.modeling.assigners``) decides the samples; this
module wires it to the head, owns the loss normalizers, logs the assignment statistics and
decodes detections with Detectron2's ``DenseDetector`` per-level decoding.

Shapes: N images, R anchor slots over all levels (H_l x W_l x A per level, in that order),
C classes, M_max objects per image after padding.

Training inputs: a non-finite box raises ``ValueError`` naming the image file before the
backbone runs; objects marked ``gt_is_crowd`` are never candidates and their regions get no
classification loss (:class:`~musu.modeling.assigners.IgnoreCrowdRegions`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

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

from ..config import CLS_LOSS_NORMALIZERS, validate_musu_config
from .assigners import (
    AnchorGrid,
    Assigner,
    Assignment,
    IgnoreCrowdRegions,
    assignment_diagnostics,
    build_assigner,
    build_training_assigner,
    pad_ground_truth,
)
from .head import MuSuHead
from .losses import musu_classification_loss, weighted_giou_loss

__all__ = ["MuSu", "anchor_points", "decode_boxes"]

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


class CellBoxTransform:
    """MuSu's box decoding in the ``apply_deltas(deltas, anchor_boxes)`` form Detectron2's
    ``DenseDetector`` decoding calls: the anchor of a point is its cell box (point -/+ stride / 2,
    which gives back point and stride exactly), the deltas are the log-distances."""

    @staticmethod
    def cell_boxes(points: Tensor, strides: Tensor) -> Boxes:
        half = strides[:, None] / 2
        return Boxes(torch.cat([points - half, points + half], dim=1))

    @staticmethod
    def apply_deltas(deltas: Tensor, boxes: Tensor) -> Tensor:
        points = (boxes[:, :2] + boxes[:, 2:]) / 2
        return decode_boxes(points, boxes[:, 2] - boxes[:, 0], deltas.float())


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


def check_finite_predictions(detector: str, predictions: Dict[str, List[Tensor]]) -> None:
    """``FloatingPointError`` naming the output and the iteration when any of ``predictions`` is
    NaN or infinite: the training has diverged. Called on the box outputs, on which the GIoU
    losses would otherwise stop on fvcore's "bad box" assert; non-finite class outputs give
    non-finite losses, which Detectron2's trainer reports with the iteration and loss terms."""
    flags = {
        name: torch.stack([torch.isfinite(t).all() for t in v]) for name, v in predictions.items()
    }
    if bool(torch.cat(list(flags.values())).all()):  # one device sync
        return
    try:
        where = f" at iteration={get_event_storage().iter}"
    except AssertionError:  # outside a trainer
        where = ""
    for name, finite in flags.items():
        if not bool(finite.all()):
            raise FloatingPointError(
                f"{detector}: non-finite {name} outputs in training{where}: the training "
                "diverged. Lower SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS or enable "
                "SOLVER.CLIP_GRADIENTS."
            )


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


def _check_finite_boxes(batched_inputs: List[Dict[str, Any]]) -> None:
    """``ValueError`` naming the image for non-finite ground-truth boxes (one batched test on the
    loader's CPU tensors; images are only searched on failure)."""
    instances = [x["instances"] for x in batched_inputs if "instances" in x]
    if not instances or bool(
        torch.isfinite(torch.cat([x.gt_boxes.tensor for x in instances])).all()
    ):
        return
    for index, item in enumerate(batched_inputs):
        if "instances" not in item:
            continue
        finite = torch.isfinite(item["instances"].gt_boxes.tensor).all(dim=1)
        if not bool(finite.all()):
            raise ValueError(
                f"image {item.get('file_name', f'#{index} of the batch')} "
                f"(image_id {item.get('image_id', '?')}): object(s) "
                f"{(~finite).nonzero().flatten().tolist()[:10]} have non-finite box coordinates"
            )


@META_ARCH_REGISTRY.register()
class MuSu(DenseDetector):
    """One-stage detector trained by Mutual Supervision (Gao et al., ICCV 2021).

    Training: the assigner sees detached merged scores and decoded boxes; classification loss is
    Eq. 7 normalized by the sum of cls weights (or, opt-in, by the number of anchors with a cls
    target), regression loss is weighted GIoU normalized by the sum of reg weights (both
    all-reduced across processes). Inference: score threshold, top-k per level, class-wise NMS,
    at most ``max_detections_per_image`` detections.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: MuSuHead,
        head_in_features: List[str],
        assigner: Assigner,
        shadow_assigner: Optional[Assigner] = None,
        num_classes: int,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        beta: float = 4.0,
        reg_loss_weight: float = 1.0,
        cls_loss_normalizer: str = "weights",
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 100,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
    ) -> None:
        """
        Args:
            backbone: a backbone whose outputs include ``head_in_features``.
            head: the dense head (:class:`MuSuHead`) on those features; its ``num_anchors``
                (A) is the number of anchor slots per location.
            head_in_features: names of the backbone outputs the head runs on, one per level.
            assigner: the training assigner (``base.Assigner`` protocol): detached scores and
                decoded boxes in, one ``Assignment`` with separate cls / reg weights out.
            shadow_assigner: an assigner run beside the training one for its logged statistics
                only (``musu_shadow/*``); None: none.
            num_classes: number of foreground classes C.
            focal_loss_alpha, focal_loss_gamma: the focal loss' alpha and gamma (Eq. 7).
            beta: exponent of the (1 - w) factor of the soft negative term of Eq. 7.
            reg_loss_weight: multiplier of the normalized GIoU loss.
            cls_loss_normalizer: "weights": the classification loss is divided by the summed cls
                weights (Eq. 5); "members": by the number of anchors with a classification
                target that are not ignored (the bags' members).
            test_score_thresh: minimum merged score (class x objectness) kept at inference.
            test_topk_candidates: candidates kept per level before NMS.
            test_nms_thresh: IoU threshold of the class-wise NMS.
            max_detections_per_image: detections kept per image after NMS.
            pixel_mean, pixel_std: per-channel input normalization (Detectron2's).
        """
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        shapes = check_in_features(backbone, head_in_features)
        self.strides = [shapes[f].stride for f in head_in_features]
        self.num_classes = num_classes
        self.num_anchors = head.num_anchors
        self.assigner = assigner
        self.shadow_assigner = shadow_assigner
        self.box2box_transform = CellBoxTransform()  # for DenseDetector's decoding
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.beta = beta
        self.reg_loss_weight = reg_loss_weight
        if cls_loss_normalizer not in CLS_LOSS_NORMALIZERS:
            raise ValueError(
                f"cls_loss_normalizer (MODEL.MUSU.CLS_LOSS_NORMALIZER) must be one of "
                f"{CLS_LOSS_NORMALIZERS}, got {cls_loss_normalizer!r}"
            )
        self.cls_loss_normalizer = cls_loss_normalizer
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
            "assigner": build_training_assigner(cfg),
            "shadow_assigner": (
                build_assigner(cfg, "SHADOW_ASSIGNER") if musu.SHADOW_ASSIGNER else None
            ),
            "num_classes": musu.NUM_CLASSES,
            "focal_loss_alpha": musu.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": musu.FOCAL_LOSS_GAMMA,
            "beta": musu.BETA,
            "reg_loss_weight": musu.REG_LOSS_WEIGHT,
            "cls_loss_normalizer": musu.CLS_LOSS_NORMALIZER,
            "test_score_thresh": musu.SCORE_THRESH_TEST,
            "test_topk_candidates": musu.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": musu.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """Detectron2's forward; in training, the boxes are checked to be finite first."""
        if self.training:
            _check_finite_boxes(batched_inputs)
        return super().forward(batched_inputs)

    def _flatten_predictions(
        self, predictions: List[List[Tensor]]
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Per level (N, H*W*A, C), (N, H*W*A, 4), (N, H*W*A)."""
        logits, box_reg, objectness = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1]
        )
        return logits, box_reg, [x.squeeze(-1) for x in objectness]

    def anchor_grid(self, features: List[Tensor]) -> AnchorGrid:
        """The anchor layout of the head outputs on ``features`` (one tensor per level)."""
        sizes = tuple((f.shape[-2], f.shape[-1]) for f in features)
        return AnchorGrid(sizes, tuple(self.strides), self.num_anchors)

    def forward_training(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: List[List[Tensor]],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        logits, box_reg, objectness = self._flatten_predictions(predictions)
        check_finite_predictions("MuSu", {"box regression": box_reg})
        # Assignment and losses run in float32 even under mixed precision.
        with torch.autocast(device_type=images.tensor.device.type, enabled=False):
            cls_logits = torch.cat(logits, dim=1).float()  # (N, R, C)
            log_distances = torch.cat(box_reg, dim=1).float()  # (N, R, 4)
            obj_logits = torch.cat(objectness, dim=1).float()  # (N, R)
            grid = self.anchor_grid(features)
            device = features[0].device
            points, strides = grid.points(device), grid.point_strides(device)  # (R, 2), (R,)
            pred_boxes = decode_boxes(points, strides, log_distances)  # (N, R, 4)

            gt_boxes, gt_classes, crowd_boxes = _split_crowd(gt_instances)
            assigner = self.assigner
            if crowd_boxes is not None:
                assigner = IgnoreCrowdRegions(assigner, crowd_boxes)
            with torch.no_grad():
                scores = cls_logits.detach().sigmoid() * obj_logits.detach().sigmoid()[..., None]
                assignment = assigner(grid, scores, pred_boxes.detach(), gt_boxes, gt_classes)
            self._log_assignment(
                grid, scores, pred_boxes.detach(), gt_boxes, gt_classes, assignment
            )
            return self.losses(cls_logits, obj_logits, pred_boxes, gt_boxes, gt_classes, assignment)

    def losses(
        self,
        cls_logits: Tensor,
        obj_logits: Tensor,
        pred_boxes: Tensor,
        gt_boxes: List[Tensor],
        gt_classes: List[Tensor],
        assignment: Assignment,
    ) -> Dict[str, Tensor]:
        """Eq. 7 and weighted GIoU, each normalized by its summed weights (Eq. 5); with
        ``cls_loss_normalizer == "members"`` Eq. 7 is divided instead by the number of anchors
        with a classification target that are not ignored."""
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
        reg_gt_index = assignment.reg_target_index  # (N, R)
        image_index, anchor_index = reg_mask.nonzero(as_tuple=True)
        target_boxes = padded_boxes[image_index, reg_gt_index[reg_mask]]  # (P, 4)
        loss_reg = weighted_giou_loss(
            pred_boxes[image_index, anchor_index], target_boxes, assignment.reg_weight[reg_mask]
        )
        if self.cls_loss_normalizer == "members":
            members = assigned if assignment.ignore is None else assigned & ~assignment.ignore
            cls_normalizer = _reduce_mean_normalizer(members.sum())
        else:
            cls_normalizer = _reduce_mean_normalizer(assignment.cls_weight.sum())
        reg_normalizer = _reduce_mean_normalizer(assignment.reg_weight.sum())
        return {
            "loss_musu_cls": loss_cls / cls_normalizer,
            "loss_musu_reg": self.reg_loss_weight * loss_reg / reg_normalizer,
        }

    def _log_assignment(
        self,
        grid: AnchorGrid,
        scores: Tensor,
        pred_boxes: Tensor,
        gt_boxes: List[Tensor],
        gt_classes: List[Tensor],
        assignment: Assignment,
    ) -> None:
        """Log ``assignment_diagnostics`` of the training assignment as ``musu/*`` and, with a
        shadow assigner, of its assignment on the same inputs as ``musu_shadow/*`` (only inside
        a trainer; the shadow assignment is never trained on)."""
        try:
            storage = get_event_storage()
        except AssertionError:  # called outside a trainer (no EventStorage): nothing to log
            return
        logged = [("musu", assignment)]
        if self.shadow_assigner is not None:
            with torch.no_grad():
                shadow = self.shadow_assigner(grid, scores, pred_boxes, gt_boxes, gt_classes)
            logged.append(("musu_shadow", shadow))
        for prefix, result in logged:
            for name, value in assignment_diagnostics(result, grid, pred_boxes, gt_boxes).items():
                storage.put_scalar(f"{prefix}/{name}", value)

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ) -> List[Instances]:
        logits, box_reg, objectness = self._flatten_predictions(predictions)
        sizes = [(f.shape[-2], f.shape[-1]) for f in features]
        cells = [  # per level: the cell boxes (H*W*A, 4) of the points, shared by all images
            CellBoxTransform.cell_boxes(
                *anchor_points([size], [stride], self.num_anchors, self.device)
            )
            for size, stride in zip(sizes, self.strides)
        ]
        results: List[Instances] = []
        for index, image_size in enumerate(images.image_sizes):
            scores = [  # per level (H*W*A, C)
                cls[index].sigmoid() * obj[index].sigmoid()[:, None]
                for cls, obj in zip(logits, objectness)
            ]
            deltas = [x[index] for x in box_reg]
            candidates = self._decode_multi_level_predictions(
                cells, scores, deltas, self.test_score_thresh, self.test_topk_candidates, image_size
            )
            keep = batched_nms(
                candidates.pred_boxes.tensor,
                candidates.scores,
                candidates.pred_classes,
                self.test_nms_thresh,
            )
            results.append(candidates[keep[: self.max_detections_per_image]])
        return results
