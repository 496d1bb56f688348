#!/usr/bin/env python
"""Train or evaluate a LazyConfig (Python) config: model, data, optimizer and schedule as objects.

python tools/lazyconfig_train_net.py --config-file configs/Synthetic/musu_R_18_FPN_1200it.py
python tools/lazyconfig_train_net.py --config-file <cfg.py> --eval-only \\
    train.init_checkpoint=output/synthetic/musu_R_18_FPN_1200it_lazy/model_final.pth
python tools/lazyconfig_train_net.py --config-file <cfg.py> --resume  # from the newest checkpoint
python tools/lazyconfig_train_net.py --config-file <cfg.py> train.max_iter=300 train.device=cpu

Overrides are LazyConfig's ``key=value`` words, as in Detectron2's ``lazyconfig_train_net.py``.
The config holds ``model``, ``dataloader.{train,test,evaluator}``, ``optimizer``,
``lr_multiplier`` and ``train`` (configs/common/train.py). Training has the pieces of
``train_net.py``: atomic checkpoints and ``--resume`` from the newest intact one,
``model_best.pth`` when ``train.eval_period > 0``, ``train.amp.enabled`` with the precision rule
of ``SOLVER.AMP``, several processes on CPU, and a checkpoint and exit status ``128 + signal`` on
SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Dict

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

import musu  # noqa: F401  (registers the built-in datasets and musu://)
from musu.cli import add_opts_alias, parse_tool_args
from musu.data import add_register_coco_argument, register_coco_datasets
from musu.engine import (
    AtomicCheckpointer,
    BestCheckpointer,
    PreemptionHook,
    create_ddp_model,
    exit_when_preempted,
    launch,
    limit_cpu_threads_per_process,
)
from musu.engine.amp import choose_autocast, train_loop

logger = logging.getLogger("musu.lazyconfig_train_net")


def do_test(cfg, model: torch.nn.Module) -> Dict[str, Any]:
    """The evaluator's results of ``model`` on ``dataloader.test``."""
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(results)
    return results


def do_train(args: argparse.Namespace, cfg) -> Dict[str, Any]:
    """Train ``cfg`` from ``train.init_checkpoint`` (or ``--resume``); returns the results of the
    last evaluation."""
    model = instantiate(cfg.model).to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    model = create_ddp_model(model, **cfg.train.ddp)
    amp = cfg.train.amp
    setting = choose_autocast(
        torch.device(cfg.train.device).type,
        amp.enabled,
        key="train.amp.enabled",
        precision=amp.get("precision", "float16"),
        cpu_bfloat16=amp.get("cpu_bfloat16", "native"),
    )
    trainer = train_loop(setting, model, instantiate(cfg.dataloader.train), optimizer)
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    results: Dict[str, Any] = {}

    def evaluate() -> Dict[str, Any]:
        results.update(do_test(cfg, model))
        return results

    main = comm.is_main_process()
    period = cfg.train.eval_period
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
            hooks.EvalHook(period, evaluate),
            BestCheckpointer(period, checkpointer) if period > 0 and main else None,
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if main
                else None
            ),
            PreemptionHook(checkpointer, resume_hint=getattr(args, "resume_command", "")),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    with exit_when_preempted():
        trainer.train(start_iter, cfg.train.max_iter)
    return results


def setup(args: argparse.Namespace):
    """The config of ``--config-file`` (a ``.py`` file: a ``.yaml`` one is refused, Detectron2
    would read it unsafely) with the overrides, on CPU where CUDA is not available, after
    Detectron2's ``default_setup`` (output folder, logging, ``train.seed``)."""
    if not str(args.config_file).endswith(".py"):
        # Detectron2's LazyConfig reads .yaml files with yaml.unsafe_load: a tag could run code.
        raise ValueError(
            f"--config-file {args.config_file}: this tool reads LazyConfig Python files (.py); "
            "train YAML configs with train_net.py, which reads them with yaml.safe_load"
        )
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: train.device set to 'cpu'.")
        cfg.train.device = "cpu"
    default_setup(cfg, args)
    return cfg


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Train, or evaluate with ``--eval-only``, in this process; returns the evaluation results."""
    register_coco_datasets(args.register_coco)
    cfg = setup(args)
    limit_cpu_threads_per_process()
    if not args.eval_only:
        return do_train(args, cfg)
    model = instantiate(cfg.model).to(cfg.train.device)
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, require_weights="all")
    if not cfg.train.init_checkpoint and not (args.resume and checkpointer.has_checkpoint()):
        raise ValueError(
            "--eval-only needs weights: train.init_checkpoint=<file or musu://name>, or --resume "
            f"with a last_checkpoint in train.output_dir ({cfg.train.output_dir})"
        )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    return do_test(cfg, create_ddp_model(model))


def build_parser() -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` with ``--register-coco`` and the ``--opts``
    alias; the overrides are ``key=value`` words."""
    parser = default_argument_parser(__doc__)
    parser.description = "Train or evaluate a LazyConfig (Python) config."
    add_register_coco_argument(parser)
    add_opts_alias(parser)
    return parser


if __name__ == "__main__":
    launch(main, parse_tool_args(build_parser(), lazy_config=True))
