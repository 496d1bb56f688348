"""DenseDetectorWithTTA: one plain pass equals the model, a flip mirrors, the merge keeps the cap.

Models are the synthetic configs at random initialization (score threshold 0, so that every image
has many candidates), on CPU, with 64 x 80 px inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import Instances
from torch import nn

import musu
from musu.cli import parse_tool_args
from musu.data import register_synthetic_split
from musu.modeling import DenseDetectorWithTTA

import train_net  # the root script (conftest.py puts the root on sys.path)

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 64, 80
MODELS = {  # name: (config file, overrides that keep every candidate above a zero threshold)
    "musu": (
        "configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml",
        ["MODEL.MUSU.SCORE_THRESH_TEST", "0.0"],
    ),
    "musu_two_slots": (  # the recommended config: anchor slots of 4 and 8 strides
        "configs/Synthetic/musu_R_18_FPN_1200it.yaml",
        ["MODEL.MUSU.SCORE_THRESH_TEST", "0.0"],
    ),
    "fcos": (
        "configs/Synthetic/fcos_R_18_FPN_1200it.yaml",
        ["MODEL.MUSU.SCORE_THRESH_TEST", "0.0"],
    ),
    "mg_retinanet": (
        "projects/MutualGuidance/configs/Synthetic/retinanet_mg_R_18_FPN_synthetic.yaml",
        ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"],
    ),
}  # fmt: skip


def _cfg(name: str, aug_sizes: Sequence[int], flip: bool, opts: Sequence[str] = ()) -> CfgNode:
    config, overrides = MODELS[name]
    return musu.build_config(
        REPO / config,
        [
            "MODEL.DEVICE", "cpu",
            "INPUT.MIN_SIZE_TEST", str(HEIGHT), "INPUT.MAX_SIZE_TEST", "1000",
            "TEST.AUG.MIN_SIZES", str(tuple(aug_sizes)), "TEST.AUG.MAX_SIZE", "1000",
            "TEST.AUG.FLIP", str(flip),
            *overrides, *opts,
        ],
    )  # fmt: skip


def _model(cfg: CfgNode) -> nn.Module:
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _image(seed: int = 1, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)


def _inputs(image: torch.Tensor, height: int = HEIGHT, width: int = WIDTH) -> List[Dict]:
    return [{"image": image, "height": height, "width": width}]


def _by_score(instances: Instances) -> Instances:
    return instances[torch.argsort(instances.scores, descending=True, stable=True)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_scale_without_flip_gives_the_plain_model_detections(name: str) -> None:
    cfg = _cfg(name, [HEIGHT], flip=False)
    model = _model(cfg)
    inputs = _inputs(_image())
    with torch.no_grad():
        plain = _by_score(model(inputs)[0]["instances"])
    tta = _by_score(DenseDetectorWithTTA(cfg, model)(inputs)[0]["instances"])
    assert len(plain) > 10, "the test needs an image with many detections"
    assert tta.image_size == plain.image_size == (HEIGHT, WIDTH)
    assert torch.equal(tta.scores, plain.scores)
    assert torch.equal(tta.pred_classes, plain.pred_classes)
    assert torch.equal(tta.pred_boxes.tensor, plain.pred_boxes.tensor)


def test_an_input_resized_by_the_test_mapper_maps_back_to_the_original_image() -> None:
    # The original image is 2x the network input: both the plain model (detector_postprocess)
    # and the TTA pass (the inverse of DatasetMapperTTA's transforms) scale boxes by 2.
    cfg = _cfg("musu", [HEIGHT], flip=False)
    model = _model(cfg)
    inputs = _inputs(_image(), height=2 * HEIGHT, width=2 * WIDTH)
    with torch.no_grad():
        plain = _by_score(model(inputs)[0]["instances"])
    tta = _by_score(DenseDetectorWithTTA(cfg, model)(inputs)[0]["instances"])
    assert len(plain) > 10
    assert tta.image_size == (2 * HEIGHT, 2 * WIDTH)
    assert torch.equal(tta.scores, plain.scores)
    # float32 (model) against float64 (transform) scaling by 2: equal to float32 rounding.
    torch.testing.assert_close(tta.pred_boxes.tensor, plain.pred_boxes.tensor, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("name", ["musu_two_slots", "fcos", "mg_retinanet"])
def test_a_flipped_image_gives_mirrored_boxes(name: str) -> None:
    # With the flip on, the passes over an image and over its mirror image are the same two
    # passes, so the detections of the mirror image are the mirrored detections.
    cfg = _cfg(name, [HEIGHT], flip=True)
    tta = DenseDetectorWithTTA(cfg, _model(cfg))
    image = _image()
    found = _by_score(tta(_inputs(image))[0]["instances"])
    mirrored = _by_score(tta(_inputs(image.flip(-1)))[0]["instances"])
    assert len(found) > 10
    assert torch.equal(mirrored.scores, found.scores)
    assert torch.equal(mirrored.pred_classes, found.pred_classes)
    boxes = found.pred_boxes.tensor
    expected = torch.stack([WIDTH - boxes[:, 2], boxes[:, 1], WIDTH - boxes[:, 0], boxes[:, 3]], 1)
    torch.testing.assert_close(mirrored.pred_boxes.tensor, expected, rtol=0, atol=1e-4)


def test_the_merge_of_several_scales_and_flips_keeps_the_cap() -> None:
    cap = 7
    cfg = _cfg("musu", [HEIGHT, 96, 48], flip=True, opts=["TEST.DETECTIONS_PER_IMAGE", str(cap)])
    model = _model(cfg)
    merged = DenseDetectorWithTTA(cfg, model, batch_size=2)(_inputs(_image()))[0]["instances"]
    assert len(merged) == cap
    assert torch.all(merged.scores[:-1] >= merged.scores[1:])
    boxes = merged.pred_boxes.tensor
    assert (
        torch.all(boxes >= 0)
        and torch.all(boxes[:, 2] <= WIDTH)
        and torch.all(boxes[:, 3] <= HEIGHT)
    )
    # The model's own settings are back after the passes.
    assert model.max_detections_per_image == cap
    assert model.test_nms_thresh == cfg.MODEL.MUSU.NMS_THRESH_TEST


def test_a_model_that_is_not_a_dense_detector_is_refused() -> None:
    cfg = _cfg("musu", [HEIGHT], flip=False)
    with pytest.raises(TypeError, match="DenseDetector.*GeneralizedRCNNWithTTA"):
        DenseDetectorWithTTA(cfg, nn.Linear(2, 2))


@pytest.fixture(scope="module")
def tiny_val(tmp_path_factory: pytest.TempPathFactory) -> str:
    name = "tta_tiny_val"
    register_synthetic_split(
        name, tmp_path_factory.mktemp("tta_data"), "val", num_images=3, seed=5, image_size=96
    )
    return name


@pytest.mark.parametrize("name", ["musu_two_slots", "fcos", "mg_retinanet"])
def test_eval_only_with_test_aug_enabled_reports_plain_and_tta_results(
    name: str, tiny_val: str, tmp_path: Path
) -> None:
    config, overrides = MODELS[name]
    torch.manual_seed(0)
    weights = tmp_path / "weights.pth"
    model = build_model(musu.build_config(REPO / config, ["MODEL.DEVICE", "cpu", *overrides]))
    torch.save({"model": model.state_dict()}, weights)
    argv = [
        "--config-file", str(REPO / config), "--eval-only",
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "out"),
        "DATASETS.TEST", f"('{tiny_val}',)", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96",
        "TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(64, 96)", "TEST.AUG.MAX_SIZE", "160",
        "TEST.AUG.FLIP", "True", *overrides,
    ]  # fmt: skip
    results = train_net.main(parse_tool_args(train_net.build_parser(), argv))
    assert set(results) == {"bbox", "bbox_TTA"}
    for key in ("bbox", "bbox_TTA"):
        assert {"AP", "AP50", "AP75"} <= set(results[key])
    assert (tmp_path / "out" / "inference_TTA" / tiny_val / "coco_instances_results.json").is_file()
