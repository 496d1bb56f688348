#!/usr/bin/env python
"""Figures of the paper's claims, one PNG per command (matplotlib, CPU).

    # Fig. 1: per-location class confidence next to IoU with the ground truth, MuSu vs FCOS
    python tools/analysis/visualize.py consistency --out fig1.png --dataset musu_synthetic_val \\
        --config-file CFG_A CFG_B --weights WEIGHTS_A WEIGHTS_B --names MuSu FCOS --image 0
    # Fig. 2: where the assigner puts classification and regression weight on a training image
    python tools/analysis/visualize.py assignment --out fig2.png --config-file CFG \\
        --weights WEIGHTS --dataset musu_synthetic_train
    # Fig. 3: learned anchor shapes (A > 1) from the regression biases, against the initial ones
    python tools/analysis/visualize.py anchors --out fig3.png --config-file CFG --weights WEIGHTS
    # Loss and AP curves of compared runs from metrics.json (final AP from compare.json if no evals)
    python tools/analysis/visualize.py curves --out curves.png \\
        --run MuSu RUN_DIR_A --run FCOS RUN_DIR_B
    # Assignment statistics over training (musu/* and, with MODEL.MUSU.SHADOW_ASSIGNER, the
    # shadow rule's musu_shadow/*), one column per run
    python tools/analysis/visualize.py assignment-stats --out stats.png \\
        --run A RUN_DIR_A --run B RUN_DIR_B
    # The same per size band of the objects: one column per band, runs overlaid
    python tools/analysis/visualize.py size-bands --out bands.png --run A RUN_DIR_A
    # Schedule curve: final AP and AP75 against schedule length, one panel per dataset, from a
    # CSV of runs (columns dataset, method, iterations, seed, AP, AP75; further columns ignored)
    python tools/analysis/visualize.py schedule --out schedule.png \\
        --csv docs/figures/schedule_curve.csv

Confidence is the score each detector ranks by in NMS: MuSu ``sigmoid(cls) * sigmoid(obj)``,
FCOS ``sqrt(sigmoid(cls) * sigmoid(ctr))``, for the object's class. Maps are shown at the FPN level
holding the object's highest-confidence overlapping location; both maps mark the arg-max of
confidence (x) and of IoU (+), and the title gives their Spearman correlation over locations
whose box overlaps the object.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data import detection_utils as utils  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K  # noqa: E402
from detectron2.modeling.meta_arch.fcos import FCOS  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from musu import build_config  # noqa: E402
from musu.cli import add_tool_arguments, non_negative_int, parse_tool_args  # noqa: E402
from musu.data import register_coco_datasets  # noqa: E402
from musu.engine import read_metrics_json  # noqa: E402
from musu.evaluation import spearman  # noqa: E402
from musu.model_zoo import load_model  # noqa: E402
from musu.modeling import MuSu, MuSuHead  # noqa: E402
from musu.modeling.head import initial_anchor_shapes  # noqa: E402
from musu.modeling.meta_arch import anchor_points, decode_boxes  # noqa: E402
from musu.size_bands import SIZE_BANDS  # noqa: E402

# ----------------------------------------------------------------------------- data + model


def load_example(cfg, dataset: str, index: int) -> Tuple[np.ndarray, Tensor, Tensor]:
    """Test-resized RGB image (H, W, 3), its GT boxes (M, 4) XYXY and classes (M,)."""
    record = DatasetCatalog.get(dataset)[index]
    image = utils.read_image(record["file_name"], format=cfg.INPUT.FORMAT)
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    transform = resize.get_transform(image)
    image = transform.apply_image(image)
    annotations = [a for a in record["annotations"] if not a.get("iscrowd", 0)]
    boxes = np.array(
        [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations],
        dtype=np.float64,
    ).reshape(-1, 4)
    boxes = transform.apply_box(boxes) if len(boxes) else boxes
    classes = torch.tensor([a["category_id"] for a in annotations], dtype=torch.long)
    rgb = utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT)
    return rgb, torch.as_tensor(boxes, dtype=torch.float32), classes


def run_head(model, image: np.ndarray, cfg) -> Tuple[List[Tensor], List[List[Tensor]]]:
    """Backbone features and raw head outputs of one image (already test-resized)."""
    bgr_or_rgb = image if cfg.INPUT.FORMAT == "RGB" else image[:, :, ::-1]
    tensor = torch.as_tensor(np.ascontiguousarray(bgr_or_rgb.transpose(2, 0, 1))).float()
    with torch.no_grad():
        images = model.preprocess_image([{"image": tensor}])
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        predictions = model.head(features)
    return features, predictions


def flat_predictions(predictions: List[List[Tensor]], widths: Sequence[int]) -> List[List[Tensor]]:
    """Each head output list (per level (N, A*K, H, W)) as per level (N, H*W*A, K), K in
    ``widths`` (e.g. [C, 4, 1]), through Detectron2's public ``permute_to_N_HWA_K``."""
    return [[permute_to_N_HWA_K(x, k) for x in outputs] for outputs, k in zip(predictions, widths)]


def dense_maps(model, cfg, image: np.ndarray) -> List[Dict[str, Tensor]]:
    """Per level: "scores" (H, W, A, C) ranking scores, "boxes" (H, W, A, 4), "stride"."""
    features, predictions = run_head(model, image, cfg)
    levels = []
    with torch.no_grad():
        if isinstance(model, MuSu):
            logits, box_reg, objectness = flat_predictions(predictions, [model.num_classes, 4, 1])
            for level, feature in enumerate(features):
                height, width = feature.shape[-2:]
                stride = model.strides[level]
                points, strides = anchor_points(
                    [(height, width)], [stride], model.num_anchors, feature.device
                )
                scores = logits[level][0].sigmoid() * objectness[level][0].sigmoid()
                boxes = decode_boxes(points, strides, box_reg[level][0])
                shape = (height, width, model.num_anchors)
                levels.append(
                    {"scores": scores.reshape(*shape, -1), "boxes": boxes.reshape(*shape, 4),
                     "stride": stride}  # fmt: skip
                )
        elif isinstance(model, FCOS):
            logits, deltas, centerness = flat_predictions(predictions, [model.num_classes, 4, 1])
            anchors = model.anchor_generator(features)
            for level, feature in enumerate(features):
                height, width = feature.shape[-2:]
                scores = torch.sqrt(logits[level][0].sigmoid() * centerness[level][0].sigmoid())
                boxes = model.box2box_transform.apply_deltas(
                    deltas[level][0], anchors[level].tensor
                )
                stride = int(
                    round(float(anchors[level].tensor[0, 2] - anchors[level].tensor[0, 0]))
                )
                levels.append(
                    {"scores": scores.reshape(height, width, 1, -1),
                     "boxes": boxes.reshape(height, width, 1, 4), "stride": stride}  # fmt: skip
                )
        else:
            raise TypeError(f"unsupported model type {type(model).__name__}")
    return levels


def object_maps(levels, gt_box: Tensor, gt_class: int) -> Dict[str, object]:
    """Confidence and IoU maps (H, W) at the level holding the best-confidence overlapping slot."""
    best = None
    for level in levels:
        conf = level["scores"][..., gt_class]  # (H, W, A)
        iou = box_iou(level["boxes"].reshape(-1, 4), gt_box[None]).reshape(conf.shape)
        top = float((conf * (iou > 0)).max())
        if best is None or top > best[0]:
            best = (top, level, conf, iou)
    _, level, conf, iou = best
    # Per location: the slot (of A) with the highest confidence, its IoU.
    slot = conf.argmax(dim=-1, keepdim=True)  # (H, W, 1)
    conf_map = conf.gather(-1, slot)[..., 0]
    iou_map = iou.gather(-1, slot)[..., 0]
    overlap = (iou_map > 0).flatten()
    rho = spearman(conf_map.flatten()[overlap].numpy(), iou_map.flatten()[overlap].numpy())
    return {"conf": conf_map.numpy(), "iou": iou_map.numpy(), "stride": level["stride"], "rho": rho}


# ----------------------------------------------------------------------------- figures


def _box(ax, box, colour="lime", style="-") -> None:
    x0, y0, x1, y1 = [float(v) for v in box]
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.5, ls=style))


def _argmax_cell(values: np.ndarray, stride: int) -> Tuple[float, float]:
    i, j = np.unravel_index(int(np.argmax(values)), values.shape)
    return (j + 0.5) * stride, (i + 0.5) * stride


def figure_consistency(args) -> None:
    models = [
        (name, build_config(cfg_file, args.opts), weights) for name, cfg_file, weights in args.model
    ]
    rgb, gt_boxes, gt_classes = load_example(models[0][1], args.dataset, args.image)
    if len(gt_boxes) == 0:
        raise ValueError(f"image {args.image} of {args.dataset} has no objects")
    areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    obj = int(areas.argmax()) if args.object < 0 else args.object
    fig, axes = plt.subplots(len(models), 3, figsize=(11, 3.6 * len(models)), squeeze=False)
    for row, (name, cfg, weights) in enumerate(models):
        model = load_model(cfg, weights)
        maps = object_maps(dense_maps(model, cfg, rgb), gt_boxes[obj], int(gt_classes[obj]))
        stride = maps["stride"]
        extent = (0, maps["conf"].shape[1] * stride, maps["conf"].shape[0] * stride, 0)
        axes[row, 0].imshow(rgb)
        _box(axes[row, 0], gt_boxes[obj])
        axes[row, 0].set_title(f"{name}: image, object {obj}")
        for col, key, title in [(1, "conf", "class confidence"), (2, "iou", "IoU with GT")]:
            ax = axes[row, col]
            im = ax.imshow(
                maps[key], cmap="inferno", extent=extent, vmin=0, interpolation="nearest"
            )
            _box(ax, gt_boxes[obj])
            cx, cy = _argmax_cell(maps["conf"] * (maps["iou"] > 0), stride)
            ix, iy = _argmax_cell(maps["iou"], stride)
            ax.plot(cx, cy, "x", color="cyan", ms=10, mew=2, label="max confidence (IoU > 0)")
            ax.plot(ix, iy, "+", color="lime", ms=12, mew=2, label="max IoU")
            ax.set_xlim(0, rgb.shape[1])
            ax.set_ylim(rgb.shape[0], 0)
            ax.set_title(f"{title} (stride {stride})")
            fig.colorbar(im, ax=ax, fraction=0.046)
        axes[row, 1].legend(loc="lower right", fontsize=7)
        axes[row, 2].set_xlabel(f"Spearman(conf, IoU) over overlapping cells = {maps['rho']:.2f}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def figure_assignment(args) -> None:
    cfg = build_config(args.config_file, args.opts)
    model = load_model(cfg, args.weights)
    if not isinstance(model, MuSu):
        raise TypeError("the assignment figure needs a MuSu model (its assigner)")
    rgb, gt_boxes, gt_classes = load_example(cfg, args.dataset, args.image)
    features, predictions = run_head(model, rgb, cfg)
    with torch.no_grad():
        logits, box_reg, objectness = flat_predictions(predictions, [model.num_classes, 4, 1])
        grid = model.anchor_grid(features)
        points, strides = grid.points(model.device), grid.point_strides(model.device)
        cls_logits, log_dist = torch.cat(logits, 1), torch.cat(box_reg, 1)  # (1, R, C), (1, R, 4)
        scores = cls_logits.sigmoid() * torch.cat(objectness, 1).sigmoid()  # (1, R, C)
        pred_boxes = decode_boxes(points, strides, log_dist)
        assignment = model.assigner(grid, scores, pred_boxes, [gt_boxes], [gt_classes])
    sizes = [tuple(f.shape[-2:]) for f in features]
    counts = [h * w * model.num_anchors for h, w in sizes]
    cls_w = assignment.cls_weight[0].split(counts)
    reg_w = assignment.reg_weight[0].split(counts)
    used = [i for i in range(len(sizes)) if float(cls_w[i].max() + reg_w[i].max()) > 0]
    used = used or [0]
    fig, axes = plt.subplots(
        2, len(used), figsize=(3.8 * len(used) + 1, 7.6), squeeze=False, layout="constrained"
    )
    for col, level in enumerate(used):
        h, w = sizes[level]
        stride = model.strides[level]
        extent = (0, w * stride, h * stride, 0)
        for row, (weights, head) in enumerate([(cls_w, "classification"), (reg_w, "regression")]):
            ax = axes[row, col]
            grid = weights[level].reshape(h, w, model.num_anchors).max(dim=-1).values.numpy()
            ax.imshow(rgb, alpha=0.55)
            masked = np.ma.masked_where(grid <= 0, grid)
            im = ax.imshow(masked, cmap="viridis", extent=extent, vmin=0, vmax=1,
                           alpha=0.9, interpolation="nearest")  # fmt: skip
            for box in gt_boxes:
                _box(ax, box, "red")
            ax.set_xlim(0, rgb.shape[1])
            ax.set_ylim(rgb.shape[0], 0)
            ax.set_title(f"{head} weight, stride {stride}")
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, label="weight (max over A slots)")
    fig.suptitle(
        f"MuSu assignment, {args.dataset}[{args.image}], {len(gt_boxes)} objects "
        f"({Path(args.weights).name}); blank = weight 0"
    )
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def learned_anchor_boxes(head: MuSuHead) -> Tensor:
    """(L, A, 4) (l, t, r, b) in strides of each slot's box at a zero feature: exp(scale * bias)."""
    bias = head.bbox_pred.bias.detach().reshape(head.num_anchors, 4)  # (A, 4)
    scales = head.scales.detach()  # (L,)
    return (scales[:, None, None] * bias[None]).exp()


def figure_anchors(args) -> None:
    cfg = build_config(args.config_file, args.opts)
    model = load_model(cfg, args.weights)
    head = model.head
    if not isinstance(head, MuSuHead):
        raise TypeError("the anchors figure needs a MuSu model")
    learned = learned_anchor_boxes(head).numpy()  # (L, A, 4)
    musu_cfg = cfg.MODEL.MUSU
    init_shapes = initial_anchor_shapes(
        musu_cfg.NUM_ANCHORS, musu_cfg.ANCHOR_SCALE_RANGE, musu_cfg.ANCHOR_ASPECT_RATIO_RANGE,
        musu_cfg.ANCHOR_INIT_SEED, initial_box_size=musu_cfg.INITIAL_BOX_SIZE,
        sizes=musu_cfg.ANCHOR_SIZES,
    )  # fmt: skip
    initial = MuSuHead.anchor_bias(init_shapes).reshape(-1, 4).exp().numpy()  # (A, 4)
    levels = len(learned)
    colours = plt.cm.tab10(np.arange(head.num_anchors))
    fig, axes = plt.subplots(1, levels, figsize=(3.2 * levels, 3.6), squeeze=False)
    limit = float(max(learned.max(), initial.max())) * 1.1
    for level in range(levels):
        ax = axes[0, level]
        ax.add_patch(Rectangle((-0.5, -0.5), 1, 1, fill=False, ec="gray", ls="--", lw=1))
        for a in range(head.num_anchors):
            l, t, r, b = learned[level, a]
            ax.add_patch(Rectangle((-l, -t), l + r, t + b, fill=False, ec=colours[a], lw=2,
                                   label=f"slot {a}: {l + r:.1f}x{t + b:.1f}"))  # fmt: skip
            l0, t0, r0, b0 = initial[a]
            ax.add_patch(Rectangle((-l0, -t0), l0 + r0, t0 + b0, fill=False, ec=colours[a],
                                   lw=1, ls=":"))  # fmt: skip
        ax.set_xlim(-limit, limit)
        ax.set_ylim(limit, -limit)
        ax.set_aspect("equal")
        ax.set_title(f"{model.head_in_features[level]} (scale {float(head.scales[level]):.2f})")
        ax.legend(fontsize=6, loc="lower right")
        ax.set_xlabel("strides")
    fig.suptitle(
        "Anchor boxes (w x h in strides) from the regression bias: solid = "
        f"{Path(args.weights).name}, dotted = initial; dashed = one feature cell",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def _final_eval_from_compare(run_dir: Path, iteration: int) -> List[dict]:
    """Without evaluations in metrics.json, the final AP that tools/compare.py wrote for this
    run (``<run dir>/../compare.json``, keyed by the run dir's name), as one entry."""
    path = run_dir.parent / "compare.json"
    row = json.loads(path.read_text()).get(run_dir.name) if path.is_file() else None
    if row is None:
        print(f"note: no bbox/AP in {run_dir}/metrics.json and no compare.json row")
        return []
    print(f"note: {run_dir.name}: final AP from {path}")
    return [{"iteration": iteration, **{f"bbox/{k}": row[k] for k in ("AP", "AP50", "AP75")}}]


def figure_curves(args) -> None:
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run_dir in args.run:
        entries = read_metrics_json(Path(run_dir) / "metrics.json")
        train = [e for e in entries if "total_loss" in e]
        iters = [e["iteration"] for e in train]
        line = ax_loss.plot(iters, [e["total_loss"] for e in train], lw=2, label=f"{name} total")[0]
        loss_keys = sorted({k for e in train for k in e if k.startswith("loss_")})
        for style, key in zip(["--", ":", "-."], loss_keys):
            ax_loss.plot(iters, [e.get(key, math.nan) for e in train], style,
                         color=line.get_color(), lw=1, label=f"{name} {key}")  # fmt: skip
        evals = [e for e in entries if "bbox/AP" in e]
        if not evals:
            evals = _final_eval_from_compare(Path(run_dir), iters[-1] if iters else 0)
        for marker, key in [("o", "bbox/AP"), ("s", "bbox/AP75"), ("^", "bbox/AP50")]:
            ax_ap.plot([e["iteration"] for e in evals], [e[key] for e in evals], marker=marker,
                       color=line.get_color(), label=f"{name} {key[5:]}")  # fmt: skip
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss (each detector's own definitions)")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=7)
    ax_ap.set_xlabel("iteration")
    ax_ap.set_ylabel("COCO AP, test set")
    ax_ap.set_xlim(ax_loss.get_xlim())
    ax_ap.legend(fontsize=7)
    ax_ap.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def _series(entries: List[dict], key: str) -> Tuple[List[int], List[float]]:
    points = [(e["iteration"], e[key]) for e in entries if key in e]
    return [i for i, _ in points], [v for _, v in points]


def figure_assignment_stats(args) -> None:
    """One column per run, rows: members per object (mean and p10-p90 band), summed weight per
    object, share of members per FPN level, and tau_cls with the rank-0 = best-IoU shares.
    Solid: the training assigner (``musu/*``); dashed: the shadow assigner (``musu_shadow/*``)."""
    fig, axes = plt.subplots(4, len(args.run), figsize=(5.5 * len(args.run), 13), squeeze=False,
                             sharex="col", sharey="row")  # fmt: skip
    for column, (name, run_dir) in enumerate(args.run):
        entries = read_metrics_json(Path(run_dir) / "metrics.json")
        if not any(k.startswith("musu/members_mean") for e in entries for k in e):
            raise SystemExit(f"{run_dir}/metrics.json has no musu/members_mean: not a MuSu run?")
        ax_members, ax_weight, ax_levels, ax_rank = axes[:, column]
        for prefix, style, label in (("musu", "-", "assigner"), ("musu_shadow", "--", "shadow")):
            iters, mean = _series(entries, f"{prefix}/members_mean")
            if not iters:
                continue
            line = ax_members.plot(iters, mean, style, lw=2, label=f"{label}: mean")[0]
            low, high = _series(entries, f"{prefix}/members_p10")[1], _series(
                entries, f"{prefix}/members_p90")[1]  # fmt: skip
            if len(low) == len(high) == len(iters):
                ax_members.fill_between(iters, low, high, color=line.get_color(), alpha=0.15,
                                        label=f"{label}: p10-p90")  # fmt: skip
            for head, colour in (("cls", "tab:blue"), ("reg", "tab:orange")):
                ax_weight.plot(*_series(entries, f"{prefix}/{head}_weight_per_object"), style,
                               color=colour, label=f"{label}: {head}")  # fmt: skip
            level_keys = sorted({k for e in entries for k in e
                                 if k.startswith(f"{prefix}/level_share_s")},
                                key=lambda k: float(k.rsplit("_s", 1)[1]))  # fmt: skip
            for index, key in enumerate(level_keys):
                ax_levels.plot(*_series(entries, key), style, color=f"C{index}",
                               label=f"{label}: stride {key.rsplit('_s', 1)[1]}")  # fmt: skip
        ax_rank.plot(*_series(entries, "musu/cls_top_is_best_iou"), color="tab:blue",
                     label="cls rank 0 = best IoU")  # fmt: skip
        ax_rank.plot(*_series(entries, "musu/reg_top_is_best_iou"), color="tab:orange",
                     label="reg rank 0 = best IoU")  # fmt: skip
        ax_tau = ax_rank.twinx()
        ax_tau.plot(*_series(entries, "musu/tau_cls"), "k:", label="tau_cls (right axis)")
        ax_members.set_title(name)
        ax_members.set_ylabel("members per object")
        ax_weight.set_ylabel("summed weight per object")
        ax_levels.set_ylabel("share of members per level")
        ax_rank.set_ylabel("share of objects")
        ax_rank.set_xlabel("iteration")
        for ax in (ax_members, ax_weight, ax_levels, ax_rank):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        ax_tau.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


# (row label, [(key without prefix and band, prefix, line label)]) of the size-band figure.
BAND_PANELS = (
    ("members per object", [("members_mean", "musu", "bag"), ("members_mean", "musu_shadow",
                                                                "FCOS rule")]),
    ("reg weight per object", [("reg_weight_per_object", "musu", "MuSu"),
                               ("reg_weight_per_object", "musu_shadow", "FCOS rule")]),
    ("IoU of predicted box", [("reg_top_iou", "musu", "MuSu reg rank 0"),
                              ("member_iou", "musu", "MuSu bag mean"),
                              ("member_iou", "musu_shadow", "FCOS rule positives")]),
    ("rank-0 reg sample", [("reg_top_centre", "musu", "share within 1.5 strides of centre"),
                           ("reg_top_offset", "musu", "offset (0 centre, 1 edge)")]),
)  # fmt: skip


def figure_size_bands(args) -> None:
    """One column per size band (``musu/<key>_<band>``), rows :data:`BAND_PANELS` and the share
    of the band's members per FPN level; each run is a colour, the shadow rule dashed."""
    rows = len(BAND_PANELS) + 1
    fig, axes = plt.subplots(rows, len(SIZE_BANDS), figsize=(5 * len(SIZE_BANDS), 3 * rows),
                             squeeze=False, sharex=True)  # fmt: skip
    runs = [(name, read_metrics_json(Path(d) / "metrics.json"), d) for name, d in args.run]
    for name, entries, run_dir in runs:
        if not any(k.startswith("musu/objects_") for e in entries for k in e):
            raise SystemExit(f"{run_dir}/metrics.json has no musu/objects_<band>: no band scalars")
    for column, (band, _, _) in enumerate(SIZE_BANDS):
        axes[0, column].set_title(f"{band} objects")
        for run_index, (name, entries, _) in enumerate(runs):
            colour = f"C{run_index}"
            for row, (label, lines) in enumerate(BAND_PANELS):
                ax = axes[row, column]
                for line_index, (key, prefix, line_label) in enumerate(lines):
                    style = "--" if prefix == "musu_shadow" else ("-", ":", "-.")[line_index % 3]
                    ax.plot(*_series(entries, f"{prefix}/{key}_{band}"), style, color=colour,
                            label=f"{name}: {line_label}")  # fmt: skip
                ax.set_ylabel(label)
            ax = axes[-1, column]
            head, tail = "musu/members_share_s", f"_{band}"
            strides = sorted({float(k[len(head):-len(tail)]) for e in entries for k in e
                              if k.startswith(head) and k.endswith(tail)})  # fmt: skip
            for index, stride in enumerate(strides):
                ax.plot(*_series(entries, f"{head}{stride:g}{tail}"), ("-", "--", ":", "-.")[index % 4],
                        color=colour, label=f"{name}: stride {stride:g}")  # fmt: skip
            ax.set_ylabel("share of bag members per level")
            ax.set_xlabel("iteration")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


SCHEDULE_COLUMNS = ("dataset", "method", "iterations", "seed", "AP", "AP75")


def read_schedule_csv(path: Path) -> Dict[Tuple[str, str, int], List[Tuple[float, float]]]:
    """(dataset, method, iterations) -> [(AP, AP75) per seed] from a CSV with SCHEDULE_COLUMNS.
    Raises SystemExit naming the file and line for a missing column, a non-number or a repeated
    (dataset, method, iterations, seed)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in SCHEDULE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"{path}: missing column(s) {missing}; need {list(SCHEDULE_COLUMNS)}")
        points: Dict[Tuple[str, str, int], List[Tuple[float, float]]] = {}
        seen = set()
        for line, row in enumerate(reader, start=2):
            try:
                key = (row["dataset"], row["method"], int(row["iterations"]))
                seed, ap, ap75 = int(row["seed"]), float(row["AP"]), float(row["AP75"])
            except (TypeError, ValueError) as e:
                raise SystemExit(f"{path}:{line}: not a number in {dict(row)} ({e})") from None
            if (*key, seed) in seen:
                raise SystemExit(f"{path}:{line}: {key} seed {seed} appears twice")
            seen.add((*key, seed))
            points.setdefault(key, []).append((ap, ap75))
    if not points:
        raise SystemExit(f"{path}: no rows")
    return points


def figure_schedule(args) -> None:
    """One panel per dataset: mean AP (solid) and AP75 (dashed) over seeds against the schedule
    length, one colour per method, each seed's value as a dot; prints the same as a table."""
    points = read_schedule_csv(Path(args.csv))
    datasets = sorted({d for d, _, _ in points})
    methods = sorted({m for _, m, _ in points})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    print("| dataset | method | iterations | seeds | AP (mean) | AP75 (mean) |")
    print("|---|---|---|---|---|---|")
    for ax, dataset in zip(axes[0], datasets):
        for index, method in enumerate(methods):
            iters = sorted(i for d, m, i in points if (d, m) == (dataset, method))
            if not iters:
                continue
            runs = [np.array(points[dataset, method, i]) for i in iters]  # (seeds, 2) each
            means = np.array([r.mean(axis=0) for r in runs])  # (len(iters), 2): AP, AP75
            colour = f"C{index}"
            for column, style, label in ((0, "o-", "AP"), (1, "s--", "AP75")):
                ax.plot(iters, means[:, column], style, color=colour, label=f"{method} {label}")
                for i, r in zip(iters, runs):
                    ax.scatter([i] * len(r), r[:, column], color=colour, s=10, alpha=0.5)
            for i, r, (ap, ap75) in zip(iters, runs, means):
                print(f"| {dataset} | {method} | {i} | {len(r)} | {ap:.1f} | {ap75:.1f} |")
        ax.set_title(dataset)
        ax.set_xlabel("schedule length (iterations)")
        ax.set_ylabel("COCO AP / AP75, evaluation split")
        ax.set_xticks(sorted({i for d, _, i in points if d == dataset}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per figure; those that build a model follow :mod:`musu.cli`'s convention
    (``--config-file``, ``--register-coco`` where they read data, trailing overrides)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("consistency", help="Fig. 1: confidence vs IoU maps")
    add_tool_arguments(p, several_configs=True)
    p.add_argument("--weights", nargs="+", required=True, help="one checkpoint per config")
    p.add_argument("--names", nargs="+", help="one row title per config (default: file stems)")
    p.add_argument("--dataset", default="musu_synthetic_val")
    p.add_argument("--image", type=non_negative_int, default=0)
    p.add_argument("--object", type=int, default=-1, help="-1: the largest object")
    p.set_defaults(func=figure_consistency)
    p = sub.add_parser("assignment", help="Fig. 2: MuSu cls / reg weights on a training image")
    add_tool_arguments(p)
    p.add_argument("--weights", required=True, help="checkpoint")
    p.add_argument("--dataset", default="musu_synthetic_train")
    p.add_argument("--image", type=non_negative_int, default=0)
    p.set_defaults(func=figure_assignment)
    p = sub.add_parser("anchors", help="Fig. 3: learned anchor shapes of an A > 1 model")
    add_tool_arguments(p, reads_data=False)
    p.add_argument("--weights", required=True, help="checkpoint")
    p.set_defaults(func=figure_anchors)
    # The run figures read training outputs (metrics.json, a CSV of runs), never a config.
    p = sub.add_parser("curves", help="loss and AP curves from metrics.json")
    p.add_argument("--run", nargs=2, action="append", required=True, metavar=("NAME", "DIR"))
    p.set_defaults(func=figure_curves)
    p = sub.add_parser("assignment-stats", help="assignment statistics over training (musu/*)")
    p.add_argument("--run", nargs=2, action="append", required=True, metavar=("NAME", "DIR"))
    p.set_defaults(func=figure_assignment_stats)
    p = sub.add_parser("size-bands", help="assignment statistics per object size band")
    p.add_argument("--run", nargs=2, action="append", required=True, metavar=("NAME", "DIR"))
    p.set_defaults(func=figure_size_bands)
    p = sub.add_parser("schedule", help="final AP / AP75 against schedule length (CSV of runs)")
    p.add_argument("--csv", required=True, help="columns: " + ", ".join(SCHEDULE_COLUMNS))
    p.set_defaults(func=figure_schedule)
    for p in sub.choices.values():
        p.add_argument("--out", required=True, help="PNG path")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_tool_args(parser, argv)
    if args.command == "consistency":
        names = args.names or [Path(c).stem for c in args.config_file]
        if not len(args.config_file) == len(args.weights) == len(names):
            parser.error("consistency: give as many --weights (and --names) as --config-file")
        args.model = list(zip(names, args.config_file, args.weights))
    register_coco_datasets(getattr(args, "register_coco", None))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
