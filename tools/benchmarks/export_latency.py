#!/usr/bin/env python
"""Per-image CPU latency of one detector run three ways: eager PyTorch (Detectron2's
DefaultPredictor), the exported TorchScript file and the exported ONNX file in ONNX Runtime
(both through musu.export.ExportedModel), at each --threads count.

    python tools/benchmarks/export_latency.py                       # Quick start config, 1 and 2 threads
    python tools/benchmarks/export_latency.py --weights output/musu_R_18_FPN_synthetic/model_final.pth

A latency is the whole call on an original BGR image: resize, model, NMS, rescaling to the image.
The images are the Quick start data's (musu.data.synthetic.render_image, 256 px). Without
--weights the model is randomly initialized (seed 0) and --score-thresh (default 0.005 then) is
low enough that it still outputs detections. Timings are interleaved (common.py); ratios are
medians of per-repeat ratios.
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

import musu
from musu.data.synthetic import render_image
from musu.export import ExportedModel, export_model

SYNTHETIC = "configs/Synthetic/musu_R_18_FPN_synthetic.yaml"


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=SYNTHETIC, metavar="FILE")
    parser.add_argument("--weights", default="", help="checkpoint (default: random init, seed 0)")
    parser.add_argument("--score-thresh", type=float, default=None)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=8, help="images per timed call")
    parser.add_argument("--iters", type=int, default=10, help="timed repeats per thread count")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", metavar="FILE", help="also write the rows here")
    return parser


def main(argv: Optional[List[str]] = None) -> List[Dict[str, object]]:
    args = argument_parser().parse_args(argv)
    quiet_warnings()
    score_thresh = args.score_thresh
    if score_thresh is None and not args.weights:
        score_thresh = 0.005
    opts = ["MODEL.WEIGHTS", args.weights, "MODEL.DEVICE", "cpu"]
    if score_thresh is not None:
        opts += ["MODEL.MUSU.SCORE_THRESH_TEST", str(score_thresh)]
    cfg = musu.build_config(args.config, opts)
    torch.manual_seed(0)
    predictor = musu.model_zoo.Predictor(cfg)  # DefaultPredictor, weights read safely
    size = int(cfg.INPUT.MIN_SIZE_TEST)
    images = [render_image(seed=7, index=i, image_size=size)[0] for i in range(args.images)]

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = {f: export_model(predictor.model, cfg, f, folder) for f in ("torchscript", "onnx")}
        for threads in args.threads:
            torch.set_num_threads(threads)
            runners = {
                "eager": predictor,
                "torchscript": ExportedModel(paths["torchscript"], cfg),
                "onnxruntime": ExportedModel(paths["onnx"], cfg, num_threads=threads),
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
                    "detections_per_image": round(detections["eager"] / len(images), 1),
                    "same_detection_counts": len(set(detections.values())) == 1,
                }
            )

    weights = args.weights or "random init (seed 0)"
    print(f"Model: {cfg.MODEL.META_ARCHITECTURE}, {args.config}, weights {weights}, ", end="")
    print(f"score threshold {cfg.MODEL.MUSU.SCORE_THRESH_TEST}; {args.images} images of {size} px")
    headers = ["threads", "eager ms", "TorchScript ms", "ONNX Runtime ms"]
    headers += ["eager / TorchScript", "eager / ONNX Runtime", "detections / image"]
    table = [
        [
            r["threads"],
            f"{r['eager_ms']:.1f}",
            f"{r['torchscript_ms']:.1f}",
            f"{r['onnxruntime_ms']:.1f}",
            f"{r['eager/torchscript']:.2f}x",
            f"{r['eager/onnxruntime']:.2f}x",
            r["detections_per_image"],
        ]
        for r in rows
    ]
    print(markdown_table(headers, table))
    print(f"\n{environment_summary(torch.device('cpu'))}")
    print(f"Command: `{command_line()}`")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command_line(), "rows": rows}, indent=1))
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
