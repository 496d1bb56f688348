"""musu's trainer: Detectron2's ``DefaultTrainer`` with the pieces every musu run uses.

:class:`Trainer` is what ``train_net.py`` trains and evaluates with; another script reuses it by
importing it (``from musu.engine import Trainer``) and subclassing it as any ``DefaultTrainer``.
:func:`check_data` decodes every image of a config's datasets (``train_net.py --check-data``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections import OrderedDict
from typing import Any, Iterable, Iterator, Optional

import torch
from detectron2.config import CfgNode
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, defaults
from detectron2.engine import hooks as d2_hooks
from detectron2.engine.train_loop import HookBase
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import log_every_n_seconds

from ..data import NamingMapper, UnreadableImageError, check_image_files, find_unreadable_images
from ..modeling import DenseDetectorWithTTA
from .amp import apply_memory_format, autocast_context, build_train_loop, resolve_autocast
from .best_checkpoint import BestCheckpointer
from .checkpoint import AtomicCheckpointer
from .data_checks import check_dataset_classes
from .distributed import create_ddp_model
from .preemption import PreemptionHook, SignalShieldedMapper

__all__ = ["Trainer", "check_data"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _ddp_for_any_device() -> Iterator[None]:
    """Within the block, ``DefaultTrainer.__init__`` wraps the model with
    :func:`musu.engine.create_ddp_model` (DDP for CPU models too; Detectron2's passes
    ``device_ids``, which DDP rejects for a CPU model)."""
    original = defaults.create_ddp_model
    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original


class Trainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with:

    * COCO evaluation of every ``DATASETS.TEST`` dataset (:meth:`build_evaluator`), the latest
      results public as :attr:`eval_results` and returned by :meth:`train`;
    * atomic checkpoints (:class:`musu.engine.AtomicCheckpointer`) and, with
      ``TEST.EVAL_PERIOD > 0``, ``model_best.pth`` by ``bbox/AP``
      (:class:`musu.engine.BestCheckpointer`);
    * mixed precision and channels-last on CPU as on CUDA (:mod:`musu.engine.amp`:
      ``SOLVER.AMP``, ``TEST.AMP``, ``MODEL.CHANNELS_LAST``);
    * several processes on CPU as on CUDA (:func:`musu.engine.create_ddp_model`);
    * a checkpoint and a clean stop on SIGTERM / SIGINT (:class:`musu.engine.PreemptionHook`,
      raising :class:`musu.engine.Preempted`);
    * evaluation with test-time augmentation where ``TEST.AUG.ENABLED`` (:meth:`test_with_TTA`,
      after training and with ``--eval-only``);
    * data checked before the first step: class indices against ``MODEL.MUSU.NUM_CLASSES`` and
      every image file present; an image that fails to load names its file and dataset.
    """

    def __init__(self, cfg: CfgNode, resume_hint: str = ""):
        """
        Args:
            cfg: a frozen config (:func:`musu.build_config`).
            resume_hint: ends the message logged when a signal stops training (e.g. the
                command line that continues the run).
        """
        self.resume_hint = resume_hint
        with _ddp_for_any_device():
            super().__init__(cfg)
        # DefaultTrainer's loop is SimpleTrainer or the CUDA-only AMPTrainer; musu's follows
        # SOLVER.AMP on either device. Nothing has iterated the data loader yet.
        loop = self._trainer
        self._trainer = build_train_loop(self.cfg, loop.model, loop.data_loader, loop.optimizer)

    @property
    def eval_results(self) -> Optional[OrderedDict]:
        """The results of the latest evaluation during training (``TEST.EVAL_PERIOD`` and the
        final one), as :meth:`test` returns them (empty without ``DATASETS.TEST``); ``None``
        before any."""
        return getattr(self, "_last_eval_results", None)

    def train(self) -> Optional[OrderedDict]:
        """Detectron2's training; returns :attr:`eval_results`. The data loader's worker
        processes are shut down afterwards, also when stopped: they ignore SIGTERM / SIGINT
        (``SignalShieldedMapper``) and would otherwise block the interpreter's exit."""
        try:
            super().train()
        finally:
            self._trainer.reset_data_loader(lambda: None)
        return self.eval_results

    def build_hooks(self) -> list[HookBase]:
        """Detectron2's hooks around an :class:`AtomicCheckpointer`; ``BestCheckpointer`` right
        after the evaluation (``TEST.EVAL_PERIOD > 0``); ``PreemptionHook`` last, so that the
        iteration's checkpoint, evaluation and metrics come first."""
        # DefaultTrainer.__init__ makes a DetectionCheckpointer just before calling this method:
        # every checkpoint of a musu run is written atomically, so it is replaced before any
        # hook holds it.
        self.checkpointer = AtomicCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        hooks = super().build_hooks()
        if self.cfg.TEST.EVAL_PERIOD > 0 and comm.is_main_process():
            position = next(i for i, h in enumerate(hooks) if isinstance(h, d2_hooks.EvalHook))
            best = BestCheckpointer(self.cfg.TEST.EVAL_PERIOD, self.checkpointer)
            hooks.insert(position + 1, best)
        if self.cfg.TEST.AUG.ENABLED:  # after training, also under test-time augmentation
            hooks.append(d2_hooks.EvalHook(0, lambda: self.test_with_TTA(self.cfg, self.model)))
        hooks.append(PreemptionHook(self.checkpointer, resume_hint=self.resume_hint))
        return hooks

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        """Detectron2's model, channels-last where ``MODEL.CHANNELS_LAST``."""
        return apply_memory_format(super().build_model(cfg), cfg)

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None) -> OrderedDict:
        """Detectron2's evaluation, under autocast where ``TEST.AMP.ENABLED`` allows it."""
        setting = resolve_autocast(cfg, training=False)
        logger.info(
            "Evaluation precision: %s (%s).", setting.dtype or torch.float32, setting.reason
        )
        with autocast_context(setting):
            return super().test(cfg, model, evaluators)

    @classmethod
    def test_with_TTA(cls, cfg: CfgNode, model: torch.nn.Module) -> OrderedDict:  # noqa: N802
        """:meth:`test` with test-time augmentation (``TEST.AUG``:
        :class:`musu.modeling.DenseDetectorWithTTA`); the results' keys end in ``_TTA`` and the
        evaluators write to ``OUTPUT_DIR/inference_TTA/<dataset>``."""
        logger.info(
            "Evaluation with test-time augmentation: scales %s (longest side at most %d)%s.",
            tuple(cfg.TEST.AUG.MIN_SIZES),
            cfg.TEST.AUG.MAX_SIZE,
            ", each also flipped" if cfg.TEST.AUG.FLIP else "",
        )
        evaluators = [
            cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name))
            for name in cfg.DATASETS.TEST
        ]
        results = cls.test(cfg, DenseDetectorWithTTA(cfg, model), evaluators)
        return OrderedDict((f"{key}_TTA", value) for key, value in results.items())

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """Detectron2's train loader, after checking every annotation's class index and that
        every image file exists; an image that fails to load names its file and dataset."""
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        if "MUSU" in cfg.MODEL:  # MuSu and the detectors that share MODEL.MUSU.NUM_CLASSES
            check_dataset_classes(dicts, cfg.MODEL.MUSU.NUM_CLASSES, cfg.DATASETS.TRAIN)
        check_image_files(dicts, cfg.DATASETS.TRAIN)
        mapper = NamingMapper(DatasetMapper(cfg, is_train=True), cfg.DATASETS.TRAIN)
        mapper = SignalShieldedMapper(mapper)  # workers outlive a SIGTERM to the process group
        return build_detection_train_loader(cfg, dataset=dicts, mapper=mapper)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        """Detectron2's test loader, after checking that every image file exists; an image that
        fails to load names its file and dataset."""
        dicts = DatasetCatalog.get(dataset_name)
        check_image_files(dicts, [dataset_name])
        mapper = SignalShieldedMapper(NamingMapper(DatasetMapper(cfg, False), [dataset_name]))
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None
    ) -> DatasetEvaluator:
        """``COCOEvaluator``, writing to ``OUTPUT_DIR/inference/<dataset_name>`` by default."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def _with_progress(records: list[dict[str, Any]], name: str) -> Iterable[dict[str, Any]]:
    """``records``, logging how many were consumed at most every 5 seconds."""
    for index, record in enumerate(records):
        log_every_n_seconds(
            logging.INFO, f"--check-data: {name}: {index}/{len(records)} images", n=5
        )
        yield record


def check_data(cfg: CfgNode) -> None:
    """Decode every image of ``DATASETS.TRAIN`` and ``DATASETS.TEST``, logging progress; raise
    :class:`musu.data.UnreadableImageError` listing every file that is missing or cannot be
    decoded."""
    problems = []
    for name in dict.fromkeys([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]):
        records = DatasetCatalog.get(name)
        bad = find_unreadable_images(_with_progress(records, name), cfg.INPUT.FORMAT)
        logger.info("--check-data: %s: %d image(s), %d bad", name, len(records), len(bad))
        problems += [f"{name}: {file_name}: {reason}" for file_name, reason in bad]
    if problems:
        raise UnreadableImageError(
            f"--check-data: {len(problems)} image(s) cannot be read:\n  " + "\n  ".join(problems)
        )
