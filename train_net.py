#!/usr/bin/env python
"""Train and evaluate MuSu (and the other detectors of this repository) with Detectron2.

python train_net.py --config-file configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml
python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <path or musu://name>
python train_net.py --config-file <cfg> --resume          # continue from the last checkpoint
python train_net.py --config-file <cfg> --num-gpus 8      # 8 processes (GPUs, or CPU with gloo)
python train_net.py --config-file <cfg> --num-machines 2 --machine-rank 0 \\
    --dist-url tcp://HOST0:PORT                           # one of 2 machines (rank 1 on the other)
python train_net.py --config-file <cfg> --check-data      # decode every image first, list bad ones
python train_net.py --config-file <cfg> --register-coco my_train ann.json images/ \\
    DATASETS.TRAIN "('my_train',)"                        # your own COCO-format data

The trainer is :class:`musu.engine.Trainer` (atomic checkpoints, ``model_best.pth``, mixed
precision, data checks, a checkpoint and exit status ``128 + signal`` on SIGTERM / SIGINT); a
script of your own reuses it with ``from musu.engine import Trainer``.
"""

from __future__ import annotations

import argparse

from detectron2.config import CfgNode
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import musu
from musu.cli import parse_tool_args, train_argument_parser
from musu.data import register_coco_datasets
from musu.engine import (
    AtomicCheckpointer,
    Trainer,
    check_data,
    exit_when_preempted,
    launch,
    limit_cpu_threads_per_process,
)


def setup(args: argparse.Namespace) -> CfgNode:
    """:func:`musu.build_config` of ``--config-file`` and the overrides (frozen, validated),
    then Detectron2's ``default_setup`` (output folder, logging, seeds) and the same logging for
    musu's own loggers."""
    if not args.config_file:
        raise ValueError("--config-file is required (e.g. configs/Synthetic/*.yaml)")
    cfg = musu.build_config(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="musu")
    return cfg


def main(args: argparse.Namespace):
    """Train, or evaluate with ``--eval-only``, in this process (one of ``launch``'s workers);
    returns the evaluation results."""
    register_coco_datasets(getattr(args, "register_coco", None))
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
        results = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            results.update(Trainer.test_with_TTA(cfg, model))
        return results
    trainer = Trainer(cfg, resume_hint=getattr(args, "resume_command", ""))
    trainer.resume_or_load(resume=args.resume)
    with exit_when_preempted():
        return trainer.train()


def build_parser() -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` with ``--register-coco``, ``--check-data`` and
    the ``--opts`` alias (:func:`musu.cli.train_argument_parser`)."""
    return train_argument_parser(epilog=__doc__)


if __name__ == "__main__":
    args = parse_tool_args(build_parser())
    print("Command Line Args:", args)
    launch(main, args)
