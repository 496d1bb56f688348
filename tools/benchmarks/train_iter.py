"""Training iteration and inference time of MuSu against Detectron2's FCOS at equal architecture.

MuSu is built from ``--config-file`` with ``build_model``; FCOS (``detectron2.modeling.meta_arch.fcos``)
is built in Python on the same backbone builder (``build_musu_resnet_fpn_backbone``, same config)
with an ``FCOSHead`` of the same width, depth and norm (``[C_fpn] * MODEL.MUSU.NUM_CONVS``,
``MODEL.MUSU.NORM``), classes and inference settings. Inputs: ``--batch`` random images of
``--size`` px with 1 to ``--max-objects`` random COCO-like boxes each (deterministic seed).

A training iteration is zero_grad + forward (backbone, head, assignment, losses) + backward; the
optimizer step is left out (it is the same for both, up to the parameter count). Inference is
the eval-mode forward with post-processing (score threshold, top-k per level, NMS), per image.
Every repeat runs all models once, in an order rotated each repeat (interleaved); the table shows
medians and, as ratio to FCOS, the median of the per-repeat ratios.

By default the score threshold of both is 0 (``--score-thresh``): at random initialization
FCOS's sqrt(p * ctr) ~ 0.07 passes the config's 0.05 and MuSu's p * obj ~ 0.005 does not, so
with the config's threshold they would post-process very different numbers of candidates.

Inference time depends on the boxes NMS sees, and random-init boxes have nothing in common
(MuSu's start as 2s x 2s squares, FCOS's as near-empty boxes): ``--weights FCOS_CKPT MUSU_CKPT``
loads trained A = 1 checkpoints and ``--dataset NAME`` takes the inference images from a
registered dataset (resized to ``--size`` on the shorter side), so that post-processing works on
real detections; pass ``--score-thresh 0.05`` then, as the configs do.

``--precisions`` adds rows per precision and memory format: ``fp32``, ``fp32+cl`` (weights
channels-last, as ``MODEL.CHANNELS_LAST``), ``bf16`` and ``bf16+cl`` (forward under
``torch.autocast`` in bfloat16, as ``SOLVER.AMP.ENABLED`` / ``TEST.AMP.ENABLED`` on a CPU with
native bfloat16 or with ``SOLVER.AMP.CPU_BFLOAT16 always``), and ``amp``: what the config with
``SOLVER.AMP.ENABLED True`` / ``TEST.AMP.ENABLED True`` runs on this device, decided by
``musu.engine.amp.resolve_autocast`` (on a CPU without native bfloat16: float32); the script
prints what ``amp`` resolved to and why. Each row's ratio to FCOS is against FCOS at the same
precision; "ratio to fp32" is against the same model in fp32 (when listed).

Usage (from the repository root): ``python tools/benchmarks/train_iter.py [--num-anchors 1 3]
[--precisions fp32 fp32+cl bf16 bf16+cl]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
from typing import Callable, Dict, List, Optional, Tuple

import torch
from common import (  # tools/benchmarks/common.py: the script's folder is on sys.path
    build_fcos,
    build_musu,
    command_line,
    environment_summary,
    interleaved_timings,
    load_config,
    markdown_table,
    num_parameters,
    paired_ratio,
    quiet_warnings,
    random_boxes,
)
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from musu.cli import (
    add_threads_argument,
    non_negative_int,
    parse_tool_args,
    positive_int,
    probability,
    set_torch_threads,
    tool_argument_parser,
)
from musu.data.cli import register_coco_datasets
from musu.engine.amp import Autocast, autocast_context, resolve_autocast


def random_batch(
    batch: int, size: int, max_objects: int, num_classes: int, generator: torch.Generator
) -> List[Dict[str, object]]:
    """``batch`` dataset dicts: a (3, size, size) float image in [0, 255] and its Instances."""
    inputs = []
    for _ in range(batch):
        num_objects = int(torch.randint(1, max_objects + 1, (1,), generator=generator))
        boxes = random_boxes(num_objects, (size, size), generator, max_size=float(size))
        classes = torch.randint(num_classes, (num_objects,), generator=generator)
        image = torch.rand(3, size, size, generator=generator) * 255
        instances = Instances((size, size), gt_boxes=Boxes(boxes), gt_classes=classes)
        inputs.append({"image": image, "instances": instances})
    return inputs


def dataset_images(name: str, count: int, size: int) -> List[Dict[str, object]]:
    """The first ``count`` images of a registered dataset as (3, H, W) float tensors, shorter
    side resized to ``size`` (longer side at most 1333/800 times it), BGR as the configs expect."""
    from detectron2.data import DatasetCatalog
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T

    import musu.data  # noqa: F401  (registers the built-in datasets)

    resize = T.ResizeShortestEdge(size, max_size=round(size * 1333 / 800))
    images = []
    for record in DatasetCatalog.get(name)[:count]:
        image = utils.read_image(record["file_name"], format="BGR")
        image = resize.get_transform(image).apply_image(image)
        images.append({"image": torch.as_tensor(image.transpose(2, 0, 1).astype("float32"))})
    return images


def load_weights(model: nn.Module, path: str) -> None:
    """Load a Detectron2 checkpoint into ``model`` (the full state must match)."""
    from musu.engine import AtomicCheckpointer  # reads weights without running code

    AtomicCheckpointer(model).load(path)


PRECISIONS = ("fp32", "fp32+cl", "bf16", "bf16+cl", "amp")
VariantKey = Tuple[str, str]  # (model name, precision)


def with_precision(model: nn.Module, precision: str) -> nn.Module:
    """A copy of ``model`` whose weights are channels-last for the ``+cl`` precisions."""
    model = copy.deepcopy(model)
    if precision.endswith("+cl"):
        model.to(memory_format=torch.channels_last)
    return model


def amp_settings(cfg: CfgNode) -> Dict[str, Autocast]:
    """What ``SOLVER.AMP.ENABLED True`` (``"train"``) and ``TEST.AMP.ENABLED True``
    (``"inference"``) run with ``cfg``'s other settings on ``MODEL.DEVICE``."""
    cfg = cfg.clone()
    cfg.SOLVER.AMP.ENABLED = True
    cfg.TEST.AMP.ENABLED = True
    return {
        "train": resolve_autocast(cfg, training=True),
        "inference": resolve_autocast(cfg, training=False),
    }


def autocast_for(precision: str, device: torch.device, amp: Optional[Autocast] = None):
    """The forward-pass context of a precision: bfloat16 autocast, ``amp``'s setting for
    ``"amp"``, or nothing for fp32."""
    if precision == "amp":
        return autocast_context(amp)
    if precision.startswith("bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    batches: List[List[Dict[str, object]]],
    precision: str,
    device: torch.device,
    amp: Optional[Autocast] = None,
) -> Callable[[], None]:
    """A closure running one training iteration per call, cycling over the batches."""
    state = {"step": 0}

    def step() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        with EventStorage(state["step"]), autocast_for(precision, device, amp):
            losses = model(batches[state["step"] % len(batches)])
        sum(losses.values()).backward()
        state["step"] += 1

    return step


def inference_step(
    model: nn.Module,
    images: List[Dict[str, object]],
    precision: str,
    device: torch.device,
    amp: Optional[Autocast] = None,
) -> Callable[[], None]:
    """A closure running the eval-mode forward (with post-processing) of one batch per call."""

    def step() -> None:
        model.eval()
        with torch.no_grad(), autocast_for(precision, device, amp):
            model(images)

    return step


def build_parser() -> argparse.ArgumentParser:
    """The command line of this benchmark (musu.cli convention: --config-file, --register-coco
    for --dataset, trailing KEY VALUE overrides)."""
    parser = tool_argument_parser(__doc__.split("\n")[0], config_required=False)
    parser.set_defaults(config_file="configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--num-anchors", type=positive_int, nargs="+", default=[1, 3], help="MuSu A values"
    )
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--size", type=positive_int, default=256)
    parser.add_argument(
        "--max-objects", type=positive_int, default=10, help="objects per image: 1..this"
    )
    parser.add_argument(
        "--iters", type=positive_int, default=10, help="timed iterations of each model"
    )
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument(
        "--score-thresh", type=probability, default=0.0, help="test threshold of both"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    add_threads_argument(parser)
    parser.add_argument(
        "--weights",
        nargs=2,
        metavar=("FCOS_CKPT", "MUSU_CKPT"),
        default=None,
        help="trained checkpoints of FCOS and MuSu A=1 (then --num-anchors must be 1)",
    )
    parser.add_argument(
        "--dataset", default=None, help="registered dataset for the inference images"
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32"],
        choices=PRECISIONS,
        help="precision / memory-format variants, each a row per model",
    )
    return parser


def time_variants(
    args: argparse.Namespace, cfg: CfgNode, models: Dict[str, nn.Module], device: torch.device
) -> Tuple[Dict[VariantKey, List[float]], Dict[VariantKey, List[float]]]:
    """Seconds per training iteration and per inference batch of every (model, precision),
    measured interleaved."""
    variants = {
        (name, precision): with_precision(model, precision)
        for precision in args.precisions
        for name, model in models.items()
    }
    generator = torch.Generator().manual_seed(args.seed)
    num_classes = cfg.MODEL.MUSU.NUM_CLASSES
    batches = [
        random_batch(args.batch, args.size, args.max_objects, num_classes, generator)
        for _ in range(2)
    ]
    if args.dataset is None:
        test_images = [{"image": x["image"]} for x in batches[0]]
    else:
        test_images = dataset_images(args.dataset, args.batch, args.size)
    amp = amp_settings(cfg)
    train = interleaved_timings(
        {
            key: train_step(model, batches, key[1], device, amp["train"])
            for key, model in variants.items()
        },
        args.iters,
        args.warmup,
        device,
    )
    infer = interleaved_timings(
        {
            key: inference_step(model, test_images, key[1], device, amp["inference"])
            for key, model in variants.items()
        },
        args.iters,
        args.warmup,
        device,
    )
    return train, infer


def table_rows(
    args: argparse.Namespace,
    params: Dict[str, int],
    train: Dict[VariantKey, List[float]],
    infer: Dict[VariantKey, List[float]],
) -> List[List[str]]:
    """One row per (model, precision): medians and paired ratios to FCOS and to fp32."""

    def fp32_ratio(timings, name: str, precision: str) -> str:
        if "fp32" not in args.precisions:
            return "-"
        return f"{paired_ratio(timings[(name, precision)], timings[(name, 'fp32')]):.2f}"

    rows = []
    for name, precision in train:
        key, fcos = (name, precision), ("FCOS", precision)
        rows.append(
            [
                name,
                precision,
                f"{params[name]:,}",
                f"{statistics.median(train[key]):.3f}",
                f"{paired_ratio(train[key], train[fcos]):.2f}",
                fp32_ratio(train, name, precision),
                f"{statistics.median(infer[key]) / args.batch:.4f}",
                f"{paired_ratio(infer[key], infer[fcos]):.2f}",
                fp32_ratio(infer, name, precision),
            ]
        )
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args = parse_tool_args(parser, argv)
    register_coco_datasets(args.register_coco)
    if args.dataset is not None and args.dataset not in DatasetCatalog.list():
        parser.error(f"--dataset {args.dataset}: no such registered dataset")
    if args.weights is not None and args.num_anchors != [1]:
        parser.error("--weights loads A = 1 checkpoints: pass --num-anchors 1")
    quiet_warnings()
    set_torch_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    cfg = load_config(args.config_file, args.device, args.opts)

    models: Dict[str, nn.Module] = {"FCOS": build_fcos(cfg, args.score_thresh, args.seed)}
    for num_anchors in args.num_anchors:
        models[f"MuSu A={num_anchors}"] = build_musu(cfg, num_anchors, args.score_thresh, args.seed)
    if args.weights is not None:
        load_weights(models["FCOS"], args.weights[0])
        load_weights(models["MuSu A=1"], args.weights[1])
    params = {name: num_parameters(model) for name, model in models.items()}
    train, infer = time_variants(args, cfg, models, device)
    num_classes = cfg.MODEL.MUSU.NUM_CLASSES
    rows = table_rows(args, params, train, infer)
    print(
        f"\n### Training iteration and inference: MuSu vs Detectron2 FCOS ({args.config_file}, "
        f"batch {args.batch}, {args.size}x{args.size}, {num_classes} classes)\n"
    )
    headers = [
        "model",
        "precision",
        "params",
        "train s/iter",
        "train ratio to FCOS",
        "train ratio to fp32",
        "inference s/image",
        "inference ratio to FCOS",
        "inference ratio to fp32",
    ]
    print(markdown_table(headers, rows))
    print(
        f"\nMedians of {args.iters} timed iterations per model after {args.warmup} warm-up, all "
        f"models interleaved in one run (order rotated each repeat); ratios are medians of the "
        f"per-repeat ratios. Train = zero_grad + forward + assignment + losses + backward (no "
        f"optimizer step); inference = eval forward + post-processing of a batch of "
        f"{args.batch}, divided by {args.batch}; test score threshold {args.score_thresh} for both."
        f" Weights: {'trained ' + ' / '.join(args.weights) if args.weights else 'random init'};"
        f" inference images: {args.dataset or 'random'}."
    )
    if "MuSu A=1" in params:
        levels = len(cfg.MODEL.MUSU.IN_FEATURES)
        expected = params["FCOS"] + levels
        verdict = "OK" if params["MuSu A=1"] == expected else "MISMATCH"
        print(
            f"\nParameters: MuSu A=1 {params['MuSu A=1']:,} vs FCOS {params['FCOS']:,} + "
            f"{levels} levels (per-level scales) = {expected:,}: {verdict}"
        )
    if "amp" in args.precisions:
        for phase, setting in amp_settings(cfg).items():
            dtype = str(setting.dtype).replace("torch.", "") if setting.enabled else "float32"
            print(f"\n`amp` {phase}: {dtype} ({setting.reason})")
    print(f"\nEnvironment: {environment_summary(device)}")
    print(f"Command: `{command_line()}`")


if __name__ == "__main__":
    main()
