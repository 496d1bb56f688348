"""Time and peak memory of the MuSu assigner next to Detectron2's FCOS label assignment.

Inputs (deterministic, ``--seed``): N = 2 images per ``--sizes`` entry (default 400 x 667 and
800 x 1333, padded to multiples of 32 as ImageList does), FPN strides 8-128, R = A x 5,635 or
A x 22,400 anchor slots (A = 1, 3, 5: R from 5.6k to 112k), C = 80 classes; M objects per image with COCO-like
sizes (8-800 px, see ``common.random_boxes``); scores uniform in [0, 1]; predicted boxes
``point -/+ stride * exp(noise)``, noise ~ N(0, 1) per side. Both sides get precomputed
anchors: ``MuSuAssigner()(grid, scores, pred_boxes, gt_boxes, gt_classes)`` against
``FCOS.label_anchors(anchors, gt_instances)`` of a real ``FCOS`` on the same R anchor slots
(FCOS's own anchors at A = 1; at A > 1 each location's anchor repeated A times, i.e. the FCOS rule
labelling every slot, which is what MuSu's FCOS-rule assigner does at A > 1).

Time: each row measures MuSu and FCOS interleaved (order alternating) ``--repeats`` times after
a warm-up; it reports medians, and the time ratio as the median of the per-repeat ratios.
Peak memory: tensor memory allocated during one call above the live inputs (outputs included):
CUDA ``max_memory_allocated``; on CPU the CPU allocator's allocation / free events seen by
``torch.profiler(profile_memory=True)``, summed in time order (see ``common.py``).
``--profile`` adds a per-step breakdown of MuSu (one row per step function of
``musu.modeling.assigners.musu.STEPS``) and a per-line breakdown of both (source traced as is).

The MuSu assigner is ``build_musu_assigner`` of ``--config-file`` (default
configs/Base-MuSu.yaml) and its trailing ``KEY VALUE`` overrides.

Usage (from the repository root): ``python tools/benchmarks/assigner.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from common import (  # tools/benchmarks/common.py: the script's folder is on sys.path
    MIB,
    LineProfile,
    command_line,
    environment_summary,
    inspect_unwrap,
    interleaved_timings,
    line_profile,
    markdown_table,
    paired_ratio,
    peak_memory_bytes,
    quiet_warnings,
    random_boxes,
)
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.structures import Boxes, Instances
from torch import Tensor

import musu
from musu.cli import (
    add_threads_argument,
    non_negative_int,
    parse_tool_args,
    positive_int,
    set_torch_threads,
    tool_argument_parser,
)
from musu.modeling.assigners import AnchorGrid, AnchorList, MuSuAssigner
from musu.modeling.assigners.build import build_musu_assigner
from musu.modeling.assigners.musu import STEPS
from musu.modeling.meta_arch import anchor_points

IMAGE_SIZES = {400: (400, 667), 800: (800, 1333)}  # shorter side -> (H, W), 1333/800 aspect
STRIDES = [8, 16, 32, 64, 128]
LEVELS = ["p3", "p4", "p5", "p6", "p7"]
NUM_CLASSES = 80


class _ShapeOnlyBackbone(Backbone):
    """A backbone that only declares the five FPN levels: FCOS's constructor reads their strides."""

    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        self._shapes = {n: ShapeSpec(channels=channels, stride=s) for n, s in zip(LEVELS, STRIDES)}

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        raise NotImplementedError("only output_shape() is used")

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return dict(self._shapes)


def build_fcos(device: torch.device) -> FCOS:
    """A real Detectron2 ``FCOS`` (80 classes, default center sampling) on a shape-only backbone."""
    backbone = _ShapeOnlyBackbone()
    shapes = backbone.output_shape()
    head = FCOSHead(
        input_shape=[shapes[n] for n in LEVELS], conv_dims=[256] * 4, num_classes=NUM_CLASSES
    )
    model = FCOS(
        backbone=backbone,
        head=head,
        head_in_features=LEVELS,
        num_classes=NUM_CLASSES,
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    )
    return model.to(device).eval()


def image_size(short_side: int) -> Tuple[int, int]:
    """(H, W) of a landscape image with the given shorter side and COCO's 800 x 1333 aspect."""
    return IMAGE_SIZES.get(short_side, (short_side, round(short_side * 1333 / 800)))


def feature_sizes(size: Tuple[int, int]) -> List[Tuple[int, int]]:
    """(H_l, W_l) per level: ceil(padded size / stride), the image padded to a multiple of 32."""
    padded = [math.ceil(side / 32) * 32 for side in size]
    return [(math.ceil(padded[0] / s), math.ceil(padded[1] / s)) for s in STRIDES]


def ground_truth(
    num_images: int, num_objects: int, size: Tuple[int, int], seed: int, device: torch.device
) -> Tuple[List[Tensor], List[Tensor]]:
    """N boxes (M, 4) XYXY and N classes (M,), the same for every A at a given M and size."""
    generator = torch.Generator().manual_seed(seed * 1000 + num_objects)
    boxes = [random_boxes(num_objects, size, generator) for _ in range(num_images)]
    classes = [
        torch.randint(NUM_CLASSES, (num_objects,), generator=generator) for _ in range(num_images)
    ]
    return [b.to(device) for b in boxes], [c.to(device) for c in classes]


def musu_inputs(
    num_images: int, num_anchors: int, size: Tuple[int, int], seed: int, device: torch.device
) -> Tuple[Tensor, Tensor, Tensor]:
    """points (R, 2), scores (N, R, C) ~ U[0, 1], pred_boxes (N, R, 4) = point -/+ s * e^noise."""
    grid_sizes = feature_sizes(size)
    points, strides = anchor_points(grid_sizes, STRIDES, num_anchors, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed * 1000 + 7 * num_anchors)
    num_points = len(points)
    scores = torch.rand(num_images, num_points, NUM_CLASSES, generator=generator)
    noise = torch.randn(num_images, num_points, 4, generator=generator)
    distances = strides[:, None] * noise.exp()  # (N, R, 4)
    pred_boxes = torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)
    return points.to(device), scores.to(device), pred_boxes.to(device)


def fcos_inputs(
    fcos: FCOS,
    gt_boxes: List[Tensor],
    gt_classes: List[Tensor],
    size: Tuple[int, int],
    num_anchors: int,
    device: torch.device,
) -> Tuple[List[Boxes], List[Instances]]:
    """A slots per location of ``fcos.anchor_generator``'s anchors on dummy (1, 1, H_l, W_l)
    features, and the Instances."""
    features = [torch.zeros(1, 1, h, w, device=device) for h, w in feature_sizes(size)]
    # The same R = A x locations anchor slots MuSu gets: each location's point repeated A times
    # in (H, W, A) order, so the FCOS rule labels every slot as MuSu's FCOS-rule assigner does.
    anchors = [
        Boxes(level.tensor.repeat_interleave(num_anchors, dim=0))
        for level in fcos.anchor_generator(features)
    ]
    instances = [
        Instances(size, gt_boxes=Boxes(b), gt_classes=c) for b, c in zip(gt_boxes, gt_classes)
    ]
    return anchors, instances


OTHER = "__call__: checks, padding, outputs"


def _step_name(func: str) -> str:
    """Table label of a profiled function: its step number and name."""
    names = [step.__name__ for step in STEPS]
    return f"{names.index(func) + 1}. {func}" if func in names else OTHER


def _source_line(fn: Callable, line: int) -> str:
    """Source text of line ``line`` of ``fn`` (stripped, at most 90 characters)."""
    lines, start = inspect.getsourcelines(inspect_unwrap(fn))
    return lines[line - start].strip()[:90]


def _line_rows(
    profile: LineProfile,
    top: Sequence[Tuple[Tuple[str, int], float]],
    functions: Dict[str, Callable],
) -> List[List[str]]:
    """Table rows ``line | ms | allocated MiB | source`` of the ``top`` (line, seconds) entries
    of ``profile``; ``functions`` maps a profiled function name to the function."""
    return [
        [
            f"{func}:{line}",
            f"{1e3 * seconds:.1f}",
            f"{profile.allocated.get((func, line), 0) / MIB:.1f}",
            f"`{_source_line(functions[func], line)}`",
        ]
        for (func, line), seconds in top
    ]


def print_profiles(
    run_musu: Callable[[], object], run_fcos: Callable[[], object], label: str
) -> Dict[str, object]:
    """Per-step breakdown of MuSu and per-line breakdown of FCOS for one size (one call each)."""
    summary = _print_musu_profile(run_musu, label)
    _print_fcos_profile(run_fcos, label)
    return summary


def _print_musu_profile(run_musu: Callable[[], object], label: str) -> Dict[str, object]:
    """Time and allocations per step function of ``STEPS``; the rest of the call (input checks,
    padding, output tensors) is the total minus their time."""
    functions = {step.__name__: step for step in STEPS}
    musu = line_profile(run_musu, list(STEPS))
    by_section: Dict[str, List[float]] = {}
    for (func, line), seconds in musu.seconds.items():
        entry = by_section.setdefault(_step_name(func), [0.0, 0.0])
        entry[0] += seconds
        entry[1] += musu.allocated.get((func, line), 0)
    total = musu.total_seconds
    by_section[OTHER] = [max(total - sum(s for s, _ in by_section.values()), 0.0), 0.0]
    rows = [
        [name, f"{1e3 * s:.1f}", f"{100 * s / total:.0f}%", f"{a / MIB:.1f}"]
        for name, (s, a) in sorted(by_section.items())
    ]
    peak_line = musu.peak_line
    print(f"\n#### MuSu assigner by step, {label} (one traced call: {1e3 * total:.1f} ms)\n")
    print(markdown_table(["step", "ms", "share", "allocated MiB"], rows))
    if peak_line is not None:
        func, line = peak_line
        print(
            f"\nPeak {musu.peak_bytes / MIB:.1f} MiB reached at {func}:{line} "
            f"({_step_name(func)}): `{_source_line(functions[func], line)}`"
        )
    top = sorted(musu.seconds.items(), key=lambda kv: -kv[1])[:8]
    line_rows = _line_rows(musu, top, functions)
    print(f"\nMuSu slowest lines, {label}:\n")
    print(markdown_table(["line", "ms", "allocated MiB", "source"], line_rows))

    return {
        "musu_steps_ms": {k: 1e3 * v[0] for k, v in by_section.items()},
        "musu_steps_allocated_mib": {k: v[1] / MIB for k, v in by_section.items()},
        "musu_peak_line": None if peak_line is None else f"{peak_line[0]}:{peak_line[1]}",
    }


def _print_fcos_profile(run_fcos: Callable[[], object], label: str) -> None:
    """The slowest lines of Detectron2's ``FCOS._match_anchors``."""
    targets = [FCOS.label_anchors, FCOS._match_anchors]
    fcos_prof = line_profile(run_fcos, targets)
    funcs = {inspect_unwrap(t).__name__: t for t in targets}
    top = sorted(
        ((k, s) for k, s in fcos_prof.seconds.items() if k[0] == "_match_anchors"),
        key=lambda kv: -kv[1],
    )[:6]
    line_rows = _line_rows(fcos_prof, top, funcs)
    print(
        f"\nFCOS slowest lines of _match_anchors, {label} (summed over images; one traced "
        f"label_anchors call: {1e3 * fcos_prof.total_seconds:.1f} ms, "
        f"peak {fcos_prof.peak_bytes / MIB:.1f} MiB):\n"
    )
    print(markdown_table(["line", "ms", "allocated MiB", "source"], line_rows))


def measure(
    assigner: MuSuAssigner,
    fcos: FCOS,
    num_anchors: int,
    num_objects: int,
    size: Tuple[int, int],
    args: argparse.Namespace,
    device: torch.device,
) -> Dict[str, object]:
    """One table row: MuSu and FCOS timed interleaved on the same ground truth, then peaks."""
    gt_boxes, gt_classes = ground_truth(args.images, num_objects, size, args.seed, device)
    anchors, instances = fcos_inputs(fcos, gt_boxes, gt_classes, size, num_anchors, device)
    points, scores, pred_boxes = musu_inputs(args.images, num_anchors, size, args.seed, device)
    if args.pairs == "grid":  # as the detector calls it: inside pairs listed per box
        grid = AnchorGrid(tuple(feature_sizes(size)), tuple(STRIDES), num_anchors)
    else:  # the same points, inside pairs from one dense (N, M, R) test
        grid = AnchorList(points)
    run_musu = partial(assigner, grid, scores, pred_boxes, gt_boxes, gt_classes)
    run_fcos = partial(fcos.label_anchors, anchors, instances)

    times = interleaved_timings(
        {"musu": run_musu, "fcos": run_fcos}, args.repeats, args.warmup, device
    )
    musu_peak = peak_memory_bytes(run_musu, device) / MIB
    fcos_peak = peak_memory_bytes(run_fcos, device) / MIB
    assigned = int((run_musu().gt_index >= 0).sum())  # (N, R) -> anchors in a candidate bag
    positives = sum(int((labels != NUM_CLASSES).sum()) for labels in run_fcos()[0])
    row: Dict[str, object] = {
        "image": f"{size[0]}x{size[1]}",
        "A": num_anchors,
        "M": num_objects,
        "R": len(points),
        "musu_ms": 1e3 * statistics.median(times["musu"]),
        "fcos_ms": 1e3 * statistics.median(times["fcos"]),
        "time_ratio": paired_ratio(times["musu"], times["fcos"]),
        "musu_peak_mib": musu_peak,
        "fcos_peak_mib": fcos_peak,
        "memory_ratio": musu_peak / fcos_peak,
        "musu_times_ms": [1e3 * t for t in times["musu"]],
        "fcos_times_ms": [1e3 * t for t in times["fcos"]],
        "musu_assigned_per_image": assigned / args.images,
        "fcos_positives_per_image": positives / args.images,
    }
    if args.profile and device.type == "cpu":
        label = f"{size[0]}x{size[1]}, A={num_anchors}, M={num_objects}"
        row["profile"] = print_profiles(run_musu, run_fcos, label)
    return row


def build_parser() -> argparse.ArgumentParser:
    """The command line (module docstring; musu.cli convention). ``--config-file`` (default
    configs/Base-MuSu.yaml) and the trailing overrides configure the MuSu assigner
    (``build_musu_assigner``: MODEL.MUSU's assigner keys)."""
    parser = tool_argument_parser(__doc__.split("\n")[0], config_required=False, reads_data=False)
    parser.set_defaults(config_file="configs/Base-MuSu.yaml")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--num-anchors", type=positive_int, nargs="+", default=[1, 3, 5], help="MuSu A values"
    )
    parser.add_argument(
        "--objects",
        type=positive_int,
        nargs="+",
        default=[1, 10, 100, 500, 1000],
        help="M values",
    )
    parser.add_argument(
        "--sizes",
        type=positive_int,
        nargs="+",
        default=[400, 800],
        help="image shorter sides (H); W = H * 1333 / 800",
    )
    parser.add_argument("--images", type=positive_int, default=2, help="N")
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed calls of each, interleaved"
    )
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    add_threads_argument(parser)
    parser.add_argument(
        "--pairs",
        choices=["grid", "dense"],
        default="grid",
        help="MuSu inside-pair search: 'grid' lists points per box (what the detector uses), "
        "'dense' tests every (object, point) pair",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument(
        "--profile", action="store_true", help="per-step breakdown of MuSu and FCOS (CPU only)"
    )
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The parsed command line; errors for a missing CUDA device."""
    parser = build_parser()
    args = parse_tool_args(parser, argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def print_results(records: List[Dict[str, object]], args: argparse.Namespace, device) -> None:
    """The Markdown table of ``records``, how it was measured, and the JSON file if asked."""
    headers = ["image", "A", "M", "R", "MuSu ms", "FCOS ms", "time ratio", "MuSu peak MiB"]
    headers += ["FCOS peak MiB", "memory ratio"]
    formats = ["", "", "", "", ".1f", ".1f", ".2f", ".1f", ".1f", ".2f"]
    keys = ["image", "A", "M", "R", "musu_ms", "fcos_ms", "time_ratio", "musu_peak_mib"]
    keys += ["fcos_peak_mib", "memory_ratio"]
    rows = [[format(r[k], f) for k, f in zip(keys, formats)] for r in records]
    memory_method = (
        "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "CPU allocator events via torch.profiler"
    )
    print(
        f"\n### MuSu assigner vs Detectron2 FCOS.label_anchors ({args.images} images per "
        f"row, strides {STRIDES}, C={NUM_CLASSES}, "
        f"MuSu pairs: {args.pairs})\n"
    )
    print(markdown_table(headers, rows))
    print(
        f"\nTimes: medians of {args.repeats} calls each, MuSu and FCOS interleaved in one run "
        f"(order alternating); time ratio = median of the per-repeat MuSu/FCOS ratios. "
        f"Peak: tensor memory allocated during one call above its inputs ({memory_method}). "
        f"Both sides label the same R anchor slots (at A > 1 FCOS labels each location's "
        f"point A times)."
    )
    print(f"\nEnvironment: {environment_summary(device)}")
    print(f"Command: `{command_line()}`")
    if args.json is not None:
        payload = {"command": command_line(), "environment": environment_summary(device)}
        payload["rows"] = records
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    quiet_warnings()
    set_torch_threads(args.threads)
    device = torch.device(args.device)

    assigner = build_musu_assigner(musu.build_config(args.config_file, args.opts))
    fcos = build_fcos(device)
    records = []
    for short_side in args.sizes:
        size = image_size(short_side)
        for num_objects in args.objects:
            for num_anchors in args.num_anchors:
                records.append(
                    measure(assigner, fcos, num_anchors, num_objects, size, args, device)
                )
                print(
                    f"measured {size[0]}x{size[1]} A={num_anchors} M={num_objects}",
                    file=sys.stderr,
                    flush=True,
                )
    print_results(records, args, device)


if __name__ == "__main__":
    main()
