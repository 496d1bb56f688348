#!/usr/bin/env python
"""Per-image CPU latency of one detector run four ways: eager PyTorch (Detectron2's
DefaultPredictor), the exported TorchScript file, the exported ONNX file in ONNX Runtime, and
its int8 quantization in ONNX Runtime (the last three through musu.export.ExportedModel), at
each --threads count.

    python tools/benchmarks/export_latency.py           # synthetic paper-settings config, 1 and 2 threads
    python tools/benchmarks/export_latency.py --weights output/synthetic/musu_paper_R_18_FPN_1200it/model_final.pth

A latency is the whole call on an original BGR image: resize, model, NMS, rescaling to the image.
The timed images are the synthetic data's (musu.data.synthetic.render_image, 256 px), or the
first --images images of --dataset. Without --weights the model is randomly initialized (seed 0)
and --score-thresh (default 0.005 then) is low enough that it still outputs detections. The int8
file is calibrated on --calibration-images images of --calibration-dataset (the same
quantization as tools/export_model.py --quantize int8). Timings are interleaved (common.py);
ratios are medians of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
from common import (
    command_line,
    environment_summary,
    interleaved_timings,
    markdown_table,
    paired_ratio,
    quiet_warnings,
)
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image

import musu
from musu.cli import (
    non_negative_int,
    parse_tool_args,
    positive_int,
    probability,
    tool_argument_parser,
)
from musu.data.cli import register_coco_datasets
from musu.data.synthetic import render_image
from musu.export import ExportedModel, calibration_images, export_model, quantize_onnx
from musu.export.quantization import DEFAULT_FLOAT_LAYERS, parse_layer_list

SYNTHETIC = "configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml"
RUNTIMES = ("eager", "torchscript", "onnxruntime", "onnxruntime_int8")


def build_parser() -> argparse.ArgumentParser:
    """The command line (musu.cli convention; --config-file defaults to the synthetic paper-settings config)."""
    parser = tool_argument_parser(__doc__.split("\n\n")[0], config_required=False)
    parser.set_defaults(config_file=SYNTHETIC)
    parser.add_argument("--weights", default="", help="checkpoint (default: random init, seed 0)")
    parser.add_argument("--score-thresh", type=probability, default=None)
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=positive_int, default=8, help="images per timed call")
    parser.add_argument(
        "--dataset",
        metavar="NAME",
        help="registered dataset whose first --images images are timed (default: synthetic "
        "images rendered at INPUT.MIN_SIZE_TEST)",
    )
    parser.add_argument(
        "--iters", type=positive_int, default=10, help="timed repeats per thread count"
    )
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument(
        "--calibration-dataset",
        default="musu_synthetic_train",
        metavar="NAME",
        help="registered dataset that calibrates the int8 model (default musu_synthetic_train)",
    )
    parser.add_argument(
        "--calibration-images", type=positive_int, default=16, metavar="N", help="default 16"
    )
    parser.add_argument(
        "--float-layers",
        type=parse_layer_list,
        default=list(DEFAULT_FLOAT_LAYERS),
        metavar="LAYER[,LAYER...]",
        help="layers the int8 model keeps in float32 (as tools/export_model.py)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows here")
    return parser


def _timed_images(cfg, args) -> List:
    size = int(cfg.INPUT.MIN_SIZE_TEST)
    if args.dataset is None:
        return [render_image(seed=7, index=i, image_size=size)[0] for i in range(args.images)]
    records = DatasetCatalog.get(args.dataset)[: args.images]
    return [read_image(r["file_name"], format="BGR") for r in records]


def main(argv: Optional[List[str]] = None) -> List[Dict[str, object]]:
    parser = build_parser()
    args = parse_tool_args(parser, argv)
    quiet_warnings()
    register_coco_datasets(args.register_coco)
    for option in ("dataset", "calibration_dataset"):
        name = getattr(args, option)
        if name is not None and name not in DatasetCatalog.list():
            parser.error(f"--{option.replace('_', '-')} {name}: no such registered dataset")
    score_thresh = args.score_thresh
    if score_thresh is None and not args.weights:
        score_thresh = 0.005
    opts = ["MODEL.WEIGHTS", args.weights, "MODEL.DEVICE", "cpu", *args.opts]
    if score_thresh is not None:
        opts += ["MODEL.MUSU.SCORE_THRESH_TEST", str(score_thresh)]
    cfg = musu.build_config(args.config_file, opts)
    torch.manual_seed(0)
    predictor = musu.model_zoo.Predictor(cfg)  # DefaultPredictor, weights read safely
    images = _timed_images(cfg, args)

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = {f: export_model(predictor.model, cfg, f, folder) for f in ("torchscript", "onnx")}
        paths["onnx_int8"] = quantize_onnx(
            paths["onnx"],
            Path(folder) / "model_int8.onnx",
            calibration_images(cfg, args.calibration_dataset, args.calibration_images),
            float_layers=args.float_layers,
        )
        for threads in args.threads:
            torch.set_num_threads(threads)
            runners = {
                "eager": predictor,
                "torchscript": ExportedModel(paths["torchscript"], cfg),
                "onnxruntime": ExportedModel(paths["onnx"], cfg, num_threads=threads),
                "onnxruntime_int8": ExportedModel(paths["onnx_int8"], cfg, num_threads=threads),
            }
            detections = {
                name: sum(len(_instances(run(image))) for image in images)
                for name, run in runners.items()
            }
            calls = {name: _loop(run, images) for name, run in runners.items()}
            times = interleaved_timings(calls, args.iters, args.warmup, torch.device("cpu"))
            ms = {name: 1000 * statistics.median(t) / len(images) for name, t in times.items()}
            rows.append(
                {
                    "threads": threads,
                    **{f"{name}_ms": round(value, 2) for name, value in ms.items()},
                    "eager/torchscript": round(
                        paired_ratio(times["eager"], times["torchscript"]), 2
                    ),
                    "eager/onnxruntime": round(
                        paired_ratio(times["eager"], times["onnxruntime"]), 2
                    ),
                    "onnxruntime/onnxruntime_int8": round(
                        paired_ratio(times["onnxruntime"], times["onnxruntime_int8"]), 2
                    ),
                    "detections_per_image": round(detections["eager"] / len(images), 1),
                    "int8_detections_per_image": round(
                        detections["onnxruntime_int8"] / len(images), 1
                    ),
                    "same_detection_counts": len(
                        {detections[name] for name in ("eager", "torchscript", "onnxruntime")}
                    )
                    == 1,
                }
            )

    weights = args.weights or "random init (seed 0)"
    sizes = sorted({f"{image.shape[0]}x{image.shape[1]}" for image in images})
    print(f"Model: {cfg.MODEL.META_ARCHITECTURE}, {args.config_file}, weights {weights}, ", end="")
    print(
        f"score threshold {cfg.MODEL.MUSU.SCORE_THRESH_TEST}; {len(images)} images "
        f"({args.dataset or 'synthetic'}, {', '.join(sizes)} px, resized to "
        f"{cfg.INPUT.MIN_SIZE_TEST}); int8 calibrated on {args.calibration_images} images of "
        f"{args.calibration_dataset}"
    )
    headers = ["threads", "eager ms", "TorchScript ms", "ONNX Runtime ms", "ORT int8 ms"]
    headers += ["eager / TorchScript", "eager / ONNX Runtime", "ORT fp32 / ORT int8"]
    headers += ["detections / image", "int8 detections / image"]
    table = [
        [
            r["threads"],
            f"{r['eager_ms']:.1f}",
            f"{r['torchscript_ms']:.1f}",
            f"{r['onnxruntime_ms']:.1f}",
            f"{r['onnxruntime_int8_ms']:.1f}",
            f"{r['eager/torchscript']:.2f}x",
            f"{r['eager/onnxruntime']:.2f}x",
            f"{r['onnxruntime/onnxruntime_int8']:.2f}x",
            r["detections_per_image"],
            r["int8_detections_per_image"],
        ]
        for r in rows
    ]
    print(markdown_table(headers, table))
    print(f"\nEnvironment: {environment_summary(torch.device('cpu'))}")
    print(f"Command: `{command_line()}`")
    if args.json:
        payload = {
            "command": command_line(),
            "environment": environment_summary(torch.device("cpu")),
        }
        Path(args.json).write_text(json.dumps({**payload, "rows": rows}, indent=1))
    return rows


def _instances(output):
    return output["instances"] if isinstance(output, dict) else output


def _loop(run, images):
    def call() -> None:
        for image in images:
            run(image)

    return call


if __name__ == "__main__":
    main()
