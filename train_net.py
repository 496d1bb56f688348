#!/usr/bin/env python
"""Train and evaluate MuSu (and the other detectors of this repository) with Detectron2.

python train_net.py --config-file configs/Synthetic/musu_R_18_FPN_synthetic.yaml
python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <path or musu://name>
python train_net.py --config-file <cfg> --resume          # continue from the last checkpoint
python train_net.py --config-file <cfg> --num-gpus 8      # multi-GPU through launch()
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

logger = logging.getLogger("musu.train_net")


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
    """Config from defaults + MuSu keys + file + command-line opts, frozen and validated."""
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("CUDA is not available: MODEL.DEVICE set to 'cpu'.")
        cfg.MODEL.DEVICE = "cpu"
    musu.validate_musu_config(cfg)
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
    trainer.train()
    return getattr(trainer, "_last_eval_results", None)  # set by the final evaluation, if any


def invoke_main() -> None:
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


if __name__ == "__main__":
    invoke_main()
