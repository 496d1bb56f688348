"""Deploy: export a trained detector to TorchScript or ONNX, and run the exported file.

``export_model(model, cfg, "onnx", output_dir)`` writes ``model.onnx`` (or ``model.ts`` for
``"torchscript"``); ``ExportedModel(path, cfg)(image_bgr)`` runs it (ONNX Runtime or TorchScript)
and returns Detectron2 ``Instances`` in the original image's pixels.
``quantize_onnx(onnx_path, int8_path, calibration_images(cfg, dataset, n))`` writes an int8 (QDQ)
copy that ``ExportedModel`` runs the same way. See docs/DEPLOY.md.
"""

from .exporting import (
    EXPORT_FORMATS,
    ONNX_OPSET,
    ExportableDetector,
    export_model,
    export_onnx,
    export_torchscript,
    preprocess_image,
    sample_image,
)
from .quantization import calibration_images, quantize_onnx
from .runtime import ExportedModel

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_OPSET",
    "ExportableDetector",
    "ExportedModel",
    "calibration_images",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "preprocess_image",
    "quantize_onnx",
    "sample_image",
]
