"""int8 export (musu.export.quantization, tools/export_model.py --quantize int8).

A randomly initialized Quick start model (seed 0) on 64 px images, calibrated on 3 images of a
tiny synthetic split: the quantized file runs through ExportedModel and returns detections of the
right structure; the layers kept in float have no QuantizeLinear / DequantizeLinear around them;
everything after the head (decoding, NMS) has none either; argument errors name the argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import export_model as export_tool  # tools/export_model.py (conftest.py puts tools/ on sys.path)
import numpy as np
import onnx
import pytest
import torch
from detectron2.modeling import build_model
from onnx import TensorProto, helper

import musu
from musu.data import register_synthetic_split
from musu.data.synthetic import render_image
from musu.export import ExportedModel, calibration_images, export_model, quantize_onnx
from musu.export.quantization import (
    ALWAYS_FLOAT_LAYERS,
    QUANTIZATION_KEY,
    UnknownLayerError,
    node_modules,
    parse_layer_list,
    quantized_nodes,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MUSU_CONFIG = REPO_ROOT / "configs" / "Synthetic" / "musu_paper_R_18_FPN_1200it.yaml"
CALIBRATION = "int8_synthetic_calibration"
SIZE = 64
NUM_CLASSES = 5  # the Quick start config's
OPTS = [
    "MODEL.DEVICE", "cpu",
    "INPUT.MIN_SIZE_TEST", str(SIZE),
    "INPUT.MAX_SIZE_TEST", str(SIZE),
    "MODEL.MUSU.SCORE_THRESH_TEST", "0.0",
    "TEST.DETECTIONS_PER_IMAGE", "20",
]  # fmt: skip
QDQ = ("QuantizeLinear", "DequantizeLinear")
DECODING_OPS = ("Exp", "Sigmoid", "TopK", "GatherND", "NonZero")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, object]:
    """The float ONNX file of a seeded random model, its config and 3 calibration images."""
    root = tmp_path_factory.mktemp("int8")
    register_synthetic_split(
        CALIBRATION, root / "data", "train", num_images=3, seed=5, image_size=SIZE
    )
    cfg = musu.build_config(MUSU_CONFIG, OPTS)
    torch.manual_seed(0)
    path = export_model(build_model(cfg).eval(), cfg, "onnx", root / "float")
    return {"cfg": cfg, "path": path, "images": calibration_images(cfg, CALIBRATION, 3)}


def _neighbours(model: onnx.ModelProto) -> Dict[str, List[str]]:
    """Per node name: the op types of the nodes producing its inputs and consuming its outputs."""
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return {
        node.name: [producer[i].op_type for i in node.input if i in producer]
        + [c.op_type for out in node.output for c in consumers.get(out, [])]
        for node in model.graph.node
    }


def _subgraph_ops(model: onnx.ModelProto) -> List[str]:
    """Op types of every node inside the graph attributes (If branches) of the main graph."""
    ops: List[str] = []
    pending = [a.g for n in model.graph.node for a in n.attribute if a.type == a.GRAPH]
    while pending:
        graph = pending.pop()
        for node in graph.node:
            ops.append(node.op_type)
            pending += [a.g for a in node.attribute if a.type == a.GRAPH]
    return ops


def _layer_nodes(model: onnx.ModelProto, layer: str, op_type: str = "Conv") -> List[str]:
    modules = node_modules(model)
    return [
        n.name for n in model.graph.node if n.op_type == op_type and modules.get(n.name) == layer
    ]


@pytest.mark.slow
def test_quantized_model_runs_through_exported_model_with_detections_of_the_right_structure(
    exported, tmp_path: Path
) -> None:
    cfg = exported["cfg"]
    path = quantize_onnx(exported["path"], tmp_path / "model_int8.onnx", exported["images"])
    model = onnx.load(str(path))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") > 20 and ops.count("DequantizeLinear") > 20
    stored = {p.key: p.value for p in model.metadata_props}
    assert stored["INPUT.MIN_SIZE_TEST"] == str(SIZE) and "int8 QDQ" in stored[QUANTIZATION_KEY]
    # the default float layer: the classification output (and the objectness, always)
    assert "float layers: head.cls_score, head.objectness" in stored[QUANTIZATION_KEY]

    runner = ExportedModel(path, cfg, num_threads=1)
    assert runner.backend == "onnxruntime"
    image, _ = render_image(seed=9, index=0, image_size=SIZE)
    image = np.ascontiguousarray(image[:, : SIZE - 8])  # not square: (64, 56)
    result = runner(image)
    assert result.image_size == (SIZE, SIZE - 8)
    assert 0 < len(result) <= 20  # threshold 0: the detection cap binds
    boxes = result.pred_boxes.tensor
    assert boxes.shape == (len(result), 4) and boxes.dtype == torch.float32
    assert (boxes[:, 2:] >= boxes[:, :2]).all()
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= SIZE - 8).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= SIZE).all()
    assert result.scores.dtype == torch.float32
    assert ((result.scores >= 0) & (result.scores <= 1)).all()
    assert (result.scores[:-1] >= result.scores[1:]).all()  # NMS output is sorted
    assert result.pred_classes.dtype == torch.int64
    assert ((result.pred_classes >= 0) & (result.pred_classes < NUM_CLASSES)).all()


@pytest.mark.slow
def test_float_layers_and_everything_after_the_head_have_no_qdq(exported, tmp_path: Path) -> None:
    default = onnx.load(  # every layer that can be quantized is
        str(quantize_onnx(exported["path"], tmp_path / "a.onnx", exported["images"], []))
    )
    kept = onnx.load(
        str(
            quantize_onnx(
                exported["path"],
                tmp_path / "b.onnx",
                exported["images"],
                float_layers=["head.cls_score", "backbone.bottom_up.stem"],
            )
        )
    )
    for layer in ("head.cls_score", "backbone.bottom_up.stem.conv1"):
        # quantized unless named: a DequantizeLinear feeds each of its convolutions ...
        assert _layer_nodes(default, layer), layer
        for name in _layer_nodes(default, layer):
            assert "DequantizeLinear" in _neighbours(default)[name], (layer, name)
        # ... and kept in float when named: no Q / DQ on either side
        for name in _layer_nodes(kept, layer):
            assert not set(_neighbours(kept)[name]) & set(QDQ), (layer, name)
    for model in (default, kept):
        neighbours = _neighbours(model)
        for layer in ALWAYS_FLOAT_LAYERS:
            for name in _layer_nodes(model, layer):
                assert not set(neighbours[name]) & set(QDQ), name
        modules = node_modules(model)
        for node in model.graph.node:  # after the head: nothing runs between a DQ and a Q
            module = modules.get(node.name, "")
            if node.op_type not in QDQ and not module.startswith(("backbone", "head")):
                around = neighbours[node.name]
                assert not ("DequantizeLinear" in around and "QuantizeLinear" in around), node.name
                if node.op_type in DECODING_OPS:
                    assert not set(around) & set(QDQ), (node.name, node.op_type)
        assert not [op for op in _subgraph_ops(model) if op in QDQ]  # NMS lives in If branches
        assert "NonMaxSuppression" in _subgraph_ops(model)
    assert _layer_nodes(kept, "head.cls_score") and len(_layer_nodes(kept, "head.cls_score")) == 5


def test_node_modules_maps_traced_scopes_to_module_names() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    names = [
        "/backbone/bottom_up/res2/res2.0/conv1/Conv",
        "/head/cls_subnet/cls_subnet.0_3/Conv",
        "/head/cls_score_2/Conv",
        "/backbone/fpn_output5/Conv",
        "/Concat",
    ]
    nodes = [helper.make_node("Relu", ["x"], [f"y{i}"], name=n) for i, n in enumerate(names)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [x]))
    assert node_modules(model) == {
        names[0]: "backbone.bottom_up.res2.0.conv1",
        names[1]: "head.cls_subnet.0",
        names[2]: "head.cls_score",
        names[3]: "backbone.fpn_output5",
    }
    assert parse_layer_list("head.cls_score, head.bbox_pred,") == [
        "head.cls_score",
        "head.bbox_pred",
    ]
    assert parse_layer_list("") == []


@pytest.mark.slow
def test_unknown_float_layer_and_calibration_dataset_are_named(exported) -> None:
    model = onnx.load(str(exported["path"]))
    with pytest.raises(UnknownLayerError, match="'head.cls_scor'"):
        quantized_nodes(model, ["head.cls_scor"])
    with pytest.raises(KeyError, match="no_such_split"):
        calibration_images(exported["cfg"], "no_such_split", 2)
    # evenly spaced over the split, capped at its size
    assert len(calibration_images(exported["cfg"], CALIBRATION, 10)) == 3


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--quantize", "int8"], "--calibration-dataset"),
        (["--quantize", "int8", "--calibration-dataset", "x", "--format", "torchscript"], "--format"),
        (["--calibration-dataset", "x"], "--quantize"),
        (["--quantize", "int8", "--calibration-dataset", "x", "--calibration-images", "0"],
         "--calibration-images"),
        (["--quantize", "int4", "--calibration-dataset", "x"], "--quantize"),
    ],
    ids=["no_calibration", "torchscript", "calibration_alone", "zero_images", "int4"],
)  # fmt: skip
def test_export_tool_argument_errors_name_the_argument(extra, named, tmp_path, capsys) -> None:
    argv = ["--config-file", str(MUSU_CONFIG), "--output", str(tmp_path), *extra]
    with pytest.raises(SystemExit) as exit_info:
        export_tool.main([*argv, "MODEL.WEIGHTS", "unused.pth"])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
