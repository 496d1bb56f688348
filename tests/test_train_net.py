"""End to end through the root train_net.py: train, checkpoint, --eval-only, --resume.

Runs in-process on tiny synthetic splits (16 train / 8 val images of 128 px) registered under
test-only names, so that it takes seconds, not minutes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from detectron2.engine import default_argument_parser

from musu.data import register_synthetic_split

import train_net  # the root script (conftest.py puts the root on sys.path)

REPO_ROOT = Path(__file__).resolve().parents[1]

BASE_CONFIG = REPO_ROOT / "configs" / "Synthetic" / "musu_paper_R_18_FPN_1200it.yaml"
TRAIN_NAME, VAL_NAME = "e2e_synthetic_train", "e2e_synthetic_val"


@pytest.fixture(scope="module")
def tiny_datasets(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("synthetic")
    for name, split, count, seed in [(TRAIN_NAME, "train", 16, 11), (VAL_NAME, "val", 8, 12)]:
        register_synthetic_split(name, root, split, num_images=count, seed=seed, image_size=128)


def _run(output_dir: Path, *extra: str, max_iter: int = 20, eval_only: bool = False, resume=False):
    argv = ["--config-file", str(BASE_CONFIG)]
    argv += ["--eval-only"] if eval_only else []
    argv += ["--resume"] if resume else []
    argv += [
        "OUTPUT_DIR", str(output_dir),
        "DATASETS.TRAIN", f"('{TRAIN_NAME}',)",
        "DATASETS.TEST", f"('{VAL_NAME}',)",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.STEPS", "(15,)",
        "SOLVER.WARMUP_ITERS", "5",
        "SOLVER.CHECKPOINT_PERIOD", "10",
        "INPUT.MIN_SIZE_TRAIN", "(128,)",
        "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "128",
        "INPUT.MAX_SIZE_TEST", "128",
        *extra,
    ]  # fmt: skip
    return train_net.main(default_argument_parser().parse_args(argv))


def _iterations_logged(output_dir: Path) -> list[int]:
    lines = (output_dir / "metrics.json").read_text().splitlines()
    return [json.loads(line)["iteration"] for line in lines if '"total_loss"' in line]


@pytest.mark.slow
def test_train_checkpoint_eval_only_and_resume(tiny_datasets: None, tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    results = _run(output_dir, max_iter=20)

    # Training ends with COCO evaluation of the test set.
    bbox = results["bbox"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(bbox)
    assert 0.0 <= bbox["AP"] <= 100.0
    for name in ["model_0000009.pth", "model_0000019.pth", "model_final.pth", "last_checkpoint"]:
        assert (output_dir / name).is_file(), name
    assert (output_dir / "last_checkpoint").read_text().strip() == "model_final.pth"
    checkpoint = torch.load(output_dir / "model_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["iteration"] == 19
    logged = _iterations_logged(output_dir)
    assert logged and max(logged) == 19
    metrics = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]
    assert any("musu/bag_size" in m for m in metrics), "assignment statistics are not logged"

    # --eval-only on the written checkpoint reproduces the end-of-training evaluation.
    evaluated = _run(
        tmp_path / "eval", "MODEL.WEIGHTS", str(output_dir / "model_final.pth"), eval_only=True
    )
    for key, value in bbox.items():
        assert evaluated["bbox"][key] == pytest.approx(value, abs=1e-6, nan_ok=True), key

    # --resume continues from the last checkpoint (iteration 20), not from scratch.
    os.remove(output_dir / "model_final.pth")
    (output_dir / "last_checkpoint").write_text("model_0000019.pth")
    _run(output_dir, max_iter=26, resume=True)
    resumed = _iterations_logged(output_dir)
    after_first_run = resumed[len(logged) :]
    assert after_first_run and min(after_first_run) >= 20 and max(after_first_run) == 25
    final = torch.load(output_dir / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 25
