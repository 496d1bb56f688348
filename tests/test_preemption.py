"""SIGTERM / SIGINT stop training after the current iteration with a loadable checkpoint.

In-process (the real ``train_net.Trainer``, the signal sent by the process to itself at exact
points): during a forward pass, in the middle of a periodic checkpoint write, during the first and
the last iteration. Every run stops after the iteration in progress (no finished iteration is
lost), leaves only loadable checkpoints, and ``--resume`` continues with the next iteration, the
same weights, optimizer state and learning rate. As subprocesses: ``train_net.py`` in 1 and in 2
processes (``--num-gpus 2``, the signal sent to the launcher), killed by SIGTERM from outside at a
random moment, exits with status 143 and prints the command that resumes it.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer

from musu.data import register_coco_dataset
from musu.data.synthetic import ensure_split
from musu.engine import Preempted
from musu.engine import checkpoint as checkpoint_module

import train_net  # the root script (conftest.py puts the root on sys.path)
from signalled_run import group_killed_on_exit, wait_for_checkpoint, wait_for_group_exit

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "Synthetic" / "musu_R_18_FPN_synthetic.yaml"
DATASET = "preemption_train"
MAX_ITER, PERIOD = 8, 3  # periodic checkpoints after iterations 2 and 5


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``--register-coco`` arguments of a 6-image 64 px training split (registered here too)."""
    paths = ensure_split(
        "train", tmp_path_factory.mktemp("data"), num_images=6, seed=51, image_size=64
    )
    if DATASET not in DatasetCatalog.list():
        register_coco_dataset(DATASET, paths.json_file, paths.image_root)
    return ["--register-coco", DATASET, paths.json_file, paths.image_root]


def _argv(output_dir: Path, max_iter: int = MAX_ITER, period: int = PERIOD) -> list[str]:
    return [
        "--config-file", str(CONFIG),
        "MODEL.DEVICE", "cpu",
        "OUTPUT_DIR", str(output_dir),
        "DATASETS.TRAIN", f"('{DATASET}',)",
        "DATASETS.TEST", "()",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.WARMUP_ITERS", "4",
        "SOLVER.STEPS", "(5,)",
        "SOLVER.CHECKPOINT_PERIOD", str(period),
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64",
    ]  # fmt: skip


def _trainer(output_dir: Path, resume: bool = False) -> train_net.Trainer:
    argv = (["--resume"] if resume else []) + _argv(output_dir)
    cfg = train_net.setup(train_net.build_parser().parse_args(argv))
    trainer = train_net.Trainer(cfg, resume_hint="python train_net.py --resume ...")
    trainer.resume_or_load(resume=resume)
    return trainer


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_checkpoints_loadable(output_dir: Path) -> Path:
    """Every ``*.pth`` loads, no temporary file is left, and the tag names a file: returns it."""
    for path in output_dir.glob("*.pth"):
        _load(path)
    assert not [p for p in output_dir.iterdir() if p.name.endswith(checkpoint_module.TMP_SUFFIX)]
    return output_dir / (output_dir / "last_checkpoint").read_text().strip()


def _signal_in_forward(trainer: train_net.Trainer, iteration: int, signum: int) -> None:
    """Send ``signum`` to this process during the forward pass of ``iteration``."""

    def pre_hook(module: torch.nn.Module, inputs: Any) -> None:
        if trainer.iter == iteration:
            os.kill(os.getpid(), signum)

    trainer.model.register_forward_pre_hook(pre_hook)


def _assert_resumes_from(output_dir: Path, checkpoint: dict) -> None:
    """``--resume`` continues after ``checkpoint``: iteration, weights, momentum, LR; then it
    trains to the end."""
    trainer = _trainer(output_dir, resume=True)
    iteration = checkpoint["iteration"]
    assert trainer.start_iter == iteration + 1
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, checkpoint["model"][name]), name
    saved = checkpoint["trainer"]["_trainer"]["optimizer"]["state"]
    state = trainer.optimizer.state_dict()["state"]
    assert len(state) == len(saved) > 0
    assert all(torch.equal(state[k]["momentum_buffer"], saved[k]["momentum_buffer"]) for k in saved)
    reference = build_optimizer(trainer.cfg, build_model(trainer.cfg))
    scheduler = build_lr_scheduler(trainer.cfg, reference)
    for _ in range(iteration + 1):
        reference.step()
        scheduler.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        reference.param_groups[0]["lr"], rel=1e-12
    )
    trainer.train()
    assert _load(output_dir / "model_final.pth")["iteration"] == MAX_ITER - 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_an_iteration_stops_after_it_with_a_checkpoint(
    split: list[str], tmp_path: Path, signum: int
) -> None:
    handler_before = signal.getsignal(signum)
    trainer = _trainer(tmp_path)
    _signal_in_forward(trainer, iteration=3, signum=signum)
    with pytest.raises(Preempted) as stopped:
        trainer.train()
    assert stopped.value.iteration == 3 and stopped.value.exit_code == 128 + signum
    assert "Continue from iteration 4 with --resume" in stopped.value.message
    assert signal.getsignal(signum) is handler_before  # the handlers are restored
    tagged = _assert_checkpoints_loadable(tmp_path)
    assert tagged.name == "model_0000003.pth" == Path(stopped.value.checkpoint).name
    checkpoint = _load(tagged)
    assert checkpoint["iteration"] == 3  # the iteration in progress is finished, not lost
    if signum == signal.SIGTERM:
        _assert_resumes_from(tmp_path, checkpoint)


def test_signal_in_the_middle_of_a_periodic_checkpoint_write(
    split: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save: Callable = torch.save
    writes: list[str] = []

    def save_with_signal(data: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        """Write half the bytes, receive SIGTERM, write the rest."""
        writes.append(getattr(f, "name", "?"))
        if data.get("iteration") != 5:
            return real_save(data, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(data, buffer, *args, **kwargs)
        payload = buffer.getvalue()
        f.write(payload[: len(payload) // 2])
        os.kill(os.getpid(), signal.SIGTERM)
        f.write(payload[len(payload) // 2 :])

    monkeypatch.setattr(torch, "save", save_with_signal)
    trainer = _trainer(tmp_path)
    with pytest.raises(Preempted) as stopped:
        trainer.train()
    assert stopped.value.iteration == 5
    assert len(writes) == 2  # periodic writes after iterations 2 and 5; none repeated
    tagged = _assert_checkpoints_loadable(tmp_path)
    assert tagged.name == "model_0000005.pth"
    monkeypatch.undo()
    _assert_resumes_from(tmp_path, _load(tagged))


def test_signal_during_the_first_and_the_last_iteration(split: list[str], tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "first")
    _signal_in_forward(trainer, iteration=0, signum=signal.SIGTERM)
    with pytest.raises(Preempted) as stopped:
        trainer.train()
    assert stopped.value.iteration == 0
    assert _load(_assert_checkpoints_loadable(tmp_path / "first"))["iteration"] == 0

    # During the last iteration: the final checkpoint is written anyway, the run just finishes.
    trainer = _trainer(tmp_path / "last")
    _signal_in_forward(trainer, iteration=MAX_ITER - 1, signum=signal.SIGTERM)
    trainer.train()
    tagged = _assert_checkpoints_loadable(tmp_path / "last")
    assert tagged.name == "model_final.pth" and _load(tagged)["iteration"] == MAX_ITER - 1


@pytest.mark.slow
@pytest.mark.parametrize("processes, to_group", [(1, False), (2, True)])
def test_sigterm_to_train_net_exits_143_with_a_checkpoint_and_the_resume_command(
    split: list[str], tmp_path: Path, processes: int, to_group: bool
) -> None:
    """SIGTERM to the launcher only (1 process), or to the whole process group as a cluster does
    (2 processes, each with a data loader worker): all stop, and no process is left behind."""
    output_dir = tmp_path / "run"
    launch = ["--num-gpus", str(processes), "--dist-url", "auto"]
    argv = [*launch, *split, *_argv(output_dir, max_iter=10_000, period=4)]
    argv += ["DATALOADER.NUM_WORKERS", "1"]
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train_net.py"), *argv],
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group
    )
    with group_killed_on_exit(process):
        wait_for_checkpoint(output_dir, process)  # iteration 3 finished
        time.sleep(random.uniform(0.0, 0.5))
        if to_group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=300)
        wait_for_group_exit(process)  # the workers of the workers exit too
    assert process.returncode == 128 + signal.SIGTERM, output[-4000:]
    tagged = _assert_checkpoints_loadable(output_dir)
    iteration = _load(tagged)["iteration"]
    assert iteration >= 3 and tagged.name == f"model_{iteration:07d}.pth"
    assert f"Training stopped by SIGTERM after iteration {iteration}" in output
    assert f"python {REPO / 'train_net.py'} --resume --num-gpus {processes}" in output
    logs = [output_dir / "log.txt", *([output_dir / "log.txt.rank1"] if processes == 2 else [])]
    for log in logs:  # every process stopped after the same iteration
        assert f"Training stopped by SIGTERM after iteration {iteration}" in log.read_text(), log
