#!/usr/bin/env python
"""Train and evaluate MuSu (and the other detectors of this repository) with Detectron2.

python train_net.py --config-file configs/Synthetic/musu_R_18_FPN_synthetic.yaml
python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <path or musu://name>
python train_net.py --config-file <cfg> --resume          # continue from the last checkpoint
python train_net.py --config-file <cfg> --num-gpus 8      # multi-GPU through launch()
python train_net.py --config-file <cfg> --register-coco my_train ann.json images/ \
    DATASETS.TRAIN "('my_train',)"                          # your own COCO-format data

Robustness: checkpoints and ``last_checkpoint`` are written atomically (a run killed at any moment
resumes from its last complete checkpoint with ``--resume``); the training data's class indices
are checked against ``MODEL.MUSU.NUM_CLASSES`` before the first step; unknown config keys and
invalid ``MODEL.MUSU`` values fail in ``setup`` naming the key.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch
from detectron2.config import CfgNode
from detectron2.data import (
    DatasetCatalog,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup
from detectron2.engine import hooks as d2_hooks
from detectron2.engine import launch
from detectron2.engine.hooks import HookBase
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import musu
from musu.data import register_coco_dataset
from musu.engine import AtomicCheckpointer, atomic_write, check_dataset_classes
from musu.engine.amp import (
    apply_memory_format,
    autocast_context,
    build_train_loop,
    resolve_autocast,
)

logger = logging.getLogger("musu.train_net")

BEST_METRIC = "bbox/AP"
"""The evaluation result that ``model_best.pth`` maximizes (``TEST.EVAL_PERIOD > 0``)."""


class BestCheckpointer(d2_hooks.BestCheckpointer):
    """Detectron2's ``BestCheckpointer`` (keeps ``<prefix>.pth``, the weights of the best
    evaluation so far) that also records the best value in ``<prefix>.json`` (``metric``,
    ``value``, ``iteration``; written atomically after the checkpoint) and, when training resumes
    (``start_iter > 0``), starts from that record, so a resumed run never replaces the best
    checkpoint by a worse one. Saves go through ``checkpointer`` (train_net gives it the
    Trainer's :class:`~musu.engine.AtomicCheckpointer`), which also re-tags ``last_checkpoint``:
    it names the newest complete checkpoint either way."""

    def __init__(
        self,
        eval_period: int,
        checkpointer: AtomicCheckpointer,
        val_metric: str = BEST_METRIC,
        file_prefix: str = "model_best",
    ) -> None:
        super().__init__(eval_period, checkpointer, val_metric, mode="max", file_prefix=file_prefix)
        self.checkpointer = checkpointer
        self.metric = val_metric
        self.record_file = os.path.join(checkpointer.save_dir, f"{file_prefix}.json")

    def before_train(self) -> None:
        if self.trainer.start_iter > 0 and os.path.isfile(self.record_file):
            with open(self.record_file) as f:
                record = json.load(f)
            if record.get("metric") == self.metric:
                self.best_metric, self.best_iter = record["value"], record["iteration"]
                logger.info(
                    "Resuming with the best %s so far: %.5f at iteration %d (%s)",
                    self.metric,
                    self.best_metric,
                    self.best_iter,
                    self.record_file,
                )

    def _write_record_if_changed(self, before: tuple) -> None:
        if (self.best_metric, self.best_iter) != before and self.best_metric is not None:
            record = {"metric": self.metric, "value": self.best_metric, "iteration": self.best_iter}
            with atomic_write(self.record_file, "w") as f:
                json.dump(record, f)

    def after_step(self) -> None:
        before = (self.best_metric, self.best_iter)
        super().after_step()
        self._write_record_if_changed(before)

    def after_train(self) -> None:
        before = (self.best_metric, self.best_iter)
        super().after_train()
        self._write_record_if_changed(before)


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with COCO evaluation of every test dataset, atomic
    checkpoints (:class:`musu.engine.AtomicCheckpointer`), a start-up check of the training
    data's class indices against ``MODEL.MUSU.NUM_CLASSES``, and mixed precision / channels-last
    on CPU as on CUDA (:mod:`musu.engine.amp`: ``SOLVER.AMP``, ``TEST.AMP``,
    ``MODEL.CHANNELS_LAST``), and, with ``TEST.EVAL_PERIOD > 0``, ``model_best.pth`` (by
    ``bbox/AP``, :class:`BestCheckpointer`)."""

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer builds AMPTrainer (CUDA only) when SOLVER.AMP.ENABLED: build it with
        # float32, then replace its loop by the one for this device (musu.engine.amp).
        float32_cfg = cfg.clone()
        float32_cfg.defrost()
        float32_cfg.SOLVER.AMP.ENABLED = False
        float32_cfg.freeze()
        super().__init__(float32_cfg)
        self.cfg.defrost()  # DefaultTrainer keeps float32_cfg, possibly rescaled by world size
        self.cfg.SOLVER.AMP.ENABLED = cfg.SOLVER.AMP.ENABLED
        self.cfg.freeze()
        loop = self._trainer
        self._trainer = build_train_loop(self.cfg, loop.model, loop.data_loader, loop.optimizer)

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        return apply_memory_format(super().build_model(cfg), cfg)

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None):
        """Detectron2's evaluation, under autocast where ``TEST.AMP.ENABLED`` allows it."""
        setting = resolve_autocast(cfg, training=False)
        logger.info(
            "Evaluation precision: %s (%s).", setting.dtype or torch.float32, setting.reason
        )
        with autocast_context(setting):
            return super().test(cfg, model, evaluators)

    def build_hooks(self) -> list[HookBase]:
        # DefaultTrainer.__init__ builds a DetectionCheckpointer just before calling build_hooks;
        # replace it here so that the PeriodicCheckpointer hook and resume_or_load use ours.
        # With TEST.EVAL_PERIOD > 0, keep model_best.pth (by bbox/AP) through the same
        # checkpointer, right after the evaluation hook that produces the metric.
        previous = self.checkpointer
        self.checkpointer = AtomicCheckpointer(
            previous.model, previous.save_dir, **previous.checkpointables
        )
        hooks = super().build_hooks()
        if self.cfg.TEST.EVAL_PERIOD > 0 and comm.is_main_process():
            position = next(i for i, h in enumerate(hooks) if isinstance(h, d2_hooks.EvalHook))
            hooks.insert(
                position + 1, BestCheckpointer(self.cfg.TEST.EVAL_PERIOD, self.checkpointer)
            )
        return hooks

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """Detectron2's train loader, after checking every annotation's class index."""
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        if "MUSU" in cfg.MODEL:  # MuSu and the detectors that share MODEL.MUSU.NUM_CLASSES
            check_dataset_classes(dicts, cfg.MODEL.MUSU.NUM_CLASSES, cfg.DATASETS.TRAIN)
        return build_detection_train_loader(cfg, dataset=dicts)

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None
    ) -> DatasetEvaluator:
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def setup(args) -> CfgNode:
    """:func:`musu.build_config` of ``--config-file`` and the command-line opts (frozen,
    validated), then Detectron2's ``default_setup`` (output folder, logging, seeds) and the same
    logging for musu's own loggers."""
    cfg = musu.build_config(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="musu")
    return cfg


def register_datasets(args) -> None:
    """Register the ``--register-coco NAME JSON_FILE IMAGE_ROOT`` datasets (in each process)."""
    for name, json_file, image_root in getattr(args, "register_coco", None) or []:
        if name not in DatasetCatalog.list():
            register_coco_dataset(name, json_file, image_root)


def main(args):
    register_datasets(args)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    return getattr(trainer, "_last_eval_results", None)  # set by the final evaluation, if any


def argument_parser() -> argparse.ArgumentParser:
    """Detectron2's argument parser plus ``--register-coco``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        metavar=("NAME", "JSON_FILE", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME before training (repeatable)",
    )
    return parser


def check_launch_args(args) -> None:
    """Fail early, with the reason, where Detectron2 would fail late and obscurely: its
    DefaultTrainer wraps the model in DistributedDataParallel with ``device_ids=[local_rank]``,
    which DDP rejects for a CPU model, so ``--num-gpus N > 1`` needs CUDA devices."""
    if args.num_gpus > 1 and not args.eval_only and not torch.cuda.is_available():
        raise ValueError(
            f"--num-gpus {args.num_gpus} needs CUDA, which is not available: Detectron2's "
            "DefaultTrainer cannot train a CPU model in several processes (DDP rejects its "
            "device_ids on CPU). Use --num-gpus 1 on CPU."
        )


def invoke_main() -> None:
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    check_launch_args(args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
