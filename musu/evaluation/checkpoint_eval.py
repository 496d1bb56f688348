"""One call that evaluates a checkpoint the way ``tools/compare.py`` tabulates it: COCO AP,
AP / AP50 / AP75 per size band, inference time per image and score/IoU consistency before and
after NMS.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, ContextManager, Dict, List, Optional, Sequence

from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, inference_on_dataset
from torch import nn

from ..config import build_config
from ..engine.amp import autocast_context, resolve_autocast
from ..model_zoo import load_model
from ..modeling import DenseDetectorWithTTA
from .consistency import PRE_NMS_OPTS, ConsistencyEvaluator
from .size_bands import evaluate_size_bands

__all__ = ["evaluate_checkpoint"]


class _TimedModel(nn.Module):
    """Wraps a model; accumulates forward wall time after ``warmup`` calls (batch-1 loader)."""

    def __init__(self, model: nn.Module, warmup: int) -> None:
        super().__init__()
        self.model, self.warmup = model, warmup
        self.calls, self.images, self.seconds = 0, 0, 0.0

    def forward(self, inputs):  # noqa: D401 - same contract as the wrapped model
        start = time.perf_counter()
        outputs = self.model(inputs)
        elapsed = time.perf_counter() - start
        self.calls += 1
        if self.calls > self.warmup:
            self.images += len(inputs)
            self.seconds += elapsed
        return outputs


def evaluate_checkpoint(
    config_file: str,
    checkpoint: str,
    opts: Sequence[str],
    output_dir: Path,
    warmup: int = 5,
    max_images: int = 0,
    model_context: Optional[Callable[[nn.Module], ContextManager]] = None,
) -> Dict[str, float]:
    """Evaluate ``checkpoint`` with ``config_file`` and ``opts`` on ``DATASETS.TEST[0]``, in
    this process, in two passes: the config's own inference settings (``COCOEvaluator``'s
    ``bbox`` metrics; ``AP-small``, ``AP50-small``, ``AP75-small``, ``objects-small`` and the
    same for medium and large: :func:`musu.evaluation.evaluate_size_bands` of its detections;
    ``infer_s_per_image``: forward wall time per image after ``warmup`` images; ``post_nms_*``
    consistency), then NMS disabled (:data:`PRE_NMS_OPTS`: the pre-NMS consistency of
    :class:`ConsistencyEvaluator`). ``TEST.AMP`` applies as in training.
    ``max_images > 0`` evaluates only the first images. ``model_context(model)``, when given, is
    entered around each pass with that pass's model. Returns one flat row (``dataset`` names
    the data). With ``TEST.AUG.ENABLED`` the first pass runs under test-time augmentation
    (:class:`musu.modeling.DenseDetectorWithTTA`: AP, per-band AP and time per image with it);
    the pre-NMS pass ranks the plain model's candidates. With ``max_images`` the COCO metrics
    cover the images run, as if the dataset held only those."""
    context = model_context or (lambda model: contextlib.nullcontext())
    cfg = build_config(config_file, opts)
    dataset = cfg.DATASETS.TEST[0]
    loader = build_detection_test_loader(cfg, dataset)
    if max_images > 0:
        loader = _Limited(loader, max_images)
    model = load_model(cfg, checkpoint)
    timed = _TimedModel(DenseDetectorWithTTA(cfg, model) if cfg.TEST.AUG.ENABLED else model, warmup)
    detections = output_dir / "inference" / "coco_instances_results.json"
    detections.unlink(missing_ok=True)  # COCOEvaluator writes this pass's detections there
    evaluator_class = _RunImagesCOCOEvaluator if max_images > 0 else COCOEvaluator
    coco = evaluator_class(dataset, output_dir=str(detections.parent))
    post_nms = ConsistencyEvaluator(dataset)
    precision = resolve_autocast(cfg, training=False)  # TEST.AMP, as train_net.py evaluates
    with autocast_context(precision), context(model):
        results = inference_on_dataset(timed, loader, DatasetEvaluators([coco, post_nms]))
    row: Dict[str, float] = dict(results.get("bbox", {}))
    if not detections.is_file():
        raise RuntimeError(f"COCOEvaluator wrote no {detections} (no image of {dataset} evaluated)")
    row.update(evaluate_size_bands(dataset, detections, img_ids=getattr(coco, "image_ids", None)))
    row["infer_s_per_image"] = timed.seconds / timed.images if timed.images else float("nan")
    row.update({f"post_nms_{k}": v for k, v in results["consistency"].items()})

    pre_cfg = build_config(config_file, list(opts) + PRE_NMS_OPTS)
    pre_model = load_model(pre_cfg, checkpoint)
    pre_loader = build_detection_test_loader(pre_cfg, dataset)
    if max_images > 0:
        pre_loader = _Limited(pre_loader, max_images)
    with autocast_context(precision), context(pre_model):
        pre = inference_on_dataset(pre_model, pre_loader, ConsistencyEvaluator(dataset))
    row.update(pre["consistency"])
    row["dataset"] = dataset
    return row


class _RunImagesCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator scoring only the images it processed (one process: ``max_images``)."""

    def reset(self) -> None:
        super().reset()
        self.image_ids: List[int] = []

    def process(self, inputs, outputs) -> None:
        super().process(inputs, outputs)
        self.image_ids.extend(int(x["image_id"]) for x in inputs)

    def evaluate(self, img_ids=None):
        return super().evaluate(self.image_ids if img_ids is None else img_ids)


class _Limited:
    def __init__(self, loader, count: int) -> None:
        self.loader, self.count = loader, count

    def __len__(self) -> int:
        return min(self.count, len(self.loader))

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            if index >= self.count:
                return
            yield batch
