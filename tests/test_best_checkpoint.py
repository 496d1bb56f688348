"""train_net.py keeps ``model_best.pth`` (by ``bbox/AP``) when ``TEST.EVAL_PERIOD > 0``.

Tiny synthetic splits (16 train / 8 val images of 128 px), as in tests/test_train_net.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from detectron2.engine import default_argument_parser

from musu.data import register_synthetic_split
from musu.engine import AtomicCheckpointer, BestCheckpointer

import train_net  # the root script (conftest.py puts the root on sys.path)

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO_ROOT / "configs" / "Synthetic" / "musu_paper_R_18_FPN_1200it.yaml"
TRAIN_NAME, VAL_NAME = "best_synthetic_train", "best_synthetic_val"


@pytest.fixture(scope="module")
def tiny_datasets(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("synthetic")
    for name, split, count, seed in [(TRAIN_NAME, "train", 16, 21), (VAL_NAME, "val", 8, 22)]:
        register_synthetic_split(name, root, split, num_images=count, seed=seed, image_size=128)


def _run(output_dir: Path, max_iter: int, resume: bool = False):
    argv = ["--config-file", str(BASE_CONFIG)] + (["--resume"] if resume else [])
    argv += [
        "OUTPUT_DIR", str(output_dir),
        "DATASETS.TRAIN", f"('{TRAIN_NAME}',)",
        "DATASETS.TEST", f"('{VAL_NAME}',)",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.BASE_LR", "0.01",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.CHECKPOINT_PERIOD", "1000",
        "TEST.EVAL_PERIOD", "4",
        "INPUT.MIN_SIZE_TRAIN", "(128,)",
        "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "128",
        "INPUT.MAX_SIZE_TEST", "128",
    ]  # fmt: skip
    return train_net.main(default_argument_parser().parse_args(argv))


def _evaluations(output_dir: Path) -> list[tuple[int, float]]:
    lines = (output_dir / "metrics.json").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["iteration"], r["bbox/AP"]) for r in records if "bbox/AP" in r]


@pytest.mark.slow
def test_model_best_is_kept_atomically_and_survives_resume(
    tiny_datasets: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved: list[str] = []
    original_save = AtomicCheckpointer.save

    def recording_save(self, name, **kwargs):
        saved.append(name)
        return original_save(self, name, **kwargs)

    monkeypatch.setattr(AtomicCheckpointer, "save", recording_save)
    output_dir = tmp_path / "run"
    _run(output_dir, max_iter=8)  # evaluations after iterations 4 and 8

    evaluations = _evaluations(output_dir)
    # Periodic evaluation after iteration 4; the final one is stored at trainer.iter == max_iter.
    assert [iteration for iteration, _ in evaluations] == [3, 8]
    best_iter, best_ap = evaluations[0]
    for iteration, ap in evaluations[1:]:  # strictly better replaces (Detectron2's rule)
        if ap > best_ap:
            best_iter, best_ap = iteration, ap
    assert "model_best" in saved, "model_best.pth was not written by the AtomicCheckpointer"
    best = torch.load(output_dir / "model_best.pth", map_location="cpu", weights_only=False)
    assert best["iteration"] == best_iter
    assert {"model", "trainer"} <= set(best)  # a full training state, like model_final.pth
    record = json.loads((output_dir / "model_best.json").read_text())
    assert record == {"metric": "bbox/AP", "value": pytest.approx(best_ap), "iteration": best_iter}
    assert not list(output_dir.glob(".*.partial")), "a temporary checkpoint file was left behind"

    # A resumed run starts from the recorded best: with an unbeatable record, it keeps the file.
    (output_dir / "model_best.json").write_text(
        json.dumps({"metric": "bbox/AP", "value": 101.0, "iteration": best_iter})
    )
    (output_dir / "last_checkpoint").write_text("model_final.pth")
    saved.clear()
    _run(output_dir, max_iter=12, resume=True)  # one more evaluation, after iteration 12
    assert [i for i, _ in _evaluations(output_dir)][-1] == 12
    assert "model_best" not in saved
    kept = torch.load(output_dir / "model_best.pth", map_location="cpu", weights_only=False)
    assert kept["iteration"] == best_iter


def test_no_best_checkpointer_without_periodic_evaluation(tiny_datasets: None, tmp_path) -> None:
    cfg = train_net.musu.build_config(
        str(BASE_CONFIG),
        [
            "OUTPUT_DIR", str(tmp_path),
            "DATASETS.TRAIN", f"('{TRAIN_NAME}',)",
            "DATALOADER.NUM_WORKERS", "0",
            "TEST.EVAL_PERIOD", "0",
        ],
    )  # fmt: skip
    trainer = train_net.Trainer(cfg)
    assert not [h for h in trainer._hooks if isinstance(h, BestCheckpointer)]
