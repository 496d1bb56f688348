"""End to end through the root ``train_net.py``: every shipped config trains 2 iterations (BCCD
configs on the real BCCD training set, synthetic ones on a tiny generated split, 128 px, batch 2),
and the Mutual Guidance RetinaNet also evaluates (COCO AP) and reloads with ``--eval-only``.
The project is found through its ``musu.projects`` entry point, as in a real run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import List

import pytest
from detectron2.engine import default_argument_parser

from musu.data import register_synthetic_split

PROJECT = Path(__file__).resolve().parents[1]
REPO_ROOT = PROJECT.parents[1]
CONFIGS = sorted(p for p in (PROJECT / "configs").rglob("*.yaml") if not p.name.startswith("Base-"))
TRAIN_NAME, VAL_NAME = "mg_e2e_synthetic_train", "mg_e2e_synthetic_val"


def load_train_net() -> ModuleType:
    """The root script as a module (it is not part of an installed package)."""
    spec = importlib.util.spec_from_file_location("mg_root_train_net", REPO_ROOT / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_net(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    root = tmp_path_factory.mktemp("mg_synthetic")
    for name, split, count, seed in [(TRAIN_NAME, "train", 8, 21), (VAL_NAME, "val", 4, 22)]:
        register_synthetic_split(name, root, split, num_images=count, seed=seed, image_size=128)
    return load_train_net()


def run(train_net: ModuleType, config: Path, output_dir: Path, *extra: str, eval_only=False):
    argv = ["--config-file", str(config)] + (["--eval-only"] if eval_only else [])
    argv += [
        "OUTPUT_DIR", str(output_dir),
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "2",
        "SOLVER.STEPS", "(1,)",
        "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "100",
        "INPUT.MIN_SIZE_TRAIN", "(128,)",
        "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "128",
        "INPUT.MAX_SIZE_TEST", "128",
        *extra,
    ]  # fmt: skip
    return train_net.main(default_argument_parser().parse_args(argv))


def synthetic_data(test: bool) -> List[str]:
    return [
        "DATASETS.TRAIN",
        f"('{TRAIN_NAME}',)",
        "DATASETS.TEST",
        f"('{VAL_NAME}',)" if test else "()",
    ]


def logged(output_dir: Path) -> List[dict]:
    lines = (output_dir / "metrics.json").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", CONFIGS, ids=[p.relative_to(PROJECT / "configs").as_posix() for p in CONFIGS]
)
def test_config_trains_two_iterations(train_net: ModuleType, config: Path, tmp_path: Path) -> None:
    # BCCD configs read the real BCCD training set (shared/data/bccd); no evaluation here.
    extra = ["DATASETS.TEST", "()"] if "BCCD" in config.parts else synthetic_data(test=False)
    run(train_net, config, tmp_path, *extra)
    assert (tmp_path / "model_final.pth").is_file()
    metrics = [m for m in logged(tmp_path) if "total_loss" in m]
    assert metrics and metrics[-1]["iteration"] == 1
    assert all(
        v == v and abs(v) < 1e6 for m in metrics for k, v in m.items() if k.startswith("loss")
    )
    if "retinanet" in config.name:
        assert any("mg/num_static_pos" in m for m in metrics)


@pytest.mark.slow
def test_mg_retinanet_evaluates_and_reloads(train_net: ModuleType, tmp_path: Path) -> None:
    config = PROJECT / "configs" / "Synthetic" / "retinanet_mg_R_18_FPN_synthetic.yaml"
    low = ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]  # untrained: keep some detections
    results = run(train_net, config, tmp_path / "run", *synthetic_data(test=True), *low)
    bbox = results["bbox"]
    assert {"AP", "AP50", "AP75"} <= set(bbox) and 0.0 <= bbox["AP"] <= 100.0
    weights = str(tmp_path / "run" / "model_final.pth")
    again = run(train_net, config, tmp_path / "eval", *synthetic_data(test=True), *low,
                "MODEL.WEIGHTS", weights, eval_only=True)  # fmt: skip
    for key, value in bbox.items():
        assert again["bbox"][key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
