#!/usr/bin/env python
"""AP and score/IoU consistency of each anchor slot of a trained MuSu model, alone and together.

    python tools/analysis/slot_consistency.py --config-file RUN/config.yaml \\
        --weights RUN/model_final.pth --dataset bccd_val

With ``MODEL.MUSU.NUM_ANCHORS`` A > 1 every location predicts A boxes. This runs the model on
``--dataset`` A + 1 times: with all slots, then with only slot a (a = 0..A-1): the other slots'
objectness logits are set to -inf by a forward hook on ``model.head``, so their scores are 0 and
inference drops them (the per-level top-k then fills from the kept slot). Each pass is
:func:`musu.evaluation.evaluate_checkpoint` (``tools/compare.py``'s evaluation): COCO AP with
the config's inference settings, and on the pre-NMS candidates (``musu.evaluation.PRE_NMS_OPTS``)
the consistency of ``musu.evaluation.consistency``.
When every slot alone ranks its own candidates better than all slots together, the slots'
scores are not comparable with each other (one slot outscores another that localizes better).
Prints one Markdown table; ``--output FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from detectron2.utils.logger import setup_logger
from torch import nn

import musu
from musu.cli import parse_tool_args, tool_argument_parser
from musu.data import register_coco_datasets
from musu.evaluation import evaluate_checkpoint
from musu.modeling import MuSu

COLUMNS = [  # (result key, header, format)
    ("AP", "AP", "{:.1f}"),
    ("AP50", "AP50", "{:.1f}"),
    ("AP75", "AP75", "{:.1f}"),
    ("APs", "APs", "{:.1f}"),
    ("spearman", "rank corr (pre-NMS)", "{:.3f}"),
    ("top1", "top-1 = best IoU (pre-NMS)", "{:.3f}"),
    ("top1_iou", "IoU of top-1", "{:.3f}"),
    ("best_iou", "best IoU", "{:.3f}"),
    ("mean_overlap", "candidates per object", "{:.1f}"),
]


@contextlib.contextmanager
def only_slots(model: MuSu, slots: Optional[Sequence[int]]) -> Iterator[None]:
    """Within the block, ``model``'s head gives objectness -inf to every anchor slot not in
    ``slots`` (``None``: keep all); the head's outputs are unchanged once the block exits."""
    if not isinstance(model, MuSu):
        raise SystemExit(f"{type(model).__name__} is not a MuSu model: it has no anchor slots")
    num_anchors = model.head.num_anchors
    if slots is None:
        yield
        return
    if not slots or any(not 0 <= s < num_anchors for s in slots):
        raise ValueError(f"slots must be a non-empty subset of 0..{num_anchors - 1}, got {slots}")
    dropped = torch.ones(num_anchors, dtype=torch.bool)
    dropped[list(slots)] = False

    def hook(module: nn.Module, inputs, outputs):
        logits, box_reg, objectness = outputs
        # objectness per level: (N, A, H, W)
        masked = [o.masked_fill(dropped.to(o.device)[None, :, None, None], -float("inf"))
                  for o in objectness]  # fmt: skip
        return logits, box_reg, masked

    handle = model.head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def measure(
    config_file: str, weights: str, dataset: str, opts: Sequence[str] = ()
) -> Dict[str, Dict[str, float]]:
    """``{"all slots" | "slot a": musu.evaluation.evaluate_checkpoint's row (AP..., spearman, top1,
    top1_iou, best_iou, mean_overlap, ...)}`` for ``weights`` on ``dataset``."""
    opts = list(opts) + ["DATASETS.TEST", f"('{dataset}',)"]
    cfg = musu.build_config(config_file, opts)
    selections: List[Optional[List[int]]] = [None]
    selections += [[a] for a in range(cfg.MODEL.MUSU.NUM_ANCHORS)]
    rows: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:  # COCOEvaluator's results files
        for slots in selections:
            name = "all slots" if slots is None else f"slot {slots[0]}"
            rows[name] = evaluate_checkpoint(
                config_file,
                weights,
                opts,
                Path(scratch) / name.replace(" ", "_"),
                model_context=lambda model, slots=slots: only_slots(model, slots),
            )
    return rows


def markdown(rows: Dict[str, Dict[str, float]], title: str) -> str:
    """The rows as a Markdown table under ``title``."""
    lines = [title, "", "| slots | " + " | ".join(h for _, h, _ in COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    for name, row in rows.items():
        values = [fmt.format(row[key]) if key in row else "-" for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line (:mod:`musu.cli`'s convention)."""
    parser = tool_argument_parser(__doc__)
    parser.add_argument(
        "--weights", required=True, metavar="FILE", help="the checkpoint (RUN/model_final.pth)"
    )
    parser.add_argument("--dataset", required=True, help="registered or built-in test set")
    parser.add_argument("--output", metavar="FILE", help="also write the table here")
    return parser


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    args = parse_tool_args(build_parser(), argv)
    setup_logger(name="detectron2")
    register_coco_datasets(args.register_coco)
    rows = measure(args.config_file, args.weights, args.dataset, args.opts)
    table = markdown(rows, f"Anchor slots of {args.weights} on {args.dataset}")
    print(table)
    if args.output:
        Path(args.output).write_text(table)
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
