"""Test-time augmentation for dense detectors (MuSu, Detectron2's FCOS and RetinaNet, and their
subclasses in the projects).

Detectron2's ``GeneralizedRCNNWithTTA`` accepts only two-stage models. ``DenseDetectorWithTTA``
runs a one-stage detector on every augmented copy that Detectron2's ``DatasetMapperTTA`` makes of
an image (the scales ``TEST.AUG.MIN_SIZES`` under ``TEST.AUG.MAX_SIZE``, each also flipped when
``TEST.AUG.FLIP``), maps each pass's candidates back to the original image, and keeps the
survivors of one class-wise NMS over all of them, at most ``TEST.DETECTIONS_PER_IMAGE`` per image.

A pass yields candidates, not detections: the model's own score threshold and per-level top-k
apply, but its NMS and detection cap are switched off for the pass (the model's
``test_nms_thresh`` is set to 1.0 and ``max_detections_per_image`` to unlimited), so that the one
NMS at the end sees every pass. As in the plain model, NMS and the cap act on the boxes before
they are clipped to the image, and empty boxes are dropped after. So with one scale, no flip and
an image already at that scale, the result is the plain model's detections.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.layers import batched_nms
from detectron2.modeling import DatasetMapperTTA
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, Instances
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DenseDetectorWithTTA"]


@contextlib.contextmanager
def _candidates_only(model: DenseDetector) -> Iterator[None]:
    """Inside: ``model``'s inference keeps every candidate (no NMS suppression, no cap)."""
    saved = (model.test_nms_thresh, model.max_detections_per_image)
    # batched_nms suppresses a box whose IoU with a better one is above the threshold: never at 1.
    model.test_nms_thresh, model.max_detections_per_image = 1.0, sys.maxsize
    try:
        yield
    finally:
        model.test_nms_thresh, model.max_detections_per_image = saved


class DenseDetectorWithTTA(nn.Module):
    """A dense detector with test-time augmentation; called like the model in inference.

    Input: Detectron2's model inputs (``"image"`` as the test mapper made it, ``"height"`` and
    ``"width"`` of the original image). Output: ``[{"instances": Instances}]`` in original-image
    coordinates, the same format as the plain model's.
    """

    def __init__(
        self,
        cfg: CfgNode,
        model: nn.Module,
        tta_mapper: Optional[Callable[[Dict[str, Any]], List[Dict[str, Any]]]] = None,
        batch_size: int = 3,
    ) -> None:
        """
        Args:
            cfg: the run's config (``TEST.AUG.*`` when ``tta_mapper`` is None).
            model: a ``DenseDetector`` (or a DistributedDataParallel around one).
            tta_mapper: maps one input dict to its augmented copies, each with the field
                ``"transforms"`` from the original image to the copy; default
                ``DatasetMapperTTA(cfg)``.
            batch_size: augmented copies per forward pass.
        """
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not isinstance(model, DenseDetector):
            raise TypeError(
                "DenseDetectorWithTTA needs a Detectron2 DenseDetector (MuSu, FCOS, RetinaNet and "
                f"their subclasses); got {type(model).__name__} (MODEL.META_ARCHITECTURE "
                f"{cfg.MODEL.META_ARCHITECTURE!r}). Two-stage models use Detectron2's "
                "GeneralizedRCNNWithTTA."
            )
        if batch_size < 1:
            raise ValueError(f"DenseDetectorWithTTA: batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tta_mapper = tta_mapper if tta_mapper is not None else DatasetMapperTTA(cfg)
        self.batch_size = batch_size

    def forward(self, batched_inputs: List[Dict[str, Any]]) -> List[Dict[str, Instances]]:
        return [{"instances": self._detect(inputs)} for inputs in batched_inputs]

    def _candidates(self, copies: List[Dict[str, Any]]) -> List[Instances]:
        """Each copy's candidates, boxes in that copy's frame and not clipped to it.

        The steps of ``DenseDetector.forward`` in inference, without ``detector_postprocess``.
        """
        model = self.model
        images = model.preprocess_image(copies)
        features = model.backbone(images.tensor)
        features = [features[name] for name in model.head_in_features]
        return model.forward_inference(images, features, model.head(features))

    def _detect(self, inputs: Dict[str, Any]) -> Instances:
        height, width = inputs["height"], inputs["width"]
        copies = self.tta_mapper(inputs)
        boxes, scores, classes = [], [], []
        with torch.no_grad(), _candidates_only(self.model):
            for start in range(0, len(copies), self.batch_size):
                chunk = copies[start : start + self.batch_size]
                for copy, candidates in zip(chunk, self._candidates(chunk)):
                    frame_boxes = candidates.pred_boxes.tensor
                    original = copy["transforms"].inverse().apply_box(frame_boxes.cpu().numpy())
                    boxes.append(torch.as_tensor(original, dtype=frame_boxes.dtype))
                    scores.append(candidates.scores.cpu())
                    classes.append(candidates.pred_classes.cpu())
        device = self.model.device
        merged = Instances((height, width))
        merged.pred_boxes = Boxes(torch.cat(boxes).to(device))
        merged.scores = torch.cat(scores).to(device)
        merged.pred_classes = torch.cat(classes).to(device)
        keep = batched_nms(
            merged.pred_boxes.tensor, merged.scores, merged.pred_classes, self.model.test_nms_thresh
        )
        merged = merged[keep[: self.model.max_detections_per_image]]
        merged.pred_boxes.clip((height, width))
        return merged[merged.pred_boxes.nonempty()]
