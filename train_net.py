#!/usr/bin/env python
"""Train and evaluate MuSu (and the other detectors of this repository) with Detectron2.

python train_net.py --config-file configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml
python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <path or musu://name>
python train_net.py --config-file <cfg> --resume          # continue from the last checkpoint
python train_net.py --config-file <cfg> --num-gpus 8      # 8 processes through launch() (GPUs,
                                                          # or CPU processes with gloo)
python train_net.py --config-file <cfg> --num-machines 2 --machine-rank 0 \
    --dist-url tcp://HOST0:PORT                           # one of 2 machines (rank 1 on the other)
python train_net.py --config-file <cfg> --check-data      # decode every image first, list bad ones
python train_net.py --config-file <cfg> --register-coco my_train ann.json images/ \
    DATASETS.TRAIN "('my_train',)"                          # your own COCO-format data

Robustness: checkpoints and ``last_checkpoint`` are written atomically (a run killed at any moment
resumes from its last complete checkpoint with ``--resume``); the training data's class indices
are checked against ``MODEL.MUSU.NUM_CLASSES`` before the first step; unknown config keys and
invalid ``MODEL.MUSU`` values fail in ``setup`` naming the key; missing image files are listed
before training or evaluation starts, and an image that fails to load names its file and dataset.
SIGTERM / SIGINT stop training after the current iteration with a checkpoint and exit with status
128 + signal, printing the command that resumes (:class:`musu.engine.PreemptionHook`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import weakref

import torch
from detectron2.config import CfgNode
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import (
    DefaultTrainer,
    TrainerBase,
    default_argument_parser,
    default_setup,
)
from detectron2.engine import hooks as d2_hooks
from detectron2.engine import launch
from detectron2.engine.hooks import HookBase
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.multiprocessing import ProcessExitedException

import musu
from musu.data import (
    NamingMapper,
    UnreadableImageError,
    add_register_coco_argument,
    check_image_files,
    find_unreadable_images,
    register_coco_datasets,
)
from musu.engine import (
    PREEMPTION_SIGNALS,
    AtomicCheckpointer,
    BestCheckpointer,
    Preempted,
    PreemptionHook,
    SignalShieldedMapper,
    check_dataset_classes,
    create_ddp_model,
    forward_signals_to_children,
    limit_cpu_threads_per_process,
    preemption_exit_code,
)
from musu.engine.amp import (
    apply_memory_format,
    autocast_context,
    build_train_loop,
    resolve_autocast,
)

# A child of "detectron2": default_setup gives it the console and OUTPUT_DIR/log.txt[.rankN].
logger = logging.getLogger("detectron2.musu.train_net")

PREEMPTION_EXIT_CODES = {preemption_exit_code(signum) for signum in PREEMPTION_SIGNALS}


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with COCO evaluation of every test dataset, atomic
    checkpoints (:class:`musu.engine.AtomicCheckpointer`), a start-up check of the training
    data's class indices against ``MODEL.MUSU.NUM_CLASSES``, and mixed precision / channels-last
    on CPU as on CUDA (:mod:`musu.engine.amp`: ``SOLVER.AMP``, ``TEST.AMP``,
    ``MODEL.CHANNELS_LAST``), with ``TEST.EVAL_PERIOD > 0`` ``model_best.pth`` (by
    ``bbox/AP``, :class:`BestCheckpointer`), several processes on CPU as on CUDA
    (:func:`musu.engine.create_ddp_model`), a checkpoint and a clean stop on SIGTERM / SIGINT
    (:class:`musu.engine.PreemptionHook`), and images that fail to load named with their
    dataset (:class:`musu.data.NamingMapper`)."""

    def __init__(self, cfg: CfgNode, resume_hint: str = ""):
        """``resume_hint`` ends the message printed when a signal stops training."""
        # DefaultTrainer.__init__, except for two choices: the model is wrapped by
        # musu.engine.create_ddp_model (DDP also for CPU models, where Detectron2's device_ids
        # fail) and the loop is musu.engine.amp's for this device (Detectron2's AMPTrainer is
        # CUDA only).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = build_train_loop(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())
        # Last, so that the iteration's checkpoint, evaluation and metrics come first.
        self.register_hooks([PreemptionHook(self.checkpointer, resume_hint=resume_hint)])

    def train(self):
        """Detectron2's training; then (also when stopped) the data loader's worker processes are
        shut down, as they ignore SIGTERM / SIGINT (``SignalShieldedMapper``) and would otherwise
        block the interpreter's exit."""
        try:
            return super().train()
        finally:
            self._trainer.reset_data_loader(lambda: None)

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
        # With TEST.EVAL_PERIOD > 0, keep model_best.pth (by bbox/AP) through the Trainer's
        # AtomicCheckpointer, right after the evaluation hook that produces the metric.
        hooks = super().build_hooks()
        if self.cfg.TEST.EVAL_PERIOD > 0 and comm.is_main_process():
            position = next(i for i, h in enumerate(hooks) if isinstance(h, d2_hooks.EvalHook))
            hooks.insert(
                position + 1, BestCheckpointer(self.cfg.TEST.EVAL_PERIOD, self.checkpointer)
            )
        return hooks

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
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None
    ) -> DatasetEvaluator:
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def setup(args) -> CfgNode:
    """:func:`musu.build_config` of ``--config-file`` and the command-line opts (frozen,
    validated), then Detectron2's ``default_setup`` (output folder, logging, seeds) and the same
    logging for musu's own loggers."""
    if not args.config_file:
        raise ValueError("--config-file is required (e.g. configs/Synthetic/*.yaml)")
    cfg = musu.build_config(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="musu")
    return cfg


def register_datasets(args) -> None:
    """Register the ``--register-coco NAME JSON_FILE IMAGE_ROOT`` datasets (in each process)."""
    register_coco_datasets(getattr(args, "register_coco", None))


def check_data(cfg: CfgNode) -> None:
    """Decode every image of ``DATASETS.TRAIN`` and ``DATASETS.TEST`` (``--check-data``); raise
    ``UnreadableImageError`` listing every file that is missing or cannot be decoded."""
    problems = []
    for name in dict.fromkeys([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]):
        records = DatasetCatalog.get(name)
        bad = find_unreadable_images(records, cfg.INPUT.FORMAT)
        logger.info("--check-data: %s: %d image(s), %d bad", name, len(records), len(bad))
        problems += [f"{name}: {file_name}: {reason}" for file_name, reason in bad]
    if problems:
        raise UnreadableImageError(
            f"--check-data: {len(problems)} image(s) cannot be read:\n  " + "\n  ".join(problems)
        )


def main(args):
    """Train, or evaluate with ``--eval-only``, in this process (one of ``launch``'s workers).
    Training stopped by SIGTERM / SIGINT exits with status ``128 + signal`` after its checkpoint
    (:class:`musu.engine.PreemptionHook`)."""
    register_datasets(args)
    cfg = setup(args)
    limit_cpu_threads_per_process()
    if getattr(args, "check_data", False):
        check_data(cfg)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # Evaluation needs every weight of the model from the file (require_weights="all").
        checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, require_weights="all")
        if not cfg.MODEL.WEIGHTS and not (args.resume and checkpointer.has_checkpoint()):
            raise ValueError(
                "--eval-only needs weights: set MODEL.WEIGHTS (a file or musu://name), or use "
                f"--resume with a last_checkpoint in OUTPUT_DIR ({cfg.OUTPUT_DIR})"
            )
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg, resume_hint=getattr(args, "resume_command", ""))
    trainer.resume_or_load(resume=args.resume)
    try:
        trainer.train()
    except Preempted as stopped:
        logger.warning(stopped.message)
        # The launcher terminates every worker as soon as one exits: wait until all have logged.
        comm.synchronize()
        raise SystemExit(stopped.exit_code) from None
    return getattr(trainer, "_last_eval_results", None)  # set by the final evaluation, if any


def argument_parser() -> argparse.ArgumentParser:
    """Detectron2's argument parser plus ``--register-coco`` and ``--check-data``."""
    parser = default_argument_parser()
    add_register_coco_argument(
        parser, help="register a COCO-format dataset under NAME before training (repeatable)"
    )
    parser.add_argument(
        "--check-data",
        action="store_true",
        help="decode every image of DATASETS.TRAIN and DATASETS.TEST first and list all that "
        "cannot be read (costs one full decode of each dataset)",
    )
    return parser


def resume_command(argv: list[str]) -> str:
    """The command line that continues the run of ``argv`` (``sys.argv``): ``--resume`` added
    before the ``KEY VALUE`` options (argparse gives everything after them to ``opts``)."""
    if "--resume" in argv:
        return shlex.join(["python", *argv])
    return shlex.join(["python", argv[0], "--resume", *argv[1:]])


def invoke_main() -> None:
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    args.resume_command = resume_command(sys.argv)
    # With several processes, the launcher waits for its workers: a signal sent to it is passed
    # on to them, and they stop after a checkpoint (musu.engine.PreemptionHook). With one, main
    # runs in this process and the hook handles the signals itself.
    several = args.num_gpus * args.num_machines > 1
    with forward_signals_to_children() if several else contextlib.nullcontext():
        try:
            launch(
                main,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
            )
        except ProcessExitedException as stopped:
            if stopped.exit_code not in PREEMPTION_EXIT_CODES:
                raise
            print(f"Training stopped by a signal; continue with: {args.resume_command}")
            sys.exit(stopped.exit_code)


if __name__ == "__main__":
    invoke_main()
