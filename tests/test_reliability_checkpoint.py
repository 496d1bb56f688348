"""Crashes, restarts, configs and weights: nothing is lost, and every failure explains itself.

* Atomic checkpoints: a write that fails half-way leaves the previous files intact.
* SIGKILL of a ``train_net.py`` subprocess mid-training, then ``--resume``: training continues
  from the last complete checkpoint with the right iteration, weights, optimizer state and LR.
  The subprocess gets its tiny synthetic split through ``--register-coco NAME JSON IMAGE_ROOT``.
* Bad configs, weights and data files: rows of tests/test_bad_inputs.py.
* Weights of a model with another number of classes or anchors load with the mismatching layers
  reported in the log and the matching layers loaded.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List, Sequence

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import hooks
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

import musu
from musu.cli import parse_tool_args
from musu.data import register_coco_datasets
from musu.data.synthetic import ensure_split
from musu.engine import AtomicCheckpointer
from musu.engine import checkpoint as checkpoint_module
from musu.engine import create_ddp_model

import train_net  # the root script (conftest.py puts the root on sys.path)

REPO = Path(__file__).resolve().parents[1]

SYNTHETIC_CONFIG = REPO / "configs" / "Synthetic" / "musu_R_18_FPN_synthetic.yaml"


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# --------------------------------------------------------------------------------------------
# Atomic checkpoint writes.
# --------------------------------------------------------------------------------------------


_TORCH_SAVE = torch.save


def _half_write_then_fail(data: Any, f: io.IOBase) -> None:
    """Stand-in for torch.save killed mid-write: half the bytes reach the file, then an error."""
    buffer = io.BytesIO()
    _TORCH_SAVE(data, buffer)
    payload = buffer.getvalue()
    f.write(payload[: len(payload) // 2])
    f.flush()
    raise OSError("injected failure in the middle of a checkpoint write")


def _loads(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_interrupted_save_leaves_previous_checkpoint_valid(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000009", iteration=9)
    good_bytes = (tmp_path / "model_0000009.pth").read_bytes()

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(checkpoint_module.torch, "save", _half_write_then_fail)
    with pytest.raises(OSError, match="injected failure"):
        checkpointer.save("model_0000019", iteration=19)  # a new file
    with pytest.raises(OSError, match="injected failure"):
        checkpointer.save("model_0000009", iteration=9)  # overwriting an existing file
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000009.pth"]
    assert (tmp_path / "model_0000009.pth").read_bytes() == good_bytes
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000009.pth")
    assert _loads(tmp_path / "model_0000009.pth")["iteration"] == 9

    # Detectron2's own checkpointer, under the same failure, leaves a truncated file behind.
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.setattr(torch, "save", _half_write_then_fail)
    with pytest.raises(OSError):
        DetectionCheckpointer(model, str(plain)).save("model_0000019", iteration=19)
    monkeypatch.undo()
    assert (plain / "model_0000019.pth").is_file()
    with pytest.raises(Exception):
        _loads(plain / "model_0000019.pth")


def test_interrupted_tag_keeps_last_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A failure while re-tagging leaves ``last_checkpoint`` naming the previous complete file."""
    checkpointer = AtomicCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))
    checkpointer.save("model_0000004", iteration=4)
    real_replace = os.replace

    def fail_on_tag(src: str, dst: str) -> None:
        if os.path.basename(dst) == "last_checkpoint":
            raise OSError("injected failure while tagging")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", fail_on_tag)
    with pytest.raises(OSError, match="tagging"):
        checkpointer.save("model_0000009", iteration=9)
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert _loads(tmp_path / "model_0000009.pth")["iteration"] == 9  # complete, just not tagged
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stale_partial_files_are_removed_at_start(tmp_path: Path) -> None:
    stale = tmp_path / f".model_0000019.pth.abc123{checkpoint_module.TMP_SUFFIX}"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / "notes.txt"
    other.write_text("kept")
    AtomicCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))
    assert not stale.exists() and other.exists()


# --------------------------------------------------------------------------------------------
# SIGKILL mid-training, then --resume.
# --------------------------------------------------------------------------------------------

MAX_ITER, PERIOD, WARMUP, STEP = 16, 3, 4, 6  # killed at >= 5: resumes past the LR step


def _opts(dataset: str, output_dir: Path) -> List[str]:
    return [
        "MODEL.DEVICE", "cpu",
        "OUTPUT_DIR", str(output_dir),
        "DATASETS.TRAIN", f"('{dataset}',)",
        "DATASETS.TEST", "()",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(MAX_ITER),
        "SOLVER.STEPS", f"({STEP},)",
        "SOLVER.WARMUP_ITERS", str(WARMUP),
        "SOLVER.CHECKPOINT_PERIOD", str(PERIOD),
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64",
    ]  # fmt: skip


def _wait_for_checkpoint(output_dir: Path, process: subprocess.Popen, min_iter: int) -> None:
    deadline = time.monotonic() + 240
    tag = output_dir / "last_checkpoint"
    while time.monotonic() < deadline:
        assert process.poll() is None, "training ended before it could be killed"
        if tag.is_file():
            name = tag.read_text().strip()
            if name.startswith("model_") and name[6:13].isdigit() and int(name[6:13]) >= min_iter:
                return
        time.sleep(0.02)
    raise AssertionError("no checkpoint written in time")


def test_sigkill_then_resume_continues_from_last_complete_checkpoint(tmp_path: Path) -> None:
    split = ensure_split("train", tmp_path / "data", num_images=6, seed=31, image_size=64)
    dataset, output_dir = "reliability_kill_train", tmp_path / "run"
    register = ["--register-coco", dataset, split.json_file, split.image_root]
    argv = ["--config-file", str(SYNTHETIC_CONFIG), *register]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train_net.py"), *argv, *_opts(dataset, output_dir)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_checkpoint(output_dir, process, min_iter=2 * PERIOD - 1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    # Every file a loader could pick up is complete; the tag names one of them.
    tagged = output_dir / (output_dir / "last_checkpoint").read_text().strip()
    for path in output_dir.glob("*.pth"):
        _loads(path)
    checkpoint = _loads(tagged)
    last_iter = checkpoint["iteration"]
    assert last_iter >= 2 * PERIOD - 1 and (last_iter + 1) % PERIOD == 0
    assert last_iter < MAX_ITER - 1, "the run finished before the kill"

    # Resume in-process exactly as `train_net.py --resume` does.
    args = train_net.build_parser().parse_args([*argv, "--resume", *_opts(dataset, output_dir)])
    register_coco_datasets(args.register_coco)
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    periodic = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert isinstance(trainer.checkpointer, AtomicCheckpointer)
    assert len(periodic) == 1 and periodic[0].checkpointer is trainer.checkpointer
    trainer.resume_or_load(resume=args.resume)
    assert trainer.start_iter == last_iter + 1
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, checkpoint["model"][name]), name
    momentum = [s["momentum_buffer"] for s in trainer.optimizer.state_dict()["state"].values()]
    saved = checkpoint["trainer"]["_trainer"]["optimizer"]["state"].values()
    saved = [s["momentum_buffer"] for s in saved]
    assert len(momentum) == len(saved) > 0
    assert all(torch.equal(a, b) for a, b in zip(momentum, saved))

    # The learning rate is the schedule's value at the first resumed iteration.
    reference = build_optimizer(cfg, build_model(cfg))
    scheduler = build_lr_scheduler(cfg, reference)
    for _ in range(last_iter + 1):
        reference.step()
        scheduler.step()
    expected_lr = reference.param_groups[0]["lr"]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr, rel=1e-12)
    assert expected_lr != pytest.approx(cfg.SOLVER.BASE_LR)  # warmup/step make the check bite

    trainer.train()
    final = _loads(output_dir / "model_final.pth")
    assert final["iteration"] == MAX_ITER - 1
    assert (output_dir / "last_checkpoint").read_text() == "model_final.pth"
    assert not [p for p in output_dir.iterdir() if p.name.endswith(checkpoint_module.TMP_SUFFIX)]


# --------------------------------------------------------------------------------------------
# Several processes on CPU.
# --------------------------------------------------------------------------------------------


def test_cpu_model_is_wrapped_in_ddp_without_device_ids(tmp_path: Path, monkeypatch) -> None:
    """What lets ``train_net.py --num-gpus N`` train on CPU: DDP without ``device_ids`` (a
    1-process gloo group stands in for N processes here; the N-process run is in
    tests/test_multiprocess.py)."""
    model = torch.nn.Linear(3, 2)
    assert create_ddp_model(model) is model  # 1 process: no wrapper
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1
    )
    try:
        monkeypatch.setattr(comm, "get_world_size", lambda: 2)
        wrapped = create_ddp_model(model, broadcast_buffers=False)
        assert isinstance(wrapped, DistributedDataParallel) and wrapped.device_ids is None
        wrapped(torch.ones(4, 3)).sum().backward()
        assert model.weight.grad is not None
    finally:
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Weights trained with another number of classes or anchors.
# --------------------------------------------------------------------------------------------


def _model(overrides: Sequence[Any], seed: int) -> torch.nn.Module:
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    cfg.merge_from_file(str(SYNTHETIC_CONFIG))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *overrides])
    torch.manual_seed(seed)
    return build_model(cfg)


@pytest.mark.parametrize(
    "overrides, mismatched",
    [
        (["MODEL.MUSU.NUM_CLASSES", 3], {"head.cls_score.weight", "head.cls_score.bias"}),
        (
            ["MODEL.MUSU.NUM_ANCHORS", 3],
            {
                f"head.{layer}.{kind}"
                for layer in ("cls_score", "bbox_pred", "objectness")
                for kind in ("weight", "bias")
            },
        ),
    ],
)
def test_mismatching_weights_are_reported_and_matching_loaded(
    tmp_path: Path, overrides: List[Any], mismatched: set
) -> None:
    source = _model([], seed=1)  # 5 classes, 1 anchor
    AtomicCheckpointer(source, str(tmp_path)).save("source")
    target = _model(overrides, seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    capture = _Capture()
    fvcore_logger = logging.getLogger("fvcore.common.checkpoint")
    fvcore_logger.addHandler(capture)
    try:
        # What Trainer.resume_or_load(resume=False) does with MODEL.WEIGHTS.
        AtomicCheckpointer(target, str(tmp_path / "new")).resume_or_load(
            str(tmp_path / "source.pth"), resume=False
        )
    finally:
        fvcore_logger.removeHandler(capture)

    log = "\n".join(capture.messages)
    for name in mismatched:
        assert f"Skip loading parameter '{name}'" in log, name
    assert log.count("Skip loading parameter") == len(mismatched)
    assert "shapes" in log and "not found in the checkpoint" in log

    source_state = source.state_dict()
    for name, value in target.state_dict().items():
        if name in mismatched:
            assert torch.equal(value, before[name]), name  # left as initialized
        elif name in source_state and source_state[name].shape == value.shape:
            assert torch.equal(value, source_state[name]), name  # loaded
    assert not torch.equal(
        before["head.cls_subnet.0.weight"], source_state["head.cls_subnet.0.weight"]
    )


# --------------------------------------------------------------------------------------------
# --resume with a broken last_checkpoint: continue from the newest checkpoint that loads.
# --------------------------------------------------------------------------------------------


def _two_checkpoints(folder: Path) -> dict[int, dict[str, torch.Tensor]]:
    """``model_0000001.pth`` and ``model_0000003.pth`` (tagged) of a Linear layer whose weights
    are the iteration number; returns the state saved at each iteration."""
    layer = torch.nn.Linear(2, 2)
    checkpointer = AtomicCheckpointer(layer, str(folder))
    states = {}
    for iteration in (1, 3):
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.fill_(float(iteration))
        checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
        states[iteration] = {k: v.clone() for k, v in layer.state_dict().items()}
    return states


def _resume(folder: Path) -> tuple[dict, torch.nn.Module, List[str]]:
    layer = torch.nn.Linear(2, 2)
    capture = _Capture()
    logging.getLogger("musu.engine.checkpoint").addHandler(capture)
    try:
        extra = AtomicCheckpointer(layer, str(folder)).resume_or_load("", resume=True)
    finally:
        logging.getLogger("musu.engine.checkpoint").removeHandler(capture)
    return extra, layer, capture.messages


def _break_tag(folder: Path) -> str:
    (folder / "last_checkpoint").write_text("model_0000005.pth")  # a file that never existed
    return "model_0000005.pth: named by"


def _delete_newest(folder: Path) -> str:
    (folder / "model_0000003.pth").unlink()
    return "model_0000003.pth: named by"


def _truncate_newest(folder: Path) -> str:
    path = folder / "model_0000003.pth"
    path.write_bytes(path.read_bytes()[:200])
    return "model_0000003.pth: Weights file"


def _remove_tag(folder: Path) -> str:
    (folder / "last_checkpoint").unlink()
    return "last_checkpoint does not exist"


@pytest.mark.parametrize(
    "damage, resumed, renamed",
    [
        (_break_tag, 3, []),
        (_delete_newest, 1, []),
        (_truncate_newest, 1, ["model_0000003.pth"]),
        (_remove_tag, 3, []),
    ],
    ids=["tag_names_missing_file", "newest_deleted", "newest_truncated", "no_tag"],
)
def test_resume_continues_from_newest_checkpoint_that_loads(
    tmp_path: Path, damage, resumed: int, renamed: List[str]
) -> None:
    states = _two_checkpoints(tmp_path)
    skipped = damage(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("model_*.pth")}
    extra, layer, messages = _resume(tmp_path)

    assert extra["iteration"] == resumed
    for name, value in layer.state_dict().items():
        assert torch.equal(value, states[resumed][name]), name
    warning = "\n".join(messages)
    assert f"continuing from {tmp_path / f'model_{resumed:07d}.pth'}" in warning
    assert skipped in warning
    # Nothing lost: each skipped file that exists is kept under a new name, the others as they
    # were; the tag names the file resumed from, so the next save continues the chain.
    for name in renamed:
        assert not (tmp_path / name).exists()
        assert (tmp_path / f"{name}.unreadable").read_bytes() == before[name]
        assert f"{name} -> {name}.unreadable" in warning
    for name, content in before.items():
        if name not in renamed:
            assert (tmp_path / name).read_bytes() == content
    assert (tmp_path / "last_checkpoint").read_text() == f"model_{resumed:07d}.pth"


def test_resume_stops_naming_last_checkpoint_when_nothing_loads(tmp_path: Path) -> None:
    _two_checkpoints(tmp_path)
    for name in ("model_0000001.pth", "model_0000003.pth"):
        (tmp_path / name).write_bytes(b"\0" * 64)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(checkpoint_module.NoResumableCheckpointError) as raised:
        _resume(tmp_path)
    message = str(raised.value)
    assert str(tmp_path / "last_checkpoint") in message and "names model_0000003.pth" in message
    assert "model_0000001.pth (64 bytes)" in message and "model_0000003.pth (64 bytes)" in message
    assert "binary data of 64 bytes" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing renamed


def test_resume_without_any_checkpoint_starts_from_model_weights(tmp_path: Path) -> None:
    extra, _, messages = _resume(tmp_path / "new_run")
    assert extra == {} and messages == []


def test_train_net_resume_skips_truncated_final_and_keeps_it(tmp_path: Path) -> None:
    """Through the Trainer: a run of 3 iterations (checkpoint every iteration) whose
    model_final.pth is truncated and model_0000002.pth deleted resumes from model_0000001.pth,
    trains iterations 2 and 3, and leaves the truncated file as model_final.pth.unreadable."""
    split = ensure_split("train", tmp_path / "data", num_images=4, seed=7, image_size=64)
    dataset, output_dir = "reliability_resume_train", tmp_path / "run"
    register = ["--register-coco", dataset, split.json_file, split.image_root]
    opts = _opts(dataset, output_dir)
    opts[opts.index("SOLVER.CHECKPOINT_PERIOD") + 1] = "1"

    def trainer(max_iter: int, *flags: str) -> train_net.Trainer:
        run_opts = list(opts)
        run_opts[run_opts.index("SOLVER.MAX_ITER") + 1] = str(max_iter)
        argv = ["--config-file", str(SYNTHETIC_CONFIG), *register, *flags, *run_opts]
        args = parse_tool_args(train_net.build_parser(), argv)
        train_net.register_datasets(args)
        trainer = train_net.Trainer(train_net.setup(args))
        trainer.resume_or_load(resume=args.resume)
        return trainer

    trainer(3).train()
    assert (output_dir / "last_checkpoint").read_text() == "model_final.pth"
    final = output_dir / "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])
    truncated = final.read_bytes()
    (output_dir / "model_0000002.pth").unlink()
    expected = _loads(output_dir / "model_0000001.pth")

    resumed = trainer(4, "--resume")
    assert resumed.start_iter == expected["iteration"] + 1 == 2
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected["model"][name]), name
    assert (output_dir / "model_final.pth.unreadable").read_bytes() == truncated
    resumed.train()
    assert _loads(output_dir / "model_final.pth")["iteration"] == 3
    assert _loads(output_dir / "model_0000002.pth")["iteration"] == 2
    assert (output_dir / "model_final.pth.unreadable").read_bytes() == truncated
