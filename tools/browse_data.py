#!/usr/bin/env python
"""Look at a dataset's annotations as stored, and as the training loader feeds them to the model.

Inputs:
  --config-file CFG      any musu or project config (its INPUT.* augmentation, DATALOADER.*)
  --dataset NAME         a built-in or registered dataset (default: DATASETS.TRAIN[0])
  --register-coco NAME JSON IMAGES   your own COCO-format dataset (then --dataset NAME)
  --source               annotation (the stored boxes on the original image), dataloader (the
                         training loader's output: resized, flipped, boxes transformed; images
                         without objects dropped when DATALOADER.FILTER_EMPTY_ANNOTATIONS) or
                         both (default)
Outputs:
  DIR/annotation/<image stem>.jpg and DIR/dataloader/<NNNN>_<image stem>.jpg (--output DIR),
  at most --num-images of each; a progress line every --progress-every pictures.

    python tools/browse_data.py --config-file configs/Synthetic/musu_R_18_FPN_synthetic.yaml \\
        --output browse_out --num-images 8
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import cv2
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.data.detection_utils import convert_image_to_rgb, read_image
from detectron2.utils.visualizer import Visualizer

import musu
from musu.cli import output_folder, parse_tool_args, positive_int, tool_argument_parser
from musu.data import register_coco_datasets


def build_parser() -> argparse.ArgumentParser:
    """The command line (:mod:`musu.cli`'s convention)."""
    parser = tool_argument_parser(__doc__)
    parser.add_argument("--dataset", metavar="NAME", help="default: DATASETS.TRAIN[0]")
    parser.add_argument("--source", choices=["annotation", "dataloader", "both"], default="both")
    parser.add_argument(
        "--output", required=True, type=output_folder, metavar="DIR", help="folder for pictures"
    )
    parser.add_argument(
        "--num-images", type=positive_int, default=20, help="per source (default 20)"
    )
    parser.add_argument("--progress-every", type=positive_int, default=10, metavar="N")
    return parser


def _write(path: str, rgb) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, rgb[:, :, ::-1]):
        raise OSError(f"could not write {path}")


def browse_annotations(dataset: str, output: str, num_images: int, every: int) -> list[str]:
    """Draw the stored annotations of the first ``num_images`` images; the written paths."""
    metadata = MetadataCatalog.get(dataset)
    written = []
    for done, record in enumerate(DatasetCatalog.get(dataset)[:num_images], 1):
        image = read_image(record["file_name"], format="RGB")
        drawn = Visualizer(image, metadata).draw_dataset_dict(record).get_image()
        target = os.path.join(output, "annotation", Path(record["file_name"]).stem + ".jpg")
        _write(target, drawn)
        written.append(target)
        if done % every == 0 or done == num_images:
            objects = len(record.get("annotations", []))
            print(f"[annotation {done}/{num_images}] {record['file_name']}: {objects} objects")
    return written


def browse_dataloader(cfg, dataset: str, output: str, num_images: int, every: int) -> list[str]:
    """Draw what the training loader yields for ``dataset`` (first ``num_images`` images)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.freeze()
    metadata = MetadataCatalog.get(dataset)
    names = metadata.get("thing_classes", None)
    written = []
    batches = iter(build_detection_train_loader(cfg))
    records = itertools.islice(itertools.chain.from_iterable(batches), num_images)
    for done, record in enumerate(records, 1):
        image = convert_image_to_rgb(record["image"].permute(1, 2, 0).numpy(), cfg.INPUT.FORMAT)
        instances = record["instances"]
        classes = instances.gt_classes.tolist()
        labels = [names[c] for c in classes] if names else [str(c) for c in classes]
        drawn = Visualizer(image, metadata).overlay_instances(
            boxes=instances.gt_boxes.tensor.numpy(), labels=labels
        )
        stem = Path(record["file_name"]).stem
        target = os.path.join(output, "dataloader", f"{done - 1:04d}_{stem}.jpg")
        _write(target, drawn.get_image())
        written.append(target)
        if done % every == 0 or done == num_images:
            size = "x".join(str(s) for s in image.shape[1::-1])
            print(f"[dataloader {done}/{num_images}] {record['file_name']}: {size} px, "
                  f"{len(classes)} objects")  # fmt: skip
    return written


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_tool_args(parser, argv)
    register_coco_datasets(args.register_coco)
    cfg = musu.build_config(args.config_file, args.opts)
    dataset = args.dataset or (cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None)
    if dataset is None:
        parser.error("no dataset: pass --dataset NAME (the config's DATASETS.TRAIN is empty)")
    if dataset not in DatasetCatalog.list():
        parser.error(f"--dataset {dataset!r} is not registered (use --register-coco)")
    if args.source in ("annotation", "both"):
        browse_annotations(dataset, args.output, args.num_images, args.progress_every)
    if args.source in ("dataloader", "both"):
        browse_dataloader(cfg, dataset, args.output, args.num_images, args.progress_every)
    print(f"Pictures of {dataset} in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
