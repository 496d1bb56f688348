"""Mixed precision: under autocast the network runs in low precision, assignment and losses in
float32, and a few training iterations stay finite.

Detectron2's AMPTrainer needs CUDA; on CPU the same model code path is exercised with
``torch.autocast("cpu", dtype=torch.bfloat16)``, which is what AMPTrainer wraps around the forward.
"""

from __future__ import annotations

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import musu
from musu.modeling.assigners import MuSuAssigner


def _tiny_model(num_anchors: int):
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    cfg.merge_from_file("configs/Synthetic/musu_R_18_FPN_synthetic.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MUSU.NUM_ANCHORS = num_anchors
    torch.manual_seed(0)
    return build_model(cfg)


def _batch(size: int = 128):
    generator = torch.Generator().manual_seed(1)
    batch = []
    for num_objects in (3, 0):
        instances = Instances((size, size))
        corner = torch.rand(num_objects, 2, generator=generator) * size * 0.6
        extent = torch.rand(num_objects, 2, generator=generator) * size * 0.3 + 10
        instances.gt_boxes = Boxes(torch.cat([corner, corner + extent], dim=1))
        instances.gt_classes = torch.randint(0, 5, (num_objects,), generator=generator)
        image = torch.randint(0, 256, (3, size, size), generator=generator).float()
        batch.append({"image": image, "instances": instances})
    return batch


@pytest.mark.parametrize("num_anchors", [1, 3])
def test_autocast_training_is_finite_with_float32_assignment(num_anchors, monkeypatch) -> None:
    model = _tiny_model(num_anchors)
    model.train()
    seen_dtypes = []
    original_call = MuSuAssigner.__call__

    def spy(self, points, scores, pred_boxes, *args, **kwargs):
        seen_dtypes.append((scores.dtype, pred_boxes.dtype, torch.is_autocast_enabled("cpu")))
        return original_call(self, points, scores, pred_boxes, *args, **kwargs)

    monkeypatch.setattr(MuSuAssigner, "__call__", spy)
    head_dtypes = []
    model.head.cls_score.register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = _batch()
    with EventStorage():
        for _ in range(3):
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                losses = model(batch)
            for name, value in losses.items():
                assert value.dtype == torch.float32, name
                assert torch.isfinite(value), name
            optimizer.zero_grad()
            sum(losses.values()).backward()
            for name, parameter in model.named_parameters():
                if parameter.grad is not None:
                    assert torch.isfinite(parameter.grad).all(), name
            optimizer.step()
    assert head_dtypes and all(dtype == torch.bfloat16 for dtype in head_dtypes)  # autocast on
    assert seen_dtypes and all(
        s == torch.float32 and b == torch.float32 and not on for s, b, on in seen_dtypes
    )
