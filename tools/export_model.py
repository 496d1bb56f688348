#!/usr/bin/env python
"""Export a trained dense detector (MuSu with any A, D2FCOS, the projects' RetinaNet-style
detectors) to TorchScript or ONNX, and optionally evaluate the exported file on DATASETS.TEST.

    python tools/export_model.py --config-file configs/Synthetic/musu_R_18_FPN_synthetic.yaml \
        --format onnx --output exported --run-eval \
        MODEL.WEIGHTS output/musu_R_18_FPN_synthetic/model_final.pth

writes exported/model.onnx (or model.ts with --format torchscript) and, with --run-eval, prints
the COCO AP of the exported model run by ONNX Runtime (or TorchScript) through
musu.export.ExportedModel, on the test loader's images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from detectron2.data import build_detection_test_loader
from detectron2.data.detection_utils import read_image
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import musu
from musu.export import EXPORT_FORMATS, ExportedModel, export_model, sample_image

EXPORT_METHODS = ("tracing",)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", choices=sorted(EXPORT_FORMATS), default="onnx")
    parser.add_argument(
        "--export-method",
        choices=EXPORT_METHODS,
        default="tracing",
        help="tracing (the graph keeps image sizes symbolic; scripting is not supported: "
        "Detectron2's Instances-based decoding is not scriptable)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for model.<ext>")
    parser.add_argument(
        "--sample-image",
        metavar="FILE",
        help="image to trace with (default: a built-in synthetic image); any size works",
    )
    parser.add_argument(
        "--run-eval",
        action="store_true",
        help="evaluate the exported model on DATASETS.TEST with COCOEvaluator and print the AP",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs (e.g. MODEL.WEIGHTS ...)"
    )
    return parser


def evaluate_exported(exported: ExportedModel, cfg, output_dir: Path) -> Dict[str, dict]:
    """COCO evaluation of ``exported`` on every dataset of ``cfg.DATASETS.TEST``."""
    results = {}
    for name in cfg.DATASETS.TEST:
        loader = build_detection_test_loader(cfg, name)
        evaluator = COCOEvaluator(name, output_dir=str(output_dir / "eval" / name))
        results[name] = inference_on_dataset(exported.inference_on_batch, loader, evaluator)
        print(f"Exported model ({exported.backend}, {exported.path}) on {name}:")
        print_csv_format(results[name])
    return results


def main(argv: Optional[List[str]] = None) -> Dict[str, dict]:
    """Export; returns ``{dataset name: COCO results}`` with --run-eval, else ``{}``."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    setup_logger(name="musu")
    setup_logger(name="detectron2")
    cfg = musu.build_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        parser.error("no weights: add MODEL.WEIGHTS path/to/model_final.pth (or musu://name)")
    if args.run_eval and not cfg.DATASETS.TEST:
        parser.error("--run-eval: the config has no DATASETS.TEST")

    model = build_model(cfg)
    musu.engine.AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)  # runs no code from the file
    model.eval()
    sample = None
    if args.sample_image:
        if not Path(args.sample_image).is_file():
            parser.error(f"--sample-image {args.sample_image}: no such file")
        sample = sample_image(cfg, read_image(args.sample_image, format="BGR"))
    output_dir = Path(args.output)
    path = export_model(model, cfg, args.format, output_dir, sample=sample)
    print(f"Exported {cfg.MODEL.META_ARCHITECTURE} ({args.export_method}) to {path}")
    if not args.run_eval:
        return {}
    return evaluate_exported(
        ExportedModel(path, cfg, num_threads=torch.get_num_threads()), cfg, output_dir
    )


if __name__ == "__main__":
    main()
    sys.exit(0)
