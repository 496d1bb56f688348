#!/usr/bin/env python
"""Which classes a detector confuses, what it misses, and where its precision drops.

Inputs, either
  --results FILE                  COCO results (e.g. <OUTPUT_DIR>/inference/<dataset>/
                                  coco_instances_results.json of train_net.py, or demo.py's
                                  --json-out with --register-coco), with the ground truth of
                                  --gt-json FILE or --dataset NAME; or
  --config-file CFG --dataset NAME MODEL.WEIGHTS W   run the model on the dataset first
                                  (Detectron2's COCOEvaluator; its results file goes to --output)
  --register-coco NAME JSON IMAGES  your own COCO-format dataset (then --dataset NAME)
Outputs (in --output DIR):
  confusion_matrix.png   (C + 1) x (C + 1) counts, rows true class, columns predicted class,
                         the last row/column background (false positives / missed objects)
  errors.md              the same matrix and per-class precision / recall as Markdown tables
  pr_curves.png          per-class precision/recall curves at --iou-threshold from pycocotools'
                         COCOeval, with their AP (errors.md lists it: COCOEvaluator's number)
The confusion matrix's matching rule is in musu/evaluation/errors.py.

    python tools/analyze_errors.py --dataset musu_synthetic_val --output errors_out \\
        --results output/musu_R_18_FPN_synthetic/inference/musu_synthetic_val/coco_instances_results.json
"""

from __future__ import annotations

import argparse
import os
import sys

from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import musu
from musu.cli import output_folder, parse_tool_args, probability, tool_argument_parser
from musu.data import ensure_dataset, register_coco_datasets
from musu.evaluation import (
    average_precision_markdown,
    confusion_matrix,
    errors_markdown,
    load_coco_results,
    plot_confusion_matrix,
    plot_pr_curves,
    pr_curves,
)


def build_parser() -> argparse.ArgumentParser:
    """The command line (:mod:`musu.cli`'s convention; ``--config-file`` only to run a model)."""
    parser = tool_argument_parser(__doc__, config_required=False)
    parser.add_argument("--results", metavar="FILE", help="COCO results JSON to analyze")
    parser.add_argument("--gt-json", metavar="FILE", help="COCO ground truth of --results")
    parser.add_argument("--dataset", metavar="NAME", help="registered or built-in dataset")
    parser.add_argument(
        "--output", required=True, type=output_folder, metavar="DIR", help="folder for outputs"
    )
    parser.add_argument("--score-threshold", type=probability, default=0.3, help="default 0.3")
    parser.add_argument("--iou-threshold", type=probability, default=0.5, help="default 0.5")
    return parser


def run_model(config_file: str, opts: list[str], dataset: str, output: str) -> str:
    """Evaluate the config's model on ``dataset`` with COCOEvaluator; its results file."""
    cfg = musu.build_config(config_file, opts)
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("--config-file needs weights: MODEL.WEIGHTS path/to/model.pth (last)")
    model = build_model(cfg)
    musu.engine.AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)  # runs no code from the file
    model.eval()
    evaluator = COCOEvaluator(dataset, tasks=("bbox",), output_dir=output)
    inference_on_dataset(model, build_detection_test_loader(cfg, dataset), evaluator)
    return os.path.join(output, "coco_instances_results.json")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_tool_args(parser, argv)
    if bool(args.results) == bool(args.config_file):
        parser.error("give either --results FILE or --config-file CFG (to run the model)")
    if args.config_file and not args.dataset:
        parser.error("--config-file needs --dataset NAME (the data to run the model on)")
    if args.results and not (args.gt_json or args.dataset):
        parser.error("--results needs its ground truth: --gt-json FILE or --dataset NAME")
    setup_logger(name="detectron2")  # inference_on_dataset's progress lines
    register_coco_datasets(args.register_coco)
    os.makedirs(args.output, exist_ok=True)
    gt_json = args.gt_json or ensure_dataset(args.dataset)[0]
    results = args.results or run_model(args.config_file, args.opts, args.dataset, args.output)

    names, images = load_coco_results(gt_json, results)
    matrix = confusion_matrix(images, len(names), args.score_threshold, args.iou_threshold)
    curves = pr_curves(gt_json, results, args.iou_threshold)
    table = errors_markdown(matrix, names, args.score_threshold, args.iou_threshold)
    table += "\nAverage precision (pycocotools COCOeval, as COCOEvaluator computes it):\n\n"
    table += average_precision_markdown(curves, names, args.iou_threshold)
    title = f"{os.path.basename(results)}: score >= {args.score_threshold:g}"
    title += f", IoU >= {args.iou_threshold:g}"
    outputs = {
        "confusion_matrix.png": lambda p: plot_confusion_matrix(matrix, names, p, title),
        "pr_curves.png": lambda p: plot_pr_curves(
            curves, names, p, f"IoU >= {args.iou_threshold:g}"
        ),
    }
    for file_name, write in outputs.items():
        write(os.path.join(args.output, file_name))
    with open(os.path.join(args.output, "errors.md"), "w") as f:
        f.write(f"# Errors of {results}\n\nGround truth: {gt_json} ({len(images)} images).\n\n")
        f.write(table)
    print(table)
    print(f"Wrote confusion_matrix.png, pr_curves.png and errors.md to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
