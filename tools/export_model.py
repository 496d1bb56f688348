#!/usr/bin/env python
"""Export a trained dense detector (MuSu with any A, D2FCOS, the projects' RetinaNet-style
detectors) to TorchScript or ONNX, optionally quantize the ONNX file to int8, and optionally
evaluate the exported files on DATASETS.TEST.

    python tools/export_model.py --config-file configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml \
        --format onnx --output exported --run-eval \
        MODEL.WEIGHTS output/synthetic/musu_paper_R_18_FPN_1200it/model_final.pth

writes exported/model.onnx (or model.ts with --format torchscript). With
``--quantize int8 --calibration-dataset NAME --calibration-images N`` it also writes
exported/model_int8.onnx: ONNX Runtime static quantization (QDQ, per-channel int8 weights),
calibrated on N images of the registered dataset NAME; the decoding and NMS stay float32
(docs/DEPLOY.md). --run-eval prints the COCO AP of every file written, run through
musu.export.ExportedModel on the test loader's images.
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
from musu.cli import output_folder, parse_tool_args, positive_int, tool_argument_parser
from musu.data.cli import register_coco_datasets
from musu.engine import AtomicCheckpointer
from musu.export import EXPORT_FORMATS, ExportedModel, export_model, sample_image
from musu.export.quantization import (
    ALWAYS_FLOAT_LAYERS,
    CALIBRATION_METHODS,
    DEFAULT_FLOAT_LAYERS,
    UnknownLayerError,
    calibration_images,
    parse_layer_list,
    quantize_onnx,
)

EXPORT_METHODS = ("tracing",)
QUANTIZED_SUFFIX = {"int8": "_int8"}
DEFAULT_CALIBRATION_IMAGES = 64


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (musu.cli convention: --config-file, --register-coco,
    trailing KEY VALUE overrides)."""
    parser = tool_argument_parser(__doc__)
    parser.add_argument("--format", choices=sorted(EXPORT_FORMATS), default="onnx")
    parser.add_argument(
        "--export-method",
        choices=EXPORT_METHODS,
        default="tracing",
        help="tracing (the graph keeps image sizes symbolic; scripting is not supported: "
        "Detectron2's Instances-based decoding is not scriptable)",
    )
    parser.add_argument(
        "--output", required=True, type=output_folder, metavar="DIR", help="folder for model.<ext>"
    )
    parser.add_argument(
        "--sample-image",
        metavar="FILE",
        help="image to trace with (default: a built-in synthetic image); any size works",
    )
    parser.add_argument(
        "--run-eval",
        action="store_true",
        help="evaluate each exported file on DATASETS.TEST with COCOEvaluator and print the AP",
    )
    quantization = parser.add_argument_group("int8 quantization (--format onnx)")
    quantization.add_argument(
        "--quantize",
        choices=sorted(QUANTIZED_SUFFIX),
        help="also write model_int8.onnx: ONNX Runtime static quantization, QDQ, per-channel "
        "weights; needs --calibration-dataset",
    )
    quantization.add_argument(
        "--calibration-dataset",
        metavar="NAME",
        help="registered dataset whose images calibrate the activation ranges (e.g. "
        "musu_synthetic_train, bccd_train, or a --register-coco name); a training split",
    )
    quantization.add_argument(
        "--calibration-images",
        type=positive_int,
        default=DEFAULT_CALIBRATION_IMAGES,
        metavar="N",
        help="number of calibration images, evenly spaced over the dataset "
        f"(default {DEFAULT_CALIBRATION_IMAGES})",
    )
    quantization.add_argument(
        "--calibration-method",
        choices=CALIBRATION_METHODS,
        default="minmax",
        help="how activation ranges are read off the calibration images (default minmax)",
    )
    quantization.add_argument(
        "--reduce-range",
        action="store_true",
        help="7-bit weights: on CPUs without VNNI (AVX2, AVX512F) ONNX Runtime's 8-bit "
        "multiply-add can saturate 16-bit sums; this avoids it (docs/DEPLOY.md)",
    )
    quantization.add_argument(
        "--float-layers",
        type=parse_layer_list,
        default=list(DEFAULT_FLOAT_LAYERS),
        metavar="LAYER[,LAYER...]",
        help="comma-separated module names kept in float32, e.g. head.bbox_pred,head.cls_score "
        f"('' for none; default: {','.join(DEFAULT_FLOAT_LAYERS) or 'none'}; "
        f"{','.join(ALWAYS_FLOAT_LAYERS)} always)",
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Argument combinations argparse cannot check; ``parser.error`` names the argument."""
    if args.quantize:
        if args.format != "onnx":
            parser.error(f"--quantize {args.quantize} needs --format onnx, got {args.format}")
        if not args.calibration_dataset:
            parser.error(
                f"--quantize {args.quantize} needs --calibration-dataset NAME (a registered "
                "dataset, e.g. the training split) to calibrate the activation ranges"
            )
    elif args.calibration_dataset:
        parser.error("--calibration-dataset is only used with --quantize int8")
    if args.sample_image and not Path(args.sample_image).is_file():
        parser.error(f"--sample-image {args.sample_image}: no such file")


def evaluate_exported(exported: ExportedModel, cfg, output_dir: Path) -> Dict[str, dict]:
    """COCO evaluation of ``exported`` on every dataset of ``cfg.DATASETS.TEST``."""
    results = {}
    for name in cfg.DATASETS.TEST:
        loader = build_detection_test_loader(cfg, name)
        evaluator = COCOEvaluator(
            name, output_dir=str(output_dir / "eval" / exported.path.stem / name)
        )
        results[name] = inference_on_dataset(exported.inference_on_batch, loader, evaluator)
        print(f"Exported model ({exported.backend}, {exported.path}) on {name}:")
        print_csv_format(results[name])
    return results


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, dict]]:
    """Export; returns ``{file name: {dataset name: COCO results}}`` with --run-eval (one entry
    per file written: model.onnx and model_int8.onnx with --quantize int8), else ``{}``."""
    parser = build_parser()
    args = parse_tool_args(parser, argv)
    check_args(parser, args)
    setup_logger(name="musu")
    setup_logger(name="detectron2")
    register_coco_datasets(args.register_coco)
    cfg = musu.build_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        parser.error("no weights: add MODEL.WEIGHTS path/to/model_final.pth (or musu://name)")
    if args.run_eval and not cfg.DATASETS.TEST:
        parser.error("--run-eval: the config has no DATASETS.TEST")

    model = build_model(cfg)
    AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    sample = None
    if args.sample_image:
        sample = sample_image(cfg, read_image(args.sample_image, format="BGR"))
    output_dir = Path(args.output)
    paths = [export_model(model, cfg, args.format, output_dir, sample=sample)]
    print(f"Exported {cfg.MODEL.META_ARCHITECTURE} ({args.export_method}) to {paths[0]}")
    if args.quantize:
        try:
            images = calibration_images(cfg, args.calibration_dataset, args.calibration_images)
            quantized = output_dir / f"{paths[0].stem}{QUANTIZED_SUFFIX[args.quantize]}.onnx"
            paths.append(
                quantize_onnx(
                    paths[0],
                    quantized,
                    images,
                    float_layers=args.float_layers,
                    method=args.calibration_method,
                    reduce_range=args.reduce_range,
                )
            )
        except KeyError as error:
            parser.error(f"--calibration-dataset: {error.args[0]}")
        except UnknownLayerError as error:
            parser.error(f"--float-layers: {error}")
        print(
            f"Quantized to {args.quantize}: {paths[1]} (calibration: {len(images)} images of "
            f"{args.calibration_dataset}, {args.calibration_method}; float layers: "
            f"{' '.join([*args.float_layers, *ALWAYS_FLOAT_LAYERS])})"
        )
    if not args.run_eval:
        return {}
    return {
        path.name: evaluate_exported(
            ExportedModel(path, cfg, num_threads=torch.get_num_threads()), cfg, output_dir
        )
        for path in paths
    }


if __name__ == "__main__":
    main()
    sys.exit(0)
