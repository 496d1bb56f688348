"""Reliability on dirty data and extreme numerics, through real MuSu training steps.

Two paths are exercised: the model path (hand-made ``Instances``, as a custom mapper would give)
and the data path (COCO JSON -> ``DatasetCatalog`` -> ``DatasetMapper`` ->
``build_detection_train_loader`` -> model). Every case checks that losses and gradients are
finite. Notation: N images, R anchor slots, C classes, M objects. Bad dataset files (unknown
category ids, non-finite boxes, a class count that does not fit) are rows of
tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Sequence

import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import Tensor

import musu
from musu.data import register_coco_dataset
from musu.data.synthetic import ensure_split
from musu.modeling import AnchorList, MuSu, MuSuAssigner
from musu.modeling.meta_arch import anchor_points, decode_boxes

import train_net  # the root script (conftest.py puts the root on sys.path)

REPO = Path(__file__).resolve().parents[1]

SYNTHETIC_CONFIG = REPO / "configs" / "Synthetic" / "musu_R_18_FPN_synthetic.yaml"
STRIDES = [8, 16, 32, 64, 128]


def make_cfg(size: int = 64, overrides: Sequence[Any] = ()) -> CfgNode:
    """Synthetic config (R-18, 5 classes) on CPU with ``size`` px inputs, plus ``overrides``."""
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    cfg.merge_from_file(str(SYNTHETIC_CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN = (size,)
    cfg.INPUT.MAX_SIZE_TRAIN = size
    cfg.INPUT.MIN_SIZE_TEST = size
    cfg.INPUT.MAX_SIZE_TEST = size
    cfg.merge_from_list(list(overrides))
    return cfg


@pytest.fixture(scope="module")
def model() -> MuSu:
    torch.manual_seed(0)
    net = build_model(make_cfg())
    net.train()
    return net


def make_input(
    boxes: Sequence[Sequence[float]] | Tensor,
    classes: Sequence[int] | Tensor,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    **fields: Tensor,
) -> Dict[str, Any]:
    """A training input: random (3, H, W) image in [0, 255] and its instances."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    instances = Instances(size, gt_boxes=Boxes(boxes), gt_classes=torch.as_tensor(classes).long())
    for name, value in fields.items():
        instances.set(name, value)
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(seed)) * 255
    return {"image": image, "instances": instances, "height": size[0], "width": size[1]}


def train_step(net: MuSu, batch: List[Dict[str, Any]]) -> Dict[str, float]:
    """One forward/backward; asserts finite losses and finite gradients; returns the losses."""
    net.zero_grad(set_to_none=True)
    with EventStorage():
        losses = net(batch)
    assert set(losses) == {"loss_musu_cls", "loss_musu_reg"}
    for name, value in losses.items():
        assert bool(torch.isfinite(value)), (name, value)
    sum(losses.values()).backward()
    with_grad = 0
    for name, param in net.named_parameters():
        if param.grad is not None:
            with_grad += 1
            assert bool(torch.isfinite(param.grad).all()), f"non-finite gradient in {name}"
    assert with_grad > 0
    return {k: float(v.detach()) for k, v in losses.items()}


class RecordLosses:
    """Wraps ``model.losses`` to capture the arguments the meta-arch passes (assignment, gt)."""

    def __init__(self, net: MuSu) -> None:
        self.net, self.original, self.calls = net, net.losses, []

    def __enter__(self) -> "RecordLosses":
        def record(*args: Any, **kwargs: Any) -> Dict[str, Tensor]:
            self.calls.append(args)
            return self.original(*args, **kwargs)

        self.net.losses = record
        return self

    def __exit__(self, *exc: object) -> None:
        del self.net.losses  # the instance attribute; the class method is visible again


# --------------------------------------------------------------------------------------------
# Model path: hand-made ground truth.
# --------------------------------------------------------------------------------------------

DEGENERATE = {
    "zero_size": [[10.0, 10.0, 10.0, 40.0], [20.0, 30.0, 50.0, 30.0], [5.0, 5.0, 5.0, 5.0]],
    "negative_size": [[40.0, 40.0, 20.0, 50.0], [50.0, 50.0, 10.0, 10.0]],
    "wholly_outside": [[70.0, 70.0, 100.0, 100.0], [-50.0, -40.0, -10.0, -5.0]],
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_boxes_are_never_candidates(model: MuSu, case: str) -> None:
    """Zero-, negative-size and outside boxes next to a normal object: they get no anchor, the
    normal object gets a bag, and the step is finite."""
    normal = [[8.0, 8.0, 40.0, 44.0]]
    boxes = DEGENERATE[case] + normal
    batch = [make_input(boxes, [1] * len(boxes))]
    with RecordLosses(model) as recorder:
        train_step(model, batch)
    assignment = recorder.calls[0][-1]
    normal_index = len(boxes) - 1
    assert set(assignment.gt_index[assignment.gt_index >= 0].tolist()) == {normal_index}
    assert assignment.stats["bag_size"][0, :normal_index].eq(0).all()
    assert int(assignment.stats["bag_size"][0, normal_index]) > 0


def test_image_without_objects_and_partly_outside_boxes(model: MuSu) -> None:
    """An empty image batched with an image whose boxes straddle the borders: finite, and the
    straddling objects are supervised by the anchors inside the image."""
    straddling = [[-20.0, -20.0, 30.0, 30.0], [40.0, 30.0, 200.0, 90.0]]
    batch = [make_input([], []), make_input(straddling, [0, 4], seed=1)]
    with RecordLosses(model) as recorder:
        losses = train_step(model, batch)
    assignment = recorder.calls[0][-1]
    assert assignment.gt_index[0].eq(-1).all()
    assert assignment.stats["bag_size"][1].gt(0).all()
    assert losses["loss_musu_reg"] > 0


def test_one_thousand_objects_in_one_image(model: MuSu) -> None:
    generator = torch.Generator().manual_seed(3)
    corner = torch.rand(1000, 2, generator=generator) * 100
    size = torch.rand(1000, 2, generator=generator) * 24 + 2
    boxes = torch.cat([corner, corner + size], dim=1)
    classes = torch.randint(0, 5, (1000,), generator=generator)
    batch = [make_input(boxes, classes, size=(128, 128))]
    with RecordLosses(model) as recorder:
        train_step(model, batch)
    assignment = recorder.calls[0][-1]
    assert assignment.stats["bag_size"].shape == (1, 1000)
    assert int((assignment.stats["bag_size"] > 0).sum()) > 0


def test_image_smaller_than_the_coarsest_stride(model: MuSu) -> None:
    """40 x 40 images (strides up to 128): padded to 128, every level present, finite step."""
    batch = [make_input([[4.0, 6.0, 30.0, 36.0]], [2], size=(40, 40)), make_input([], [], (40, 40))]
    with RecordLosses(model) as recorder:
        train_step(model, batch)
    assert int(recorder.calls[0][-1].stats["bag_size"][0, 0]) > 0


def test_single_class_model() -> None:
    torch.manual_seed(0)
    net = build_model(make_cfg(overrides=["MODEL.MUSU.NUM_CLASSES", 1]))
    net.train()
    assert net.head.cls_score.out_channels == 1
    losses = train_step(net, [make_input([[8.0, 8.0, 40.0, 40.0], [30, 10, 60, 50]], [0, 0])])
    assert losses["loss_musu_reg"] > 0


def test_crowd_objects_are_ignored_never_candidates(model: MuSu) -> None:
    """``gt_is_crowd`` objects never reach the assigner; unassigned anchors inside them get no
    classification loss; anchors of a normal object inside the crowd region keep theirs."""
    boxes = [[0.0, 0.0, 64.0, 40.0], [10.0, 10.0, 30.0, 30.0], [36.0, 44.0, 60.0, 62.0]]
    crowd = torch.tensor([True, False, False])
    batch = [make_input(boxes, [3, 1, 2], gt_is_crowd=crowd)]
    with RecordLosses(model) as recorder:
        train_step(model, batch)
    _, _, _, gt_boxes, gt_classes, assignment = recorder.calls[0]
    assert torch.equal(gt_boxes[0], torch.tensor(boxes[1:])) and gt_classes[0].tolist() == [1, 2]
    assert assignment.stats["bag_size"].shape == (1, 2) and assignment.stats["bag_size"].gt(0).all()
    sizes = [(-(-64 // s), -(-64 // s)) for s in STRIDES]  # ceil(64 / stride) per level
    points, _ = anchor_points(sizes, STRIDES, 1, "cpu")
    in_crowd = (points[:, 0] > 0) & (points[:, 0] < 64) & (points[:, 1] > 0) & (points[:, 1] < 40)
    assigned = assignment.gt_index[0] >= 0
    assert torch.equal(assignment.ignore[0], in_crowd & ~assigned)
    assert bool((assigned & in_crowd).any())  # object 1 lies inside the crowd box: still trained

    # The ignored anchors contribute nothing: the loss equals the loss with their logits changed.
    cls_logits, obj_logits, pred_boxes = (t.detach() for t in recorder.calls[0][:3])
    base = model.losses(cls_logits, obj_logits, pred_boxes, gt_boxes, gt_classes, assignment)
    shifted = cls_logits.clone()
    shifted[0, assignment.ignore[0]] += 5.0
    moved = model.losses(shifted, obj_logits, pred_boxes, gt_boxes, gt_classes, assignment)
    assert float(moved["loss_musu_cls"]) == pytest.approx(float(base["loss_musu_cls"]), rel=1e-6)


def test_crowd_only_image_has_no_candidates(model: MuSu) -> None:
    batch = [make_input([[0.0, 0.0, 64.0, 64.0]], [0], gt_is_crowd=torch.tensor([True]))]
    with RecordLosses(model) as recorder:
        losses = train_step(model, batch)
    assignment = recorder.calls[0][-1]
    assert assignment.gt_index.eq(-1).all() and assignment.ignore.any()
    assert losses["loss_musu_reg"] == 0.0


@pytest.mark.parametrize("bad_class", [5, 17, -1])
def test_class_index_out_of_range_is_refused_by_the_assigner(model: MuSu, bad_class: int) -> None:
    """A batch bypassing the trainer's dataset check (``check_dataset_classes``, which names the
    image and the key) still never indexes scores out of bounds: the assigner refuses it."""
    item = make_input([[8.0, 8.0, 40.0, 40.0], [1, 1, 20, 20]], [0, bad_class])
    with pytest.raises(ValueError, match=r"image 1: gt_classes must lie in \[0, 5\)"):
        with EventStorage():
            model([make_input([], []), item])


def test_assigner_rejects_class_out_of_range() -> None:
    """The assigner path on its own raises too (it never indexes scores out of bounds)."""
    points, _ = anchor_points([(8, 8)], [8], 1, "cpu")
    scores = torch.full((1, 64, 3), 0.5)
    boxes = decode_boxes(points, torch.full((64,), 8.0), torch.zeros(1, 64, 4))
    with pytest.raises(ValueError, match=r"gt_classes must lie in \[0, 3\)"):
        MuSuAssigner()(
            AnchorList(points),
            scores,
            boxes,
            [torch.tensor([[1.0, 1, 30, 30]])],
            [torch.tensor([3])],
        )


def test_non_finite_box_names_the_image(model: MuSu) -> None:
    item = make_input([[8.0, 8.0, float("nan"), 40.0]], [0])
    item["file_name"] = "broken.png"
    with pytest.raises(ValueError, match=r"broken\.png.*non-finite box"), EventStorage():
        model([item])


# --------------------------------------------------------------------------------------------
# Numerics.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("magnitude", [20.0, 100.0, 1e4])
def test_extreme_logits_give_finite_losses_and_gradients(model: MuSu, magnitude: float) -> None:
    """Logits and log-distances at +-magnitude (both signs mixed) through ``MuSu.losses`` with a
    real assignment: finite losses and finite gradients w.r.t. every input."""
    points, strides = anchor_points([(8, 8), (4, 4)], [8, 16], 1, "cpu")  # R = 80
    sign = torch.where(torch.arange(80) % 2 == 0, 1.0, -1.0)
    cls_logits = (sign[None, :, None] * magnitude).repeat(2, 1, 5).requires_grad_()
    obj_logits = (-sign[None] * magnitude).repeat(2, 1).requires_grad_()
    log_distances = (sign[None, :, None] * magnitude).repeat(2, 1, 4).requires_grad_()
    pred_boxes = decode_boxes(points, strides, log_distances)
    gt_boxes = [torch.tensor([[4.0, 4.0, 40.0, 50.0], [30.0, 20.0, 64.0, 60.0]]), torch.zeros(0, 4)]
    gt_classes = [torch.tensor([0, 4]), torch.zeros(0, dtype=torch.long)]
    scores = cls_logits.detach().sigmoid() * obj_logits.detach().sigmoid()[..., None]
    assignment = MuSuAssigner()(
        AnchorList(points), scores, pred_boxes.detach(), gt_boxes, gt_classes
    )
    assert int(assignment.stats["bag_size"].sum()) > 0
    losses = model.losses(cls_logits, obj_logits, pred_boxes, gt_boxes, gt_classes, assignment)
    assert all(bool(torch.isfinite(v)) for v in losses.values()), losses
    sum(losses.values()).backward()
    for tensor in (cls_logits, obj_logits, log_distances):
        assert bool(torch.isfinite(tensor.grad).all())


def test_non_finite_loss_stops_training_naming_iteration_and_terms(
    tiny_train_dataset: str, tmp_path: Path
) -> None:
    """Weights corrupted with NaN before iteration 3 (a diverged step): Detectron2's trainer
    stops at iteration 3, before the optimizer applies anything, with an error naming the
    iteration and the loss terms."""

    class CorruptAt(HookBase):
        def before_step(self) -> None:
            if self.trainer.iter == 3:
                with torch.no_grad():
                    self.trainer.model.head.cls_score.weight.fill_(float("nan"))

    cfg = make_cfg(overrides=trainer_overrides(tiny_train_dataset, tmp_path))
    trainer = train_net.Trainer(cfg)
    trainer.register_hooks([CorruptAt()])
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    message = str(error.value)
    assert "iteration=3" in message and "loss_musu_cls" in message
    assert trainer.iter == 3
    # The bad step was never applied to the other parameters (SGD did not see NaN gradients).
    assert all(
        bool(torch.isfinite(p).all())
        for n, p in trainer.model.named_parameters()
        if n != "head.cls_score.weight"
    )


# --------------------------------------------------------------------------------------------
# Data path: COCO JSON -> DatasetCatalog -> DatasetMapper -> train loader -> model.
# --------------------------------------------------------------------------------------------


def trainer_overrides(dataset: str, output_dir: Path) -> List[Any]:
    return [
        "DATASETS.TRAIN", f"('{dataset}',)",
        "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", 2,
        "SOLVER.MAX_ITER", 6,
        "SOLVER.WARMUP_ITERS", 2,
        "SOLVER.STEPS", "(4,)",
        "SOLVER.CHECKPOINT_PERIOD", 1000,
        "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("reliability_data")
    return ensure_split("train", root, num_images=4, seed=21, image_size=64)


def _register(name: str, json_file: Path | str, image_root: str) -> str:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_dataset(name, json_file, image_root)
    return name


@pytest.fixture(scope="module")
def tiny_train_dataset(tiny_split) -> str:
    return _register("reliability_tiny_train", tiny_split.json_file, tiny_split.image_root)


def dirty_json(tiny_split, tmp_path: Path) -> tuple[Path, dict]:
    """The tiny split with: image 0 emptied; image 1 given zero-size, negative-size, partly
    outside, wholly outside and crowd boxes; image 2 given 1000 objects; image 3 unchanged."""
    content = json.loads(Path(tiny_split.json_file).read_text())
    images = sorted(content["images"], key=lambda x: x["id"])
    first, second, third = images[0]["id"], images[1]["id"], images[2]["id"]
    annotations = [a for a in content["annotations"] if a["image_id"] != first]
    next_id = max(a["id"] for a in content["annotations"]) + 1
    extra = {
        "zero_size": [10, 10, 0, 20],
        "negative_size": [40, 40, -20, 10],
        "partly_outside": [50, -10, 30, 30],
        "wholly_outside": [70, 70, 10, 10],
        "crowd": [0, 0, 64, 64],
    }
    ids = {}
    for kind, bbox in extra.items():
        ids[kind] = next_id
        annotations.append(
            {"id": next_id, "image_id": second, "category_id": 1, "bbox": bbox, "area": 1.0,
             "iscrowd": int(kind == "crowd")}
        )  # fmt: skip
        next_id += 1
    generator = torch.Generator().manual_seed(5)
    for xy, wh in zip((torch.rand(1000, 2, generator=generator) * 56).tolist(),
                      (torch.rand(1000, 2, generator=generator) * 7 + 1).tolist()):  # fmt: skip
        annotations.append(
            {"id": next_id, "image_id": third, "category_id": 1 + next_id % 5,
             "bbox": [*xy, *wh], "area": wh[0] * wh[1], "iscrowd": 0}
        )  # fmt: skip
        next_id += 1
    content["annotations"] = annotations
    path = tmp_path / "dirty.json"
    path.write_text(json.dumps(content))
    return path, {"ids": ids, "images": [first, second, third]}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_dirty_coco_dataset_trains_through_the_detectron2_loader(
    tiny_split, tmp_path: Path
) -> None:
    json_file, info = dirty_json(tiny_split, tmp_path)
    name = _register("reliability_dirty", json_file, tiny_split.image_root)
    capture = _Capture()
    logging.getLogger("musu.data.datasets").addHandler(capture)
    try:
        dicts = DatasetCatalog.get(name)
    finally:
        logging.getLogger("musu.data.datasets").removeHandler(capture)
    ids = info["ids"]
    kept = {a["id"] for d in dicts for a in d["annotations"]}
    for kind in ("zero_size", "negative_size", "wholly_outside"):
        assert ids[kind] not in kept, kind
        assert any(f"annotation id {ids[kind]} " in m for m in capture.messages), kind
    assert ids["partly_outside"] in kept and ids["crowd"] in kept  # left to the mapper
    assert "dirty.json: dropped 3 annotation(s)" in " ".join(capture.messages)

    # 40 px inputs (smaller than the coarsest stride); empty images are kept.
    cfg = make_cfg(40, ["DATALOADER.FILTER_EMPTY_ANNOTATIONS", False, "SOLVER.IMS_PER_BATCH", 4])
    cfg.DATASETS.TRAIN = (name,)
    batch = next(iter(build_detection_train_loader(cfg)))
    assert sorted(item["image_id"] for item in batch) == sorted(d["image_id"] for d in dicts)
    by_id = {item["image_id"]: item for item in batch}
    assert len(by_id[info["images"][0]]["instances"]) == 0
    second = by_id[info["images"][1]]["instances"]
    original = next(d for d in dicts if d["image_id"] == info["images"][1])
    # DatasetMapper dropped the crowd box (the whole image); the partly outside one is clipped.
    assert len(second) == len(original["annotations"]) - 1
    whole_image = torch.tensor([0.0, 0.0, 40.0, 40.0])
    assert not any(torch.equal(box, whole_image) for box in second.gt_boxes.tensor)
    for item in batch:
        boxes = item["instances"].gt_boxes.tensor
        assert bool((boxes[:, 2:] > boxes[:, :2]).all())
        assert bool((boxes >= 0).all() and (boxes <= 40).all())
    assert len(by_id[info["images"][2]]["instances"]) > 900

    torch.manual_seed(0)
    net = build_model(cfg)
    net.train()
    train_step(net, batch)
