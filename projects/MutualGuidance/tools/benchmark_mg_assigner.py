#!/usr/bin/env python
"""Time ``MutualGuidanceAssigner`` (the four Table 1 switch combinations) on BCCD-sized batches.

The batch: the N most crowded BCCD training images at 320 px (their ground truth, scaled), the
anchors of the project's BCCD RetinaNet config (9 per location on P3-P7 of a 320 x 427 input),
random class probabilities and regressed boxes = anchors + Gaussian noise (``--noise`` px).

    python projects/MutualGuidance/tools/benchmark_mg_assigner.py --images 8 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator

from musu.data.datasets import datasets_root
from musu.modeling.assigners import AnchorList
from musu_mg import MutualGuidanceAssigner

SIZES = [[x * 2 ** (k / 3) for k in range(3)] for x in (16, 32, 64, 128, 256)]
STRIDES = [8, 16, 32, 64, 128]


def bccd_batch(num_images: int, scale: float = 320 / 480):
    """Boxes (M, 4) and classes (M,) of the num_images most crowded BCCD training images."""
    path = datasets_root() / "bccd" / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    per_image = defaultdict(list)
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        per_image[ann["image_id"]].append(([x, y, x + w, y + h], ann["category_id"] - 1))
    crowded = sorted(per_image, key=lambda i: -len(per_image[i]))[:num_images]
    boxes = [torch.tensor([b for b, _ in per_image[i]]) * scale for i in crowded]
    classes = [torch.tensor([c for _, c in per_image[i]]) for i in crowded]
    return boxes, classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--noise", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = DefaultAnchorGenerator(
        sizes=SIZES, aspect_ratios=[[0.5, 1.0, 2.0]], strides=STRIDES, offset=0.0
    )
    features = [torch.zeros(1, 1, -(-320 // s), -(-427 // s)) for s in STRIDES]
    anchors = torch.cat([b.tensor for b in generator(features)])  # (R, 4)
    gt_boxes, gt_classes = bccd_batch(args.images)
    gen = torch.Generator().manual_seed(0)
    num_anchors = len(anchors)
    grid = AnchorList(boxes=anchors)
    scores = torch.rand(args.images, num_anchors, 3, generator=gen)
    noise = torch.randn(args.images, num_anchors, 4, generator=gen) * args.noise
    pred_boxes = anchors[None] + noise
    print(
        f"N = {args.images} images, R = {num_anchors} anchors, "
        f"M = {[len(b) for b in gt_boxes]} objects, {torch.get_num_threads()} thread(s)"
    )
    print("| L2C | C2L | median s | static positives | cls positives | reg positives | ignored |")
    print("|---|---|---|---|---|---|---|")
    for l2c, c2l in ((False, False), (True, False), (False, True), (True, True)):
        assigner = MutualGuidanceAssigner(l2c=l2c, c2l=c2l)
        assigner(grid, scores, pred_boxes, gt_boxes, gt_classes)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = assigner(grid, scores, pred_boxes, gt_boxes, gt_classes)
            times.append(time.perf_counter() - start)
        num_static = int(result.stats["bag_size"].sum())
        print(
            f"| {l2c} | {c2l} | {statistics.median(times):.3f} | {num_static} | "
            f"{int((result.gt_index >= 0).sum())} | {int((result.reg_gt_index >= 0).sum())} | "
            f"{int(result.ignore.sum())} |"
        )


if __name__ == "__main__":
    main()
