"""The COCO configs declare their reference world size, so Detectron2's DefaultTrainer rescales
the paper's 8-GPU recipe to the GPUs at hand (``--num-gpus 1``: 2 images, lr / 8, 8x longer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from detectron2.engine import DefaultTrainer

import musu

COCO_CONFIGS = sorted(
    (Path(__file__).resolve().parents[1] / "configs/COCO-Detection").rglob("*.yaml")
)


@pytest.mark.parametrize("path", COCO_CONFIGS, ids=lambda p: p.name)
def test_coco_configs_scale_to_one_gpu(path: Path) -> None:
    cfg = musu.build_config(str(path), [])
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 8 and cfg.SOLVER.IMS_PER_BATCH == 16
    one = DefaultTrainer.auto_scale_workers(cfg, 1)
    assert one.SOLVER.IMS_PER_BATCH == 2
    assert one.SOLVER.BASE_LR == pytest.approx(cfg.SOLVER.BASE_LR / 8)
    assert one.SOLVER.MAX_ITER == 8 * cfg.SOLVER.MAX_ITER
    assert one.SOLVER.STEPS == tuple(8 * s for s in cfg.SOLVER.STEPS)
    assert one.SOLVER.WARMUP_ITERS == 8 * cfg.SOLVER.WARMUP_ITERS
    assert DefaultTrainer.auto_scale_workers(cfg, 8) is cfg  # the paper's setting is unchanged


def test_small_data_configs_do_not_rescale() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in [*root.glob("Synthetic/*.yaml"), *root.glob("BCCD/*.yaml")]:
        assert musu.build_config(str(path), []).SOLVER.REFERENCE_WORLD_SIZE == 0, path
