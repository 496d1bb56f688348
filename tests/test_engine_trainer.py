"""musu.engine.Trainer reused by a script of its own (no train_net.py): a subclass trains a few
iterations, keeps its evaluation results public, and holds musu's checkpointer and hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
from detectron2.engine import hooks

import musu
from musu.data import register_synthetic_split
from musu.engine import AtomicCheckpointer, BestCheckpointer, PreemptionHook, Trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs" / "Synthetic" / "musu_R_18_FPN_synthetic.yaml"
TRAIN, VAL = "trainer_reuse_train", "trainer_reuse_val"


@pytest.fixture(scope="module")
def tiny_datasets(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("synthetic")
    register_synthetic_split(TRAIN, root, "train", num_images=8, seed=21, image_size=96)
    register_synthetic_split(VAL, root, "val", num_images=4, seed=22, image_size=96)


def _cfg(output_dir: Path, *extra: str):
    opts = [
        "OUTPUT_DIR", str(output_dir),
        "DATASETS.TRAIN", f"('{TRAIN}',)", "DATASETS.TEST", f"('{VAL}',)",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4",
        "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "100",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96",
        *extra,
    ]  # fmt: skip
    return musu.build_config(str(CONFIG), opts)


class CountingTrainer(Trainer):
    """What a user's script does: subclass musu's trainer and override one builder."""

    built_evaluators: list[str] = []

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        cls.built_evaluators.append(dataset_name)
        return super().build_evaluator(cfg, dataset_name, output_folder)


def test_a_script_of_its_own_trains_and_reads_the_results(tiny_datasets, tmp_path: Path) -> None:
    trainer = CountingTrainer(_cfg(tmp_path, "TEST.EVAL_PERIOD", "2"))
    assert trainer.eval_results is None  # nothing evaluated yet
    assert isinstance(trainer.checkpointer, AtomicCheckpointer)
    kinds = [type(h) for h in trainer._hooks]
    assert kinds[-1] is PreemptionHook  # last: the iteration's checkpoint and metrics first
    assert kinds[kinds.index(hooks.EvalHook) + 1] is BestCheckpointer
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert results is trainer.eval_results and set(results["bbox"]) >= {"AP", "AP50", "AP75"}
    assert CountingTrainer.built_evaluators == [VAL, VAL]  # iteration 2 and the final one
    assert (tmp_path / "model_final.pth").is_file() and (tmp_path / "model_best.pth").is_file()
    # model_best.pth is saved after the final evaluation, so last_checkpoint names it.
    assert (tmp_path / "last_checkpoint").read_text() == "model_best.pth"
    assert (tmp_path / "model_best.json").is_file()


def test_without_test_datasets_the_results_are_empty(tiny_datasets, tmp_path: Path) -> None:
    trainer = Trainer(_cfg(tmp_path, "DATASETS.TEST", "()"))
    trainer.resume_or_load(resume=False)
    assert trainer.train() == {} and trainer.eval_results == {}
    assert not any(isinstance(h, BestCheckpointer) for h in trainer._hooks)
