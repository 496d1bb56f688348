#!/usr/bin/env python
"""Run a trained detector on images and write pictures with the detections drawn.

    python tools/demo.py --config-file configs/Synthetic/musu_R_18_FPN_synthetic.yaml \
        --input path/to/images_or_folder --output demo_out \
        --opts MODEL.WEIGHTS output/musu_R_18_FPN_synthetic/model_final.pth
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path
from typing import List

import cv2
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

import musu

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(inputs: List[str]) -> List[str]:
    """Expand files, folders and glob patterns into a sorted list of image paths."""
    paths: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            paths += [
                str(p) for p in sorted(Path(item).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
            ]
        else:
            matches = sorted(glob.glob(os.path.expanduser(item)))
            if not matches:
                raise FileNotFoundError(f"--input {item!r}: no such file, folder or pattern")
            paths += matches
    return paths


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--input", nargs="+", required=True, help="images, folders or glob patterns"
    )
    parser.add_argument("--output", required=True, help="folder for the drawn pictures")
    parser.add_argument("--confidence-threshold", type=float, default=0.3)
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config KEY VALUE pairs"
    )
    args = parser.parse_args(argv)

    cfg = musu.build_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        parser.error(
            "no weights: pass --opts MODEL.WEIGHTS path/to/model_final.pth (or musu://name)"
        )
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    os.makedirs(args.output, exist_ok=True)
    for path in list_images(args.input):
        image = read_image(path, format="BGR")
        instances = predictor(image)["instances"].to("cpu")
        instances = instances[instances.scores >= args.confidence_threshold]
        drawn = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances)
        target = os.path.join(args.output, Path(path).stem + ".jpg")
        cv2.imwrite(target, drawn.get_image()[:, :, ::-1])
        print(f"{path}: {len(instances)} detections -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
