"""tools/compare.py: metrics parsing, table, and one tiny train (subprocess) + evaluate run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

import musu
from musu.data import register_coco_dataset
from musu.data.synthetic import ensure_split

import compare  # tools/compare.py (conftest.py puts tools/ on sys.path)
from signalled_run import group_killed_on_exit, wait_for_checkpoint, wait_for_group_exit

REPO_ROOT = Path(__file__).resolve().parents[1]

MUSU_CFG = REPO_ROOT / "configs" / "Synthetic" / "musu_R_18_FPN_synthetic.yaml"
FCOS_CFG = REPO_ROOT / "configs" / "Synthetic" / "fcos_R_18_FPN_synthetic.yaml"
TINY = [
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.STEPS", "(1,)",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "100",
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "128",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory: pytest.TempPathFactory) -> list:
    """A 4-image synthetic split registered as train and test: [[name, json, images]]."""
    paths = ensure_split(
        "val", tmp_path_factory.mktemp("cmp"), num_images=4, seed=5, image_size=128
    )
    name = "compare_tiny"
    if name not in DatasetCatalog.list():
        register_coco_dataset(name, paths.json_file, paths.image_root)
    return [[name, str(paths.json_file), str(paths.image_root)]]


def test_train_seconds_per_iter_is_median_after_skip(tmp_path: Path) -> None:
    lines = [
        {"iteration": 0, "time": 9.0},
        {"iteration": 19, "time": 0.5, "total_loss": 1.0},
        {"iteration": 39, "time": 0.7},
        {"iteration": 59, "time": 0.6},
        {"iteration": 59, "bbox/AP": 3.0},  # an evaluation entry has no time
    ]
    path = tmp_path / "metrics.json"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert compare.train_seconds_per_iter(path, skip_iters=10) == pytest.approx(0.6)
    assert math.isnan(compare.train_seconds_per_iter(tmp_path / "absent.json"))


def test_dataset_names_and_markdown_table() -> None:
    assert compare.dataset_names("bccd") == ("bccd_train", "bccd_val")
    assert compare.dataset_names("a, b") == ("a", "b")
    assert compare.dataset_names(None) is None
    with pytest.raises(ValueError):
        compare.dataset_names("only_one")
    table = compare.markdown_table(
        {"m": {"AP": 12.345, "spearman": 0.5, "top1_iou": 0.7, "best_iou": 0.8,
               "num_evaluated": 3.0}}  # fmt: skip
    )
    header, rule, row = table.strip().splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == len(compare.COLUMNS) + 2
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "m" and cells[1] == "12.3" and cells[2] == "n/a"
    assert "0.500" in cells and "0.700 / 0.800" in cells and cells[-1] == "3"


def test_train_fcos_via_train_net_then_evaluate(tiny_split: list, tmp_path: Path) -> None:
    name = tiny_split[0][0]
    argv = ["--config-file", str(FCOS_CFG), "--dataset", f"{name},{name}",
            "--output", str(tmp_path),
            "--max-iter", "3", "--warmup", "1", "--skip-iters", "0",
            "--max-eval-images", "2"]  # fmt: skip
    for entry in tiny_split:
        argv += ["--register-coco", *entry]
    rows = compare.main(argv + ["--opts", *TINY])
    row = rows["fcos_R_18_FPN_synthetic"]
    run_dir = tmp_path / "fcos_R_18_FPN_synthetic"
    # Trained by train_net.py in a subprocess: its config says D2FCOS, its log says FCOS.
    assert (run_dir / "model_final.pth").is_file()
    assert "D2FCOS" in (run_dir / "config.yaml").read_text()
    assert "FCOS(" in (run_dir / "log.txt").read_text()
    assert row["train_s_per_iter"] > 0
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(row)
    assert row["infer_s_per_image"] > 0
    assert row["num_objects"] == row["post_nms_num_objects"] > 0  # both passes saw every object
    # Disabling NMS can only add candidates around each object.
    assert row["mean_overlap"] >= row["post_nms_mean_overlap"]
    assert (tmp_path / "compare.md").read_text().startswith("| method |")
    assert "fcos_R_18_FPN_synthetic" in json.loads((tmp_path / "compare.json").read_text())


def test_eval_only_on_a_musu_checkpoint(tiny_split: list, tmp_path: Path) -> None:
    name = tiny_split[0][0]
    opts = compare.dataset_opts(f"{name},{name}") + TINY
    cfg = musu.build_config(str(MUSU_CFG), opts)
    model = build_model(cfg)
    torch.save({"model": model.state_dict()}, tmp_path / "musu.pth")
    argv = ["--config-file", str(MUSU_CFG), "--dataset", f"{name},{name}",
            "--output", str(tmp_path),
            "--eval-only", "--checkpoints", str(tmp_path / "musu.pth"), "--warmup", "1",
            "--max-eval-images", "2"]  # fmt: skip
    rows = compare.main(argv + ["--opts", *TINY])
    row = rows["musu_R_18_FPN_synthetic"]
    assert math.isnan(row["train_s_per_iter"])  # no metrics.json beside this checkpoint
    assert row["num_objects"] > 0 and row["infer_s_per_image"] > 0
    assert (tmp_path / "compare.md").is_file()


def test_seed_summary_mean_and_spread() -> None:
    rows = {
        "musu_seed0": {"AP": 40.0, "AP75": 38.0, "top1": 0.1},
        "musu_seed1": {"AP": 44.0, "AP75": 42.0, "top1": 0.3},
        "fcos_seed0": {"AP": 50.0},
        "fcos_seed1": {"diverged": True},
    }
    summary = compare.seed_summary(rows)
    assert summary["musu"]["runs"] == 2 and summary["musu"]["diverged"] == 0
    ap = summary["musu"]["AP"]
    # mean 42, sample std sqrt(((40-42)^2 + (44-42)^2) / 1) = sqrt(8)
    assert ap["mean"] == 42.0 and ap["std"] == pytest.approx(math.sqrt(8))
    assert (ap["min"], ap["max"], ap["n"]) == (40.0, 44.0, 2)
    assert summary["fcos"]["diverged"] == 1 and summary["fcos"]["AP"]["n"] == 1
    assert summary["fcos"]["AP"]["std"] == 0.0 and "AP75" not in summary["fcos"]
    table = compare.summary_table(summary)
    assert "| musu | 2 (0) | 42.0 ± 2.8 (40.0-44.0) |" in table
    assert "| fcos | 2 (1) | 50.0 ± 0.0 (50.0-50.0) | n/a |" in table


def test_seeds_and_a_diverged_run(tiny_split: list, tmp_path: Path) -> None:
    """--seeds: run dirs <config>_seed<s> trained with SEED s; a learning rate that makes the
    loss non-finite is recorded as diverged (not evaluated) instead of stopping the script."""
    name = tiny_split[0][0]
    argv = ["--config-file", str(FCOS_CFG), "--dataset", f"{name},{name}",
            "--output", str(tmp_path),
            "--max-iter", "2", "--warmup", "1", "--skip-iters", "0", "--max-eval-images", "1",
            "--seeds", "3"]  # fmt: skip
    for entry in tiny_split:
        argv += ["--register-coco", *entry]
    rows = compare.main(argv + ["--opts", *TINY, "SOLVER.BASE_LR", "1e30"])
    assert rows == {"fcos_R_18_FPN_synthetic_seed3": {
        "diverged": True, "error": rows["fcos_R_18_FPN_synthetic_seed3"]["error"],
        "config": str(FCOS_CFG)}}  # fmt: skip
    run_dir = tmp_path / "fcos_R_18_FPN_synthetic_seed3"
    assert "SEED: 3" in (run_dir / "config.yaml").read_text()
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["summary"]["fcos_R_18_FPN_synthetic"]["diverged"] == 1
    assert "(diverged)" in (tmp_path / "compare.md").read_text()


@pytest.mark.slow
def test_sigterm_reaches_the_training_and_leaves_no_orphan(
    tiny_split: list, tmp_path: Path
) -> None:
    """SIGTERM to compare.py alone is passed on to its train_net.py: the training saves a
    checkpoint and exits, compare.py exits with 128 + SIGTERM, and no process is left behind."""
    name = tiny_split[0][0]
    argv = [
        sys.executable,
        str(REPO_ROOT / "tools" / "compare.py"),
        "--config-file",
        str(FCOS_CFG),
        "--dataset",
        f"{name},{name}",
        "--output",
        str(tmp_path),
        "--max-iter",
        "10000",
    ]
    for entry in tiny_split:
        argv += ["--register-coco", *entry]
    argv += ["--opts", *TINY, "SOLVER.CHECKPOINT_PERIOD", "4"]  # fmt: skip
    run_dir = tmp_path / FCOS_CFG.stem
    process = subprocess.Popen(
        argv,
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, to find its children afterwards
    )
    with group_killed_on_exit(process):
        wait_for_checkpoint(run_dir, process)
        process.send_signal(signal.SIGTERM)  # to compare.py only, not to its group
        output, _ = process.communicate(timeout=300)
        wait_for_group_exit(process)  # the training it started has exited too
    assert process.returncode == 128 + signal.SIGTERM, output[-4000:]
    assert "Stopped by SIGTERM" in output
    train_log = (run_dir / "train_stdout.log").read_text()
    assert "Training stopped by SIGTERM after iteration" in train_log
    checkpoint = run_dir / (run_dir / "last_checkpoint").read_text().strip()
    assert checkpoint.name.startswith("model_") and checkpoint.name != "model_final.pth"
    assert "model" in torch.load(checkpoint, map_location="cpu", weights_only=False)
