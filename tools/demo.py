#!/usr/bin/env python
"""Run a trained detector (any musu or project config) on images, a video or a webcam.

Inputs (one of):
  --input PATH...      image files, folders (their images) or glob patterns
  --video-input FILE   a video file (anything OpenCV's FFmpeg backend reads)
  --webcam             camera 0, until Ctrl-C or --max-frames (needs a camera)
Outputs:
  --output DIR         images: DIR/<image stem>.jpg with the detections drawn;
                       video / webcam: DIR/<video stem>.mp4 / DIR/webcam.mp4, every frame drawn
  --json-out FILE      all detections as COCO results (image_id, category_id, bbox XYWH, score,
                       plus file_name); with --register-coco, image and category ids are the
                       dataset's own, so the file evaluates against its JSON
                       (tools/analyze_errors.py --results FILE)
Class names come from the first --register-coco dataset, else from DATASETS.TEST[0].

    python tools/demo.py --config-file configs/Synthetic/musu_R_18_FPN_synthetic.yaml \\
        --input path/to/images_or_folder --output demo_out --json-out demo_out/results.json \\
        --opts MODEL.WEIGHTS output/musu_R_18_FPN_synthetic/model_final.pth
    python tools/demo.py --config-file <config> --video-input clip.mp4 --output demo_out \\
        --register-coco mydata ann.json images/ --opts MODEL.WEIGHTS <weights>
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer

import musu
from musu.cli import output_folder, parse_tool_args, positive_int, probability, tool_argument_parser
from musu.data import register_coco_datasets
from musu.export import ExportedModel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(inputs: list[str]) -> list[str]:
    """Expand files, folders and glob patterns into a list of image paths (folders sorted)."""
    paths: list[str] = []
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
    if not paths:
        raise FileNotFoundError(f"--input {' '.join(inputs)}: no images found")
    return paths


def coco_results(
    instances: Instances,
    image_id: int | str,
    file_name: str,
    contiguous_to_dataset_id: dict[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Detections of one image as COCO result records (``bbox`` in XYWH pixels); category ids
    are mapped back to the dataset's ids when ``contiguous_to_dataset_id`` is given."""
    boxes = instances.pred_boxes.tensor.numpy().astype(float)
    records = []
    for (x0, y0, x1, y1), score, label in zip(
        boxes, instances.scores.tolist(), instances.pred_classes.tolist()
    ):
        category = contiguous_to_dataset_id[label] if contiguous_to_dataset_id else label
        records.append(
            {
                "image_id": image_id,
                "file_name": file_name,
                "category_id": int(category),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "score": float(score),
            }
        )
    return records


def video_frames(capture: cv2.VideoCapture, max_frames: int | None) -> Iterator[np.ndarray]:
    """BGR frames of an opened capture, at most ``max_frames`` (all if None)."""
    count = 0
    while max_frames is None or count < max_frames:
        ok, frame = capture.read()
        if not ok:
            return
        count += 1
        yield frame


def build_parser() -> argparse.ArgumentParser:
    """The command line (:mod:`musu.cli`'s convention)."""
    parser = tool_argument_parser(__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="images, folders or glob patterns")
    source.add_argument("--video-input", metavar="FILE", help="a video file")
    source.add_argument("--webcam", action="store_true", help="camera 0 (OpenCV)")
    parser.add_argument(
        "--output", required=True, type=output_folder, metavar="DIR", help="folder for output"
    )
    parser.add_argument("--json-out", metavar="FILE", help="write COCO-format detections here")
    parser.add_argument(
        "--confidence-threshold",
        type=probability,
        default=0.3,
        help="draw and save only detections scoring at least this (default 0.3)",
    )
    parser.add_argument(
        "--progress-every",
        type=positive_int,
        default=10,
        metavar="N",
        help="print a progress line every N images or frames (default 10)",
    )
    parser.add_argument(
        "--max-frames", type=positive_int, help="stop a video or webcam after N frames"
    )
    parser.add_argument(
        "--exported",
        metavar="FILE",
        help="run this .onnx (ONNX Runtime) or .ts (TorchScript) file from tools/export_model.py "
        "instead of the PyTorch model; --config-file is the config it was exported from",
    )
    return parser


def _metadata_source(args, cfg) -> tuple[Any, dict[str, int]]:
    """Metadata for class names, and file name -> image id of the first registered dataset."""
    ids: dict[str, int] = {}
    if args.register_coco:
        register_coco_datasets(args.register_coco)
        name = args.register_coco[0][0]
        for record in DatasetCatalog.get(name):  # also fills thing_classes from the JSON
            ids[os.path.basename(record["file_name"])] = record["image_id"]
        return MetadataCatalog.get(name), ids
    return MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused"), ids


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_tool_args(parser, argv)
    cfg = musu.build_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS and not args.exported:
        parser.error(
            "no weights: pass --opts MODEL.WEIGHTS path/to/model_final.pth (or musu://name), "
            "or --exported FILE"
        )
    metadata, image_ids = _metadata_source(args, cfg)
    if args.exported:
        exported = ExportedModel(args.exported, cfg)
        detect = exported
        num_classes = cfg.MODEL.MUSU.NUM_CLASSES if "MUSU" in cfg.MODEL else None
    else:
        predictor = musu.model_zoo.Predictor(cfg)  # weights read without running code
        detect = lambda image: predictor(image)["instances"]  # noqa: E731
        num_classes = getattr(predictor.model, "num_classes", None)
    names = metadata.get("thing_classes", None)
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise ValueError(
            f"the model predicts {num_classes} classes but {metadata.name!r} names {len(names)} "
            f"({names}): set the config's NUM_CLASSES or register the matching dataset"
        )
    id_map = metadata.get("thing_dataset_id_to_contiguous_id", None)
    to_dataset_id = {v: k for k, v in id_map.items()} if id_map else None
    os.makedirs(args.output, exist_ok=True)
    results: list[dict[str, Any]] = []
    started = time.perf_counter()

    def predict(image: np.ndarray) -> tuple[Instances, np.ndarray]:
        instances = detect(image).to("cpu")
        instances = instances[instances.scores >= args.confidence_threshold]
        drawn = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances)
        return instances, drawn.get_image()[:, :, ::-1]

    def progress(done: int, total: int | None, what: str, count: int) -> None:
        if done % args.progress_every == 0 or done == total:
            rate = (time.perf_counter() - started) / done
            of = f"/{total}" if total else ""
            print(f"[{done}{of}] {what}: {count} detections ({rate:.2f} s/image)", flush=True)

    if args.input:
        paths = list_images(args.input)
        for done, path in enumerate(paths, 1):
            instances, drawn = predict(read_image(path, format="BGR"))
            target = os.path.join(args.output, Path(path).stem + ".jpg")
            cv2.imwrite(target, drawn)
            base = os.path.basename(path)
            results += coco_results(instances, image_ids.get(base, done - 1), base, to_dataset_id)
            progress(done, len(paths), f"{path} -> {target}", len(instances))
    else:
        if args.webcam:
            capture, stem = cv2.VideoCapture(0), "webcam"
            if not capture.isOpened():
                raise SystemExit(
                    "--webcam: no camera could be opened (OpenCV VideoCapture(0) failed); "
                    "connect a camera or use --video-input FILE"
                )
        else:
            if not os.path.isfile(args.video_input):
                raise FileNotFoundError(f"--video-input {args.video_input!r}: no such file")
            capture, stem = cv2.VideoCapture(args.video_input), Path(args.video_input).stem
            if not capture.isOpened():
                raise ValueError(f"--video-input {args.video_input!r}: OpenCV cannot read it")
        fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if not args.webcam else None
        if total and args.max_frames:
            total = min(total, args.max_frames)
        target = os.path.join(args.output, stem + ".mp4")
        writer = None
        done = 0
        try:
            for done, frame in enumerate(video_frames(capture, args.max_frames), 1):
                instances, drawn = predict(frame)
                if writer is None:
                    height, width = drawn.shape[:2]
                    fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                    writer = cv2.VideoWriter(target, fourcc, fps, (width, height))
                    if not writer.isOpened():
                        raise RuntimeError(f"OpenCV cannot write {target} (codec mp4v)")
                writer.write(np.ascontiguousarray(drawn))
                name = f"{stem}#{done - 1}"
                results += coco_results(instances, done - 1, name, to_dataset_id)
                progress(done, total or None, f"frame {done - 1}", len(instances))
        except KeyboardInterrupt:
            print(f"Stopped after {done} frames.")
        finally:
            capture.release()
            if writer is not None:
                writer.release()
        if done == 0:
            raise ValueError(f"{args.video_input or 'webcam'}: no frame could be read")
        print(f"{done} frames -> {target}")
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(results, f)
        print(f"{len(results)} detections -> {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
