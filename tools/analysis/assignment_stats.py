#!/usr/bin/env python
"""Print what a MuSu model's assigner does on training images: ``assignment_diagnostics`` for
the training assigner (``musu/*``) and the shadow assigner (``musu_shadow/*``, the FCOS rule
unless ``MODEL.MUSU.SHADOW_ASSIGNER`` says otherwise), as two tables: the whole-batch
statistics, then the per-size-band ones (``<statistic>_<band>``, bands ``SIZE_BANDS`` by
sqrt(w * h) of the box at input resolution), a column per band and assigner, so that MuSu's bag
sits next to the FCOS rule's positives for small, medium and large objects.

    # at initialization (no weights): where the paper's 2s x 2s prior puts the candidate bags
    python tools/analysis/assignment_stats.py \\
        --config-file configs/BCCD/musu_paper_R_18_FPN_300it.yaml --images 32
    # a trained model, or another prior
    python tools/analysis/assignment_stats.py --config-file CFG --weights model_final.pth
    python tools/analysis/assignment_stats.py --config-file CFG MODEL.MUSU.INITIAL_BOX_SIZE 4.0

The first ``--images`` training images (dataset order, the training mapper's resize, no flip)
go through the model's training forward in batches of ``SOLVER.IMS_PER_BATCH``, without a
backward pass; each value is the mean over the batches where it was logged (a size band's
values: over the batches with objects of that band; ``-``: never logged). Over training, the same scalars are in the
run's ``metrics.json`` (``tools/analysis/visualize.py assignment-stats`` plots them).
"""

from __future__ import annotations

import argparse
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import transforms as T
from detectron2.utils.events import EventStorage

from musu import build_config
from musu.cli import parse_tool_args, positive_int, tool_argument_parser
from musu.data import register_coco_datasets
from musu.model_zoo import load_model
from musu.modeling import MuSu
from musu.size_bands import SIZE_BANDS

PREFIXES = ("musu", "musu_shadow")


def collect(cfg, weights: Optional[str], num_images: int) -> Dict[str, Dict[str, float]]:
    """``{prefix: {statistic: mean over batches}}`` for the first ``num_images`` images of
    ``DATASETS.TRAIN[0]``; the model is in training mode (batch statistics in BN)."""
    model = load_model(cfg, weights)  # None: MODEL.WEIGHTS ("" in the small-data configs)
    if not isinstance(model, MuSu):
        raise SystemExit(f"{cfg.MODEL.META_ARCHITECTURE} is not a MuSu model: no assigner to show")
    augmentations = [
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN[0], cfg.INPUT.MAX_SIZE_TRAIN, "choice")
    ]
    mapper = DatasetMapper(cfg, is_train=True, augmentations=augmentations)
    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:num_images]
    batch_size = cfg.SOLVER.IMS_PER_BATCH
    sums: Dict[str, Dict[str, List[float]]] = {p: {} for p in PREFIXES}
    model.train()
    for start in range(0, len(records), batch_size):
        batch = [mapper(r) for r in records[start : start + batch_size]]
        with EventStorage() as storage, torch.no_grad():
            model(batch)
            for key, (value, _) in storage.latest().items():
                prefix, _, name = key.partition("/")
                if prefix in sums:
                    sums[prefix].setdefault(name, []).append(value)
    return {p: {k: sum(v) / len(v) for k, v in stats.items()} for p, stats in sums.items() if stats}


def _split_band(name: str) -> Tuple[str, Optional[str]]:
    """``("members_mean", "medium")`` for ``members_mean_medium``; ``(name, None)`` without a
    band suffix."""
    for band, _, _ in SIZE_BANDS:
        if name.endswith(f"_{band}"):
            return name[: -len(band) - 1], band
    return name, None


def _natural(name: str) -> List[object]:
    """Sort key ordering the numbers inside names by value (``s8`` before ``s16``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def table(stats: Dict[str, Dict[str, float]]) -> str:
    """Markdown: a row per whole-batch statistic, a column per prefix."""
    prefixes = list(stats)
    names = {n for values in stats.values() for n in values if _split_band(n)[1] is None}
    rows = [
        [name, *(f"{stats[p][name]:.3f}" if name in stats[p] else "-" for p in prefixes)]
        for name in sorted(names, key=_natural)
    ]
    return _markdown(["statistic", *prefixes], rows)


def band_table(stats: Dict[str, Dict[str, float]]) -> str:
    """Markdown: a row per size-band statistic, a column per (band, prefix), bands in
    ``SIZE_BANDS`` order; empty string when no band statistic was logged."""
    prefixes = list(stats)
    split = [_split_band(n) for values in stats.values() for n in values]
    names = sorted({name for name, band in split if band is not None}, key=_natural)
    if not names:
        return ""
    columns = [(band, p) for band, _, _ in SIZE_BANDS for p in prefixes]
    rows = []
    for name in names:
        keys = [(p, f"{name}_{band}") for band, p in columns]
        rows.append([name, *(f"{stats[p][k]:.3f}" if k in stats[p] else "-" for p, k in keys)])
    return _markdown(["statistic", *(f"{band} {p}" for band, p in columns)], rows)


def build_parser() -> argparse.ArgumentParser:
    """The command line (:mod:`musu.cli`'s convention)."""
    parser = tool_argument_parser(__doc__)
    parser.add_argument("--weights", default=None, help="checkpoint; default: initialization")
    parser.add_argument(
        "--images", type=positive_int, default=32, help="training images to run (default 32)"
    )
    parser.add_argument(
        "--shadow",
        default="build_fcos_assigner",
        help="MODEL.MUSU.SHADOW_ASSIGNER unless the config sets one",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    args = parse_tool_args(build_parser(), argv)
    register_coco_datasets(args.register_coco)
    cfg = build_config(args.config_file, ["MODEL.DEVICE", "cpu", *args.opts], freeze=False)
    if not cfg.MODEL.MUSU.SHADOW_ASSIGNER:
        cfg.MODEL.MUSU.SHADOW_ASSIGNER = args.shadow
    cfg.freeze()
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    stats = collect(cfg, args.weights, args.images)
    print(f"{args.config_file} {' '.join(args.opts)} weights={args.weights or 'initialization'}")
    print(f"assigner {cfg.MODEL.MUSU.ASSIGNER}; shadow {cfg.MODEL.MUSU.SHADOW_ASSIGNER}")
    print(table(stats))
    bands = band_table(stats)
    if bands:
        limits = ", ".join(f"{name} [{low:g}, {high:g})" for name, low, high in SIZE_BANDS)
        print(f"\nper size band, sqrt(w * h) of the box in input pixels: {limits}")
        print(bands)
    return stats


if __name__ == "__main__":
    main()
