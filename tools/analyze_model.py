#!/usr/bin/env python
"""Parameters, FLOPs, activations and structure of the model of any musu or project config.

Tasks (--tasks, one or more):
  parameter    parameters per module, as a table (fvcore's parameter_count_table)
  flop         FLOPs of one inference, total and per module (Detectron2's FlopCountAnalysis)
  activation   activations (output elements) of one inference, per operator type
  structure    the model as PyTorch prints it
Inputs for flop / activation: --num-inputs images of --dataset through the config's test loader
(averaged), or, without --dataset, one blank image of --input-size HEIGHT WIDTH (default: a
square of the config's INPUT.MIN_SIZE_TEST). The model is built in evaluation mode from the
config alone (random weights: the counts do not depend on them); MODEL.DEVICE defaults to cpu.

    python tools/analyze_model.py --config-file configs/Synthetic/musu_R_18_FPN_synthetic.yaml \\
        --tasks flop parameter
    python tools/analyze_model.py --config-file configs/COCO-Detection/musu_R_50_FPN_1x.yaml \\
        --tasks flop activation --input-size 800 1216
    python tools/analyze_model.py --config-file configs/BCCD/musu_R_18_FPN_bccd.yaml \\
        --tasks flop --dataset bccd_val --num-inputs 10
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis, activation_count_operators
from fvcore.nn import flop_count_table, parameter_count_table

import musu
from musu.cli import parse_tool_args, positive_int, tool_argument_parser
from musu.data import register_coco_datasets

TASKS = ("parameter", "flop", "activation", "structure")


def build_parser() -> argparse.ArgumentParser:
    """The command line (:mod:`musu.cli`'s convention)."""
    parser = tool_argument_parser(__doc__)
    parser.add_argument(
        "--tasks", nargs="+", choices=TASKS, required=True, help="what to report (one or more)"
    )
    parser.add_argument("--dataset", metavar="NAME", help="images for flop / activation")
    parser.add_argument(
        "--num-inputs", type=positive_int, default=10, help="images of --dataset (default 10)"
    )
    parser.add_argument(
        "--input-size",
        nargs=2,
        type=positive_int,
        metavar=("HEIGHT", "WIDTH"),
        help="blank image size without --dataset (default: INPUT.MIN_SIZE_TEST square)",
    )
    parser.add_argument(
        "--max-depth", type=positive_int, default=3, help="module depth of the tables (3)"
    )
    return parser


def model_inputs(cfg: CfgNode, args: argparse.Namespace) -> tuple[list[list[dict]], str]:
    """Batches of one image each for the counters, and a line saying what they are."""
    if args.dataset:
        loader = build_detection_test_loader(cfg, args.dataset)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == args.num_inputs:
                break
        if not batches:
            raise ValueError(f"--dataset {args.dataset} holds no image")
        return batches, f"{len(batches)} image(s) of {args.dataset} (test loader), averaged"
    height, width = args.input_size or (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    return [
        [{"image": image, "height": height, "width": width}]
    ], f"one blank {height}x{width} image"


def count_flops(
    model: torch.nn.Module, batches: list, max_depth: int
) -> tuple[float, dict[str, float], str]:
    """Mean FLOPs per image (fvcore counts one multiply-add as one flop), the mean per module
    (by the model's module names), and the per-module table of the first batch."""
    totals, by_module = [], Counter()
    table = ""
    for batch in batches:
        analysis = FlopCountAnalysis(model, batch)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        totals.append(analysis.total())
        by_module.update(analysis.by_module())
        if not table:
            table = flop_count_table(analysis, max_depth=max_depth)
    # Detectron2's FlopCountAnalysis traces the model inside an adapter named "model".
    means = {
        name.removeprefix("model."): value / len(batches)
        for name, value in by_module.items()
        if name not in ("", "model")
    }
    return float(np.mean(totals)), means, table


def count_activations(model: torch.nn.Module, batches: list) -> dict[str, float]:
    """Mean activations per image, in millions, per operator type."""
    counts: Counter = Counter()
    for batch in batches:
        counts.update(activation_count_operators(model, batch))
    return {op: value / len(batches) for op, value in counts.items()}


def run_counters(
    model: torch.nn.Module, batches: list, source: str, args: argparse.Namespace, results: dict
) -> None:
    """The flop / activation tasks: fill ``results`` and print the tables."""
    with torch.no_grad():
        if "flop" in args.tasks:
            flops, by_module, table = count_flops(model, batches, args.max_depth)
            results.update(flops=flops, flops_by_module=by_module)
            print(f"\nFLOPs ({source}): {results['flops'] / 1e9:.3f} G per image")
            print(table)
        if "activation" in args.tasks:
            results["activations"] = count_activations(model, batches)
            total = sum(results["activations"].values())
            print(f"\nActivations ({source}): {total:.3f} M per image")
            for op, value in sorted(results["activations"].items(), key=lambda kv: -kv[1]):
                print(f"  {op}: {value:.3f} M")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_tool_args(build_parser(), argv)
    register_coco_datasets(args.register_coco)
    cfg = musu.build_config(args.config_file, ["MODEL.DEVICE", "cpu", *args.opts])
    model = build_model(cfg).eval()
    results: dict[str, Any] = {}
    print(f"{args.config_file}: {cfg.MODEL.META_ARCHITECTURE}")
    if "parameter" in args.tasks:
        results["parameters"] = sum(p.numel() for p in model.parameters())
        print(f"\nParameters: {results['parameters'] / 1e6:.3f} M")
        print(parameter_count_table(model, max_depth=args.max_depth))
    if {"flop", "activation"} & set(args.tasks):
        batches, source = model_inputs(cfg, args)
        try:
            run_counters(model, batches, source, args, results)
        except NotImplementedError as error:  # e.g. deformable convolution has no CPU kernel
            raise SystemExit(
                f"{args.config_file}: the model does not run on MODEL.DEVICE {cfg.MODEL.DEVICE} "
                f"({error}); count flop / activation with MODEL.DEVICE cuda on a GPU machine "
                "(parameter and structure need no forward pass)"
            ) from error
    if "structure" in args.tasks:
        results["structure"] = str(model)
        print("\nStructure:\n" + results["structure"])
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
