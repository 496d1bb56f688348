"""int8 static quantization of an exported ONNX detector with ONNX Runtime.

``quantize_onnx(float_path, int8_path, images)`` writes a QDQ model (int8 weights per output
channel, uint8 activations, scales from a calibration pass over ``images``). Only the
convolutions of the backbone, the FPN and the head, and the backbone's ops between them (ReLU,
residual ``Add``, ``MaxPool``, the FPN's ``Resize``) are quantized; everything after the head
(score threshold, top-k, box decoding, NMS, the detection cap) and the head's GroupNorm and ReLU
stay float32. Layers named in ``float_layers`` (module names such as ``head.bbox_pred``) stay
float32 as well: float weights, and float inputs even where the same tensor also feeds a
quantized layer (no ``DequantizeLinear`` before them); where their output feeds a quantized
layer, that layer quantizes it (a ``QuantizeLinear`` after them). The file keeps the float model's export metadata, so
:class:`musu.export.ExportedModel` runs it like any other ``.onnx`` file.

ONNX node names follow the traced module scopes (``/head/cls_score_2/Conv`` is the third call of
``head.cls_score``, ``/backbone/bottom_up/res2/res2.0/conv1/Conv`` is
``backbone.bottom_up.res2.0.conv1``); :func:`node_modules` maps them back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from torch import Tensor

from .exporting import preprocess_image

__all__ = [
    "ALWAYS_FLOAT_LAYERS",
    "CALIBRATION_METHODS",
    "DEFAULT_FLOAT_LAYERS",
    "QUANTIZATION_KEY",
    "QUANTIZED_MODULES",
    "QUANTIZED_OPS",
    "UnknownLayerError",
    "calibration_images",
    "node_modules",
    "parse_layer_list",
    "quantize_onnx",
    "quantized_nodes",
]

QUANTIZED_MODULES = ("backbone", "head")
"""Top-level modules whose nodes may be quantized; nothing outside them (decoding, NMS) is.
(The keys of :data:`QUANTIZED_OPS`.)"""

QUANTIZED_OPS = {"backbone": ("Conv", "Relu", "Add", "MaxPool", "Resize"), "head": ("Conv",)}
"""Op types quantized inside each of :data:`QUANTIZED_MODULES`. In the head only the
convolutions: its GroupNorm and the ReLU after it stay float (a quantized ReLU there would only
round the next convolution's input one op before that convolution does)."""

DEFAULT_FLOAT_LAYERS: Tuple[str, ...] = ("head.cls_score",)
"""Layers kept in float32 by default, besides :data:`ALWAYS_FLOAT_LAYERS`: the classification
output convolution. Quantized, it costs the trained BCCD model 4.9 AP; in float32 the int8 model
is within 0.1 AP of float32 (docs/DEPLOY.md has the per-layer measurements)."""

ALWAYS_FLOAT_LAYERS = ("head.objectness",)
"""Layers never quantized, whatever ``float_layers`` says: with MuSu's objectness convolution in
QDQ form, ONNX Runtime 1.32's graph optimizer aborts the process (a C++ assertion) while
creating the session. It is one output channel per anchor: a negligible share of the MACs."""

CALIBRATION_METHODS = ("minmax",)
"""Calibration methods offered. ONNX Runtime 1.32's histogram methods (percentile, entropy) fail on
these graphs (``ValueError: ... inhomogeneous shape`` while collecting the histograms of BCCD
images), so MinMax is the one method."""

QUANTIZATION_KEY = "musu.quantization"
"""``metadata_props`` key of a quantized file: what was quantized and what stayed float."""


class UnknownLayerError(ValueError):
    """A float layer name that matches no quantizable node of the model."""


_CALL_SUFFIX = re.compile(r"_\d+$")


def node_modules(model) -> Dict[str, str]:
    """``{node name: module name}`` for every node of ``model`` (an ``onnx.ModelProto``) traced
    inside a module, e.g. ``/head/cls_score_2/Conv`` -> ``head.cls_score``; nodes outside any
    module (e.g. ``/Concat``) are left out."""
    modules = {}
    for node in model.graph.node:
        parts = node.name.strip("/").split("/")[:-1]
        names: List[str] = []
        for part in parts:
            part = _CALL_SUFFIX.sub("", part)
            if names and part.startswith(names[-1].split(".")[-1] + "."):
                # a child scope is spelled "<parent>.<child>" (Sequential / ModuleList items)
                part = part[len(names[-1].split(".")[-1]) + 1 :]
            names.append(part)
        if names:
            modules[node.name] = ".".join(names)
    return modules


def parse_layer_list(text: str) -> List[str]:
    """Comma-separated module names (``"head.bbox_pred,head.cls_score"``) as a list; ``""``
    is the empty list. The command-line type of ``--float-layers``."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _in_layer(module: str, layers: Iterable[str]) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


def quantized_nodes(model, float_layers: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``(to_quantize, kept_float)``: the names of the nodes of ``model`` that are quantized
    (:data:`QUANTIZED_OPS` inside :data:`QUANTIZED_MODULES`, not in ``float_layers`` or
    :data:`ALWAYS_FLOAT_LAYERS`) and of the nodes of those op types kept in float.
    :class:`UnknownLayerError` naming the layer when an entry of ``float_layers`` matches no
    quantizable node."""
    modules = node_modules(model)
    candidates = [
        node.name
        for node in model.graph.node
        if node.name in modules
        and any(
            _in_layer(modules[node.name], [top]) and node.op_type in ops
            for top, ops in QUANTIZED_OPS.items()
        )
    ]
    for layer in float_layers:
        if not any(_in_layer(modules[name], [layer]) for name in candidates):
            known = sorted({modules[n] for n in candidates if modules[n].count(".") <= 2})
            raise UnknownLayerError(
                f"float layer {layer!r} matches no quantizable node of the model; layers are "
                f"module names such as {', '.join(known[:8])}, ..."
            )
    float_layers = [*float_layers, *ALWAYS_FLOAT_LAYERS]
    kept = [name for name in candidates if _in_layer(modules[name], float_layers)]
    quantized = [name for name in candidates if name not in set(kept)]
    return quantized, kept


def calibration_images(cfg: CfgNode, dataset_name: str, num_images: int) -> List[Tensor]:
    """``num_images`` images of the registered dataset ``dataset_name``, evenly spaced over it
    (all of them if it has fewer), read as BGR and preprocessed as the exported graph expects
    (:func:`musu.export.preprocess_image`). ``KeyError`` naming the dataset if it is not
    registered; ``ValueError`` if ``num_images`` < 1 or the dataset is empty."""
    if num_images < 1:
        raise ValueError(f"number of calibration images must be >= 1, got {num_images}")
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"calibration dataset {dataset_name!r} is not registered (register it with "
            "--register-coco NAME JSON_FILE IMAGE_ROOT, or use a built-in name such as "
            "musu_synthetic_train or bccd_train)"
        )
    records = DatasetCatalog.get(dataset_name)
    if not records:
        raise ValueError(f"calibration dataset {dataset_name!r} has no images")
    count = min(num_images, len(records))
    picks = np.linspace(0, len(records) - 1, count).round().astype(int)
    return [preprocess_image(read_image(records[i]["file_name"], format="BGR"), cfg) for i in picks]


def _calibration_reader(images: Sequence[Tensor]):
    from onnxruntime.quantization import CalibrationDataReader

    class CalibrationImages(CalibrationDataReader):
        """Feeds each preprocessed image once as the graph's ``image`` input."""

        def __init__(self) -> None:
            self._items = iter(
                [{"image": image.detach().float().cpu().numpy()} for image in images]
            )

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            return next(self._items, None)

    return CalibrationImages()


def _unshare_biases(model) -> None:
    """Give every convolution its own bias initializer (in place). Constant folding merges equal
    initializers (e.g. the zero biases of a fresh model), and the quantizer rewires every reader
    of a bias it quantizes, float convolutions included."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    readers: Dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or len(node.input) < 3:
            continue
        bias = node.input[2]
        if bias in initializers and readers[bias] > 1:
            copy = numpy_helper.from_array(
                numpy_helper.to_array(initializers[bias]), f"{bias}_conv{index}"
            )
            model.graph.initializer.append(copy)
            node.input[2] = copy.name
            readers[bias] -= 1


def _float_inputs(model, nodes: Sequence[str]) -> None:
    """Let ``nodes`` read the float tensors themselves (in place): an input that is
    ``DequantizeLinear(QuantizeLinear(x))`` becomes ``x``. The quantizer hands every reader of a
    quantized tensor its dequantized copy, also readers it was told to leave in float."""
    producer = {out: node for node in model.graph.node for out in node.output}
    names = set(nodes)
    for node in model.graph.node:
        if node.name not in names:
            continue
        for index, name in enumerate(node.input):
            dequantize = producer.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            quantize = producer.get(dequantize.input[0])
            if quantize is not None and quantize.op_type == "QuantizeLinear":
                node.input[index] = quantize.input[0]


@contextlib.contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantization tools warn through the root logger (pre-processing advice,
    per-node notes); keep them out of the tool's output while they run."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_onnx(
    float_path: str | os.PathLike,
    output_path: str | os.PathLike,
    images: Sequence[Tensor],
    float_layers: Sequence[str] = DEFAULT_FLOAT_LAYERS,
    method: str = "minmax",
    reduce_range: bool = False,
) -> Path:
    """Static int8 quantization (ONNX Runtime, QDQ format, int8 weights per output channel, uint8
    activations) of the exported ONNX detector at ``float_path``, calibrated on ``images``
    (preprocessed (3, H, W) float32 tensors, e.g. from :func:`calibration_images`), written to
    ``output_path``. Layers in ``float_layers`` stay float32 (see :func:`quantized_nodes`); so does
    everything after the head. The float file's metadata is kept and :data:`QUANTIZATION_KEY`
    added. Returns ``output_path``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if method not in CALIBRATION_METHODS:
        raise ValueError(
            f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}"
        )
    if not images:
        raise ValueError("quantization needs at least one calibration image")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {p.key: p.value for p in onnx.load(str(float_path)).metadata_props}
    with tempfile.TemporaryDirectory() as scratch, _quiet_quantizer():
        # ONNX Runtime's recommended pre-processing: constant folding (the head's weights, shared
        # by the FPN levels, become initializers again) and shape inference. Node names are kept.
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        _unshare_biases(model)
        onnx.save(model, str(prepared))
        to_quantize, kept = quantized_nodes(model, float_layers)
        quantize_static(
            str(prepared),
            str(output_path),
            _calibration_reader(images),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=sorted({op for ops in QUANTIZED_OPS.values() for op in ops}),
            per_channel=True,
            reduce_range=reduce_range,
            # uint8 activations, int8 weights (U8S8): the pair ONNX Runtime's x86 CPU kernels fuse
            # into QLinearConv (with int8 activations most convolutions stay DQ -> float Conv).
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=to_quantize,
            calibrate_method=_CALIBRATION_METHODS[method](CalibrationMethod),
        )
    quantized = onnx.load(str(output_path))
    _float_inputs(quantized, kept)
    del quantized.metadata_props[:]
    modules = node_modules(quantized)
    float_names = [
        layer
        for layer in dict.fromkeys([*float_layers, *ALWAYS_FLOAT_LAYERS])
        if any(_in_layer(modules.get(name, ""), [layer]) for name in kept)
    ]
    metadata[QUANTIZATION_KEY] = (
        f"int8 QDQ, per-channel weights, {method} calibration on {len(images)} images; "
        f"{len(to_quantize)} nodes quantized; float layers: {', '.join(float_names) or 'none'}"
    )
    for key, value in metadata.items():
        quantized.metadata_props.add(key=key, value=value)
    onnx.save(quantized, str(output_path))
    return output_path


_CALIBRATION_METHODS = {"minmax": lambda methods: methods.MinMax}
