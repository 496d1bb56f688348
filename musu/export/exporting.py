"""Export a Detectron2 dense detector (MuSu, D2FCOS, the projects' detectors) to TorchScript or
ONNX by tracing.

The exported graph takes one image that the config's test transform has already resized: a
float32 (3, H, W) tensor in ``cfg.INPUT.FORMAT`` channel order, pixel values 0-255. It returns
``boxes`` (K, 4) XYXY in the pixels of that resized image, ``scores`` (K,) and ``classes`` (K,)
int64, after the model's own score threshold, top-k, class-wise NMS and detection cap. Image
normalization, padding, the backbone, the head and the decoding are all inside the graph; NMS too
(ONNX ``NonMaxSuppression``, which ONNX Runtime runs). :class:`musu.export.ExportedModel` loads
the file and maps the boxes back to the original image.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from torch import Tensor, nn

__all__ = [
    "EXPORT_FORMATS",
    "METADATA_FILE",
    "ONNX_OPSET",
    "ExportableDetector",
    "export_metadata",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "preprocess_image",
    "sample_image",
]

EXPORT_FORMATS = {"torchscript": ".ts", "onnx": ".onnx"}
"""Format name -> file suffix of the exported model."""

ONNX_OPSET = 20
"""Opset of the exported ONNX graphs (the newest torch's TorchScript-based exporter writes)."""

METADATA_FILE = "musu_export.json"
"""Name of the metadata stored with a TorchScript file (``_extra_files``); ONNX files carry the
same keys as ``metadata_props``."""

OUTPUT_NAMES = ("boxes", "scores", "classes")


class ExportableDetector(nn.Module):
    """One-image inference of a Detectron2 ``DenseDetector`` as a tensor-in, tensors-out module.

    ``forward(image)`` takes a float32 (3, H, W) image in ``cfg.INPUT.FORMAT`` order, already
    resized by the test transform, and returns ``(boxes (K, 4), scores (K,), classes (K,))`` in
    that image's pixels: the same detections as ``model([{"image": image}])`` before Detectron2's
    rescaling to an output size.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name in ("preprocess_image", "backbone", "head", "head_in_features"):
            if not hasattr(model, name):
                raise TypeError(
                    f"{type(model).__name__} is not a Detectron2 DenseDetector (no {name!r}): "
                    "only dense detectors (MuSu, D2FCOS, RetinaNet-style) can be exported"
                )
        self.model = model
        self.eval()

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        model = self.model
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        predictions = model.head(features)
        result = model.forward_inference(images, features, predictions)[0]
        return result.pred_boxes.tensor, result.scores, result.pred_classes


def resize_transform(cfg: CfgNode) -> T.ResizeShortestEdge:
    """The resize Detectron2's ``DefaultPredictor`` and test loader apply."""
    return T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )


def preprocess_image(image_bgr: np.ndarray, cfg: CfgNode) -> Tensor:
    """An original BGR ``uint8`` (H, W, 3) image as the exported graph's input: channel order
    ``cfg.INPUT.FORMAT``, resized by the test transform, float32 (3, h, w). Exactly what
    Detectron2's ``DefaultPredictor`` feeds the model."""
    if not isinstance(image_bgr, np.ndarray) or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        shape = getattr(image_bgr, "shape", None)
        raise ValueError(
            f"expected a BGR image as a numpy array of shape (H, W, 3), got "
            f"{type(image_bgr).__name__} of shape {shape}"
        )
    if image_bgr.shape[0] == 0 or image_bgr.shape[1] == 0:
        raise ValueError(f"image has no pixels: shape {image_bgr.shape}")
    if cfg.INPUT.FORMAT not in ("BGR", "RGB"):
        raise ValueError(f"INPUT.FORMAT must be BGR or RGB for export, got {cfg.INPUT.FORMAT!r}")
    image = image_bgr[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else image_bgr
    image = resize_transform(cfg).get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(image.astype("float32").transpose(2, 0, 1)))


def sample_image(cfg: CfgNode, image_bgr: Optional[np.ndarray] = None) -> Tensor:
    """The tracing input: ``image_bgr`` (default: image 0 of the built-in synthetic stream,
    rendered at ``INPUT.MIN_SIZE_TEST``) through :func:`preprocess_image`."""
    if image_bgr is None:
        from ..data.synthetic import render_image

        image_bgr, _ = render_image(seed=2021, index=0, image_size=int(cfg.INPUT.MIN_SIZE_TEST))
    return preprocess_image(image_bgr, cfg)


def export_metadata(cfg: CfgNode) -> Dict[str, str]:
    """What a runtime must match: the input format and test resize the graph was exported for."""
    return {
        "MODEL.META_ARCHITECTURE": str(cfg.MODEL.META_ARCHITECTURE),
        "INPUT.FORMAT": str(cfg.INPUT.FORMAT),
        "INPUT.MIN_SIZE_TEST": str(cfg.INPUT.MIN_SIZE_TEST),
        "INPUT.MAX_SIZE_TEST": str(cfg.INPUT.MAX_SIZE_TEST),
    }


def _ignore_tracing_warnings() -> None:
    """Tracer and deprecation warnings are expected while exporting (the tests check the graph on
    images of other sizes); call inside ``warnings.catch_warnings()``."""
    for category in (torch.jit.TracerWarning, FutureWarning, DeprecationWarning, UserWarning):
        warnings.simplefilter("ignore", category)


def export_torchscript(
    model: nn.Module, sample: Tensor, path: str | os.PathLike, metadata: Dict[str, str]
) -> Path:
    """Trace ``model`` (a DenseDetector) on ``sample`` and save it to ``path`` with ``metadata``.

    The trace records shapes symbolically: the saved module runs on images of any size."""
    module = ExportableDetector(model)
    with warnings.catch_warnings(), torch.no_grad():
        _ignore_tracing_warnings()
        traced = torch.jit.trace(module, (sample,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})
    return Path(path)


def export_onnx(
    model: nn.Module,
    sample: Tensor,
    path: str | os.PathLike,
    metadata: Dict[str, str],
    opset: int = ONNX_OPSET,
) -> Path:
    """Export ``model`` (a DenseDetector) to ONNX at ``opset`` by tracing on ``sample``; input
    ``image`` (3, H, W) with dynamic H, W; outputs ``boxes``, ``scores``, ``classes``; NMS in the
    graph. ``metadata`` goes into the file's ``metadata_props``."""
    import onnx

    module = ExportableDetector(model)
    with warnings.catch_warnings(), torch.no_grad():
        _ignore_tracing_warnings()
        torch.onnx.export(
            module,
            (sample,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                "image": {1: "height", 2: "width"},
                **{name: {0: "detections"} for name in OUTPUT_NAMES},
            },
        )
    graph = onnx.load(str(path))
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    return Path(path)


def export_model(
    model: nn.Module,
    cfg: CfgNode,
    export_format: str,
    output_dir: str | os.PathLike,
    sample: Optional[Tensor] = None,
) -> Path:
    """Export ``model`` built from ``cfg`` as ``output_dir/model.ts`` (``"torchscript"``) or
    ``output_dir/model.onnx`` (``"onnx"``); ``sample`` defaults to :func:`sample_image`.
    Returns the file's path."""
    if export_format not in EXPORT_FORMATS:
        raise ValueError(
            f"export format must be one of {sorted(EXPORT_FORMATS)}, got {export_format!r}"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"model{EXPORT_FORMATS[export_format]}"
    sample = sample_image(cfg) if sample is None else sample
    metadata = export_metadata(cfg)
    model = model.eval()
    if export_format == "torchscript":
        return export_torchscript(model, sample, path, metadata)
    return export_onnx(model, sample, path, metadata)
