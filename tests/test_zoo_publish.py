"""tools/publish_model.py: what a published file holds, its hashed
name, and the numbers collected from a run's output folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from musu.model_zoo.file_io import ModelZooError, validate_checkpoint
from musu.model_zoo.table import TABLE_FILE, read_table

import publish_model  # tools/publish_model.py (conftest.py puts tools/ on sys.path)
from publish_model import (
    AUTHOR,
    model_zoo_row,
    publish,
    publishable_checkpoint,
    read_run_metrics,
    schedule_name,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = "Synthetic/musu_paper_R_18_FPN_1200it"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _write_run(run: Path, with_bbox_in_metrics: bool = True) -> nn.Module:
    """A train_net.py-like output folder: training checkpoint with optimizer and scheduler
    state, Detectron2's metrics.json (JSON lines), log.txt and config.yaml."""
    run.mkdir(parents=True)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    optimizer.step()  # momentum buffers: optimizer state that must not be published
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5)
    checkpointer = DetectionCheckpointer(model, str(run), optimizer=optimizer, scheduler=scheduler)
    checkpointer.save("model_final", iteration=599)
    records = [{"iteration": i, "time": t, "total_loss": 1.0} for i, t in [(19, 2.0), (39, 0.5),
               (59, 0.6), (79, 0.4)]]  # fmt: skip
    final = {"iteration": 599, "time": 0.7}
    if with_bbox_in_metrics:
        final.update({"bbox/AP": 41.25, "bbox/AP50": 60.5, "bbox/AP75": 44.0, "bbox/AP-star": 3.0})
    lines = [json.dumps(r) for r in records + [final]] + ['{"iteration": 600, "ti']  # cut short
    (run / "metrics.json").write_text("\n".join(lines) + "\n")
    (run / "log.txt").write_text(
        "[11/20 23:20:55] d2.engine.hooks INFO: Overall training speed: 598 iterations in "
        "0:14:47 (1.4842 s / it)\n"
        "[11/20 23:30:01] d2.evaluation.evaluator INFO: Total inference pure compute time: "
        "0:00:03 (0.0312 s / iter per device, on 1 devices)\n"
        "[11/20 23:30:02] d2.evaluation.testing INFO: copypaste: Task: bbox\n"
        "[11/20 23:30:02] d2.evaluation.testing INFO: copypaste: AP,AP50,AP75,APs,APm,APl\n"
        "[11/20 23:30:02] d2.evaluation.testing INFO: copypaste: 12.5,30.0,8.0,1.0,2.0,3.0\n"
    )
    config = {"SOLVER": {"MAX_ITER": 600, "IMS_PER_BATCH": 8}, "DATASETS": {"TEST": ["val"]}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return model


def test_publish_drops_training_state_and_names_file_by_hash(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = _write_run(run)
    assert {"optimizer", "scheduler", "iteration"} <= torch.load(run / "model_final.pth").keys()

    published = publish(run / "model_final.pth", tmp_path / "mirror", NAME + ".yaml")
    content = published.path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    assert published.sha256 == digest
    assert published.path.name == f"model_final_{digest[:12]}.pth"
    assert published.path.parent == tmp_path / "mirror" / NAME
    assert published.relpath == f"{NAME}/{published.path.name}"
    assert published.url == f"musu://{NAME}/{published.path.name}"

    loaded = torch.load(published.path, weights_only=True)
    assert loaded.keys() == {"model", "__author__"} and loaded["__author__"] == AUTHOR
    state = model.state_dict()
    assert loaded["model"].keys() == state.keys()
    assert all(torch.equal(loaded["model"][k], v) for k, v in state.items())
    assert not list(published.path.parent.glob("*.part"))

    metrics = json.loads((published.path.parent / "metrics.json").read_text())
    assert metrics["bbox"]["AP"] == 41.25 and metrics["bbox"]["AP-star"] == 3.0
    assert metrics["train_time_s_per_iter"] == pytest.approx(0.6)  # median of 2, .5, .6, .4, .7
    assert metrics["inference_time_s_per_im"] == pytest.approx(0.0312)
    assert metrics["train_time_overall_s_per_iter"] == pytest.approx(1.4842)
    assert metrics["sha256"] == digest and metrics["file"] == published.path.name
    assert (metrics["max_iter"], metrics["ims_per_batch"]) == (600, 8)
    assert metrics["test_datasets"] == ["val"]


def test_same_weights_publish_to_the_same_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_run(run)
    first = publish(run / "model_final.pth", tmp_path / "a", NAME)
    second = publish(run / "model_final.pth", tmp_path / "b", NAME)
    assert first.path.name == second.path.name
    assert first.path.read_bytes() == second.path.read_bytes()


def test_model_zoo_row_and_table_entry(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_run(run)
    published = publish(run / "model_final.pth", tmp_path / "mirror", NAME)
    row = model_zoo_row(published, "https://example.org/zoo")
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert cells[:8] == [
        "musu_paper_R_18_FPN_1200it",
        f"[config](configs/{NAME}.yaml)",
        "600 it × 8 im",
        "0.600",
        "0.031",
        "41.2",
        "60.5",
        "44.0",
    ]
    assert f"`musu://{published.relpath}`" in row
    assert f"(https://example.org/zoo/{published.relpath})" in row
    assert f"(https://example.org/zoo/{NAME}/metrics.json)" in row
    entry = published.table_entry()
    assert f'"name": "{NAME}"' in entry and published.sha256 in entry


def test_ap_from_log_copypaste_when_metrics_lack_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_run(run, with_bbox_in_metrics=False)
    metrics = read_run_metrics(run)
    assert metrics["bbox"] == {"AP": 12.5, "AP50": 30.0, "AP75": 8.0, "APs": 1.0, "APm": 2.0,
                               "APl": 3.0}  # fmt: skip


def test_empty_run_dir_has_no_numbers(tmp_path: Path) -> None:
    assert read_run_metrics(tmp_path) == {
        "bbox": {},
        "train_time_s_per_iter": None,
        "train_time_overall_s_per_iter": None,
        "inference_time_s_per_im": None,
        "iterations_logged": None,
    }


def test_publishable_checkpoint_refuses_non_tensors() -> None:
    with pytest.raises(TypeError, match="'step'"):
        publishable_checkpoint({"model": {"w": torch.ones(1), "step": 3}})
    out = publishable_checkpoint({"w": torch.ones(2, requires_grad=True)})  # a bare state dict
    assert out.keys() == {"model", "__author__"} and not out["model"]["w"].requires_grad
    with pytest.raises(ModelZooError, match="unexpected entries"):
        validate_checkpoint({"model": {}, "optimizer": {}})


def test_schedule_names() -> None:
    assert schedule_name(90000, 16) == "1x"
    assert schedule_name(180000, 16) == "2x"
    assert schedule_name(300, 8) == "300 it × 8 im"


def test_tool_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _write_run(run)
    tool = publish_model
    published = tool.main(["--run-dir", str(run), "--name", NAME, "--output", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert published.path.is_file() and str(published.path) in out
    assert model_zoo_row(published) in out
    assert published.table_entry() in out
    with pytest.raises(SystemExit, match="not found"):
        tool.main(["--run-dir", str(tmp_path / "nope"), "--name", NAME, "--output", str(tmp_path)])


def test_update_table_adds_or_replaces_the_record(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_run(run)
    table = tmp_path / "models.json"
    table.write_text(TABLE_FILE.read_text())
    before = read_table(table)
    published = publish(run / "model_final.pth", tmp_path / "mirror", NAME)
    publish_model.update_table(published, table)
    after = read_table(table)
    assert after[NAME] == published.entry()
    assert after[NAME].file == published.relpath and after[NAME].ap == 41.25
    assert {k: v for k, v in after.items() if k != NAME} == {
        k: v for k, v in before.items() if k != NAME
    }
    assert list(after) == list(before) + ([] if NAME in before else [NAME])
    assert (
        json.loads(published.table_entry())
        == json.loads(table.read_text())["models"][list(after).index(NAME)]
    )


def test_tool_prints_the_table_and_updates_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = tmp_path / "models.json"
    table.write_text('{"models": []}\n')
    run = tmp_path / "run"
    _write_run(run)
    argv = ["--run-dir", str(run), "--name", NAME, "--output", str(tmp_path / "m")]
    published = publish_model.main([*argv, "--table", str(table), "--update-table"])
    capsys.readouterr()
    assert publish_model.main(["--print-table", "--table", str(table)]) is None
    out = capsys.readouterr().out
    assert out == publish_model.TABLE_HEADER + "\n" + model_zoo_row(published) + "\n"
