#!/usr/bin/env python
"""Train / evaluate the RankSort configs (the root train_net.py plus ``add_ranksort_config``).

python projects/RankSort/train_net.py --config-file projects/RankSort/configs/Synthetic/<cfg>.yaml
python projects/RankSort/train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <path>
"""

from __future__ import annotations

import logging
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator

import musu
import musu_ranksort


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with COCO evaluation of every test dataset."""

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None
    ) -> DatasetEvaluator:
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def setup(args) -> CfgNode:
    """Defaults + MuSu keys + RankSort keys + file + opts, validated and frozen."""
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    musu_ranksort.add_ranksort_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("CUDA is not available: MODEL.DEVICE set to 'cpu'.")
        cfg.MODEL.DEVICE = "cpu"
    musu.validate_musu_config(cfg)
    musu_ranksort.validate_ranksort_config(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
