"""Run an exported detector (``.ts`` TorchScript or ``.onnx`` with ONNX Runtime) and get
Detectron2 ``Instances`` back, as from the PyTorch model."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import Tensor

from .exporting import METADATA_FILE, export_metadata, preprocess_image

__all__ = ["ExportedModel"]

_TORCHSCRIPT_SUFFIXES = (".ts", ".pt", ".torchscript")


class ExportedModel:
    """An exported detector file and the config it was exported from.

    ``ExportedModel(path, cfg)(image_bgr)`` returns the detections of an original BGR ``uint8``
    (H, W, 3) image as ``Instances`` of size (H, W) with ``pred_boxes`` (XYXY, original pixels,
    clipped to the image), ``scores`` and ``pred_classes``: the config's test resize, the exported
    graph (normalization, backbone, head, decoding, NMS), then Detectron2's
    ``detector_postprocess`` (rescale, clip, drop empty boxes), as ``DefaultPredictor`` does.

    ``path`` ends in ``.onnx`` (run by ONNX Runtime on the CPU, ``num_threads`` intra-op threads,
    default torch's count) or ``.ts`` / ``.pt`` (TorchScript). The file's stored input format and
    test sizes must equal ``cfg``'s (``ValueError`` naming the key otherwise).
    """

    def __init__(self, path: str | os.PathLike, cfg: CfgNode, num_threads: Optional[int] = None):
        self.path = Path(path)
        self.cfg = cfg
        if not self.path.is_file():
            raise FileNotFoundError(f"exported model {self.path} not found")
        suffix = self.path.suffix.lower()
        if suffix == ".onnx":
            self.backend = "onnxruntime"
            self._session, stored = _load_onnx(self.path, num_threads)
        elif suffix in _TORCHSCRIPT_SUFFIXES:
            self.backend = "torchscript"
            self._module, stored = _load_torchscript(self.path)
        else:
            raise ValueError(
                f"exported model {self.path}: unknown suffix {suffix!r} (expected .onnx for ONNX "
                f"Runtime or one of {', '.join(_TORCHSCRIPT_SUFFIXES)} for TorchScript)"
            )
        _check_metadata(self.path, stored, export_metadata(cfg))

    def run_resized(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The graph on one resized float32 (3, h, w) image: boxes (K, 4) in its pixels,
        scores (K,), classes (K,) int64."""
        if self.backend == "onnxruntime":
            outputs = self._session.run(None, {"image": image.detach().float().cpu().numpy()})
            boxes, scores, classes = (torch.from_numpy(np.asarray(x)) for x in outputs)
        else:
            with torch.no_grad():
                boxes, scores, classes = self._module(image.float())
        return boxes.float(), scores.float(), classes.long()

    def _instances(self, image: Tensor, height: int, width: int) -> Instances:
        boxes, scores, classes = self.run_resized(image)
        resized = Instances(
            tuple(image.shape[-2:]), pred_boxes=Boxes(boxes), scores=scores, pred_classes=classes
        )
        return detector_postprocess(resized, height, width)

    def __call__(self, image_bgr: np.ndarray) -> Instances:
        """Detections of an original BGR (H, W, 3) image, in its pixels."""
        image = preprocess_image(image_bgr, self.cfg)
        return self._instances(image, image_bgr.shape[0], image_bgr.shape[1])

    def inference_on_batch(
        self, batched_inputs: List[Dict[str, Any]]
    ) -> List[Dict[str, Instances]]:
        """Detectron2 model calling convention on test-loader items (``image`` already resized,
        ``height`` / ``width`` the original size): ``[{"instances": Instances}, ...]``. Pass
        this to ``detectron2.evaluation.inference_on_dataset``."""
        outputs = []
        for item in batched_inputs:
            image = item["image"]
            height = item.get("height", image.shape[-2])
            width = item.get("width", image.shape[-1])
            outputs.append({"instances": self._instances(image, height, width)})
        return outputs


def _load_onnx(path: Path, num_threads: Optional[int]):
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = num_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    stored = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return session, stored


def _load_torchscript(path: Path):
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    stored = json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}
    return module.eval(), stored


def _check_metadata(path: Path, stored: Dict[str, str], expected: Dict[str, str]) -> None:
    if not stored:
        raise ValueError(
            f"exported model {path} has no musu export metadata: export it with "
            "tools/export_model.py (or musu.export.export_model)"
        )
    for key in expected:
        if stored.get(key) != expected[key]:
            raise ValueError(
                f"exported model {path} was exported for {key}={stored.get(key)}, but the config "
                f"has {key}={expected[key]}: use the config the model was exported with"
            )
