"""``train_net.py`` in several processes and on several machines, on CPU (gloo), end to end.

* ``--num-gpus 2`` on a CPU machine: 2 processes train, evaluate (``--eval-only``) and resume
  (``--resume``). The first iteration's losses and the weights after it equal those of a
  1-process run on the same 4 images (same seed, no random flip: each rank takes 2 of them;
  GroupNorm in the backbone, as BatchNorm statistics are per process).
* ``--num-machines 2 --machine-rank 0/1 --dist-url tcp://127.0.0.1:<port>``: two
  ``train_net.py`` launchers of one process each on this host train in step (same losses and
  weights as the 1-process run) and only machine 0 writes checkpoints.

The runs use 64 px images and 1-3 iterations: their time is mostly Python start-up.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from musu.data import register_synthetic_split

import train_net  # the root script (conftest.py puts the root on sys.path)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "Synthetic" / "musu_R_18_FPN_synthetic.yaml"
TRAIN, VAL = "multiprocess_train", "multiprocess_val"
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``--register-coco`` arguments of a 8-image train and a 4-image val split (64 px)."""
    root = tmp_path_factory.mktemp("data")
    args = []
    for name, split, count, seed in [(TRAIN, "train", 8, 41), (VAL, "val", 4, 42)]:
        paths = register_synthetic_split(
            name, root, split, num_images=count, seed=seed, image_size=64
        )
        args += ["--register-coco", name, paths.json_file, paths.image_root]
    return args


def _opts(output_dir: Path, max_iter: int, test: str = "()") -> list[str]:
    return [
        "MODEL.DEVICE", "cpu",
        "OUTPUT_DIR", str(output_dir),
        "SEED", "3",
        "MODEL.RESNETS.NORM", "GN",  # BN statistics would differ between 2 and 4 images
        "DATASETS.TRAIN", f"('{TRAIN}',)",
        "DATASETS.TEST", test,
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD", "100",
        "INPUT.RANDOM_FLIP", "none",
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64",
        "MODEL.MUSU.SCORE_THRESH_TEST", "0.0",  # an untrained model still makes detections
    ]  # fmt: skip


def _popen(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen(
        [sys.executable, str(REPO / "train_net.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run(args: list[str], cwd: Path) -> str:
    process = _popen(args, cwd)
    output, _ = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, output[-4000:]
    return output


def _first_metrics(output_dir: Path) -> dict:
    lines = (output_dir / "metrics.json").read_text().splitlines()
    return next(m for m in map(json.loads, lines) if "total_loss" in m)


def _copypaste_ap(output: str) -> list[float]:
    """The AP numbers of Detectron2's ``copypaste:`` result line."""
    lines = re.findall(r"copypaste: ([-\d.nan,]+)\n", output)
    assert lines, output[-4000:]
    return [float(v) for v in lines[-1].split(",")]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(splits: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One training iteration in this process (1 process, 4 images): its output folder."""
    output_dir = tmp_path_factory.mktemp("one_process")
    argv = ["--config-file", str(CONFIG), *_opts(output_dir, max_iter=1)]
    train_net.main(train_net.build_parser().parse_args(argv))
    return output_dir


def _assert_same_first_step(run: Path, reference: Path) -> None:
    metrics, expected = _first_metrics(run), _first_metrics(reference)
    assert metrics["iteration"] == expected["iteration"] == 0
    for key in ("total_loss", "loss_musu_cls", "loss_musu_reg"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key
    weights = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)
    single = torch.load(reference / "model_final.pth", map_location="cpu", weights_only=False)
    assert weights["iteration"] == single["iteration"] == 0
    assert weights["model"].keys() == single["model"].keys()
    # One SGD step from the same initial weights with the same (averaged) gradient.
    for name, value in single["model"].items():
        torch.testing.assert_close(weights["model"][name], value, rtol=1e-5, atol=1e-7, msg=name)
    assert len(single["model"]) > 50


@pytest.mark.slow
def test_two_processes_on_cpu_train_evaluate_and_resume(
    splits: list[str], one_process: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "run"
    launch = ["--config-file", str(CONFIG), "--num-gpus", "2", "--dist-url", "auto", *splits]
    output = _run([*launch, *_opts(output_dir, max_iter=1)], tmp_path)
    assert "Rank of current process: 0. World size: 2" in output
    _assert_same_first_step(output_dir, one_process)
    assert (output_dir / "log.txt.rank1").is_file()

    # --eval-only in 2 processes: the same COCO AP as in 1 process.
    weights = ["MODEL.WEIGHTS", str(output_dir / "model_final.pth")]
    evaluated = _run(
        [*launch, "--eval-only", *_opts(tmp_path / "eval", 1, f"('{VAL}',)"), *weights], tmp_path
    )
    argv = [
        "--config-file",
        str(CONFIG),
        "--eval-only",
        *_opts(tmp_path / "eval1", 1, f"('{VAL}',)"),
    ]
    single = train_net.main(train_net.build_parser().parse_args([*argv, *weights]))["bbox"]
    ap = _copypaste_ap(evaluated)
    assert ap[0] == pytest.approx(single["AP"], abs=1e-4) and single["AP"] > 0
    assert ap[1] == pytest.approx(single["AP50"], abs=1e-4)

    # --resume in 2 processes: continues at iteration 1 and ends at the new MAX_ITER.
    output = _run([*launch, "--resume", *_opts(output_dir, max_iter=3)], tmp_path)
    assert "Starting training from iteration 1" in output
    final = torch.load(output_dir / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 2


@pytest.mark.slow
def test_two_machines_of_one_process_train_in_step(
    splits: list[str], one_process: Path, tmp_path: Path
) -> None:
    url = f"tcp://127.0.0.1:{_free_port()}"
    outputs = [tmp_path / "machine0", tmp_path / "machine1"]
    processes = [
        _popen(
            [
                "--config-file", str(CONFIG),
                "--num-gpus", "1",
                "--num-machines", "2",
                "--machine-rank", str(rank),
                "--dist-url", url,
                *splits,
                *_opts(outputs[rank], max_iter=1),
            ],
            tmp_path,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in processes]
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-4000:]
    assert "Rank of current process: 1. World size: 2" in (outputs[1] / "log.txt.rank1").read_text()

    # In step: the same first step as 1 process on the same 4 images; one set of checkpoints.
    _assert_same_first_step(outputs[0], one_process)
    assert not list(outputs[1].glob("*.pth")) and not (outputs[1] / "last_checkpoint").exists()
