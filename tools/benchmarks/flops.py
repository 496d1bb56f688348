"""Parameters and FLOPs (fvcore) of MuSu with A = 1..5 anchor slots against Detectron2's FCOS.

Both are built from the same config (default: the paper's R-50 FPN setting,
``configs/COCO-Detection/musu_R_50_FPN_1x.yaml``, 80 classes, GN heads of 4 x 256 channels):
MuSu with ``MODEL.MUSU.NUM_ANCHORS A`` and Detectron2's own FCOS through the ``D2FCOS`` adaptor.
FLOPs are fvcore's counts (one fused multiply-add = one flop, the convention of the paper's
Table 7 and of Detectron2's ``flop_count_operators``) of the network, backbone + FPN + head, on
one 3 x 800 x 1333 image padded to 800 x 1344 as ``ImageList`` does; post-processing (top-k,
NMS) is not counted. Parameters: every parameter of the model, trainable or not.

Usage (from the repository root): ``python tools/benchmarks/flops.py [--num-anchors 1 2 3 4 5]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
from common import (
    build_fcos,
    build_musu,
    command_line,
    environment_summary,
    load_config,
    markdown_table,
    num_parameters,
    quiet_warnings,
)
from detectron2.config import CfgNode
from fvcore.nn import FlopCountAnalysis
from torch import Tensor, nn

from musu.cli import (
    add_threads_argument,
    parse_tool_args,
    positive_int,
    set_torch_threads,
    tool_argument_parser,
)

# The paper's Table 7 (R-50, 1333 x 800): (params in M, GFLOPs) per model.
PAPER_TABLE_7 = {
    "FCOS": (32.07, 205.3),
    "MuSu A=1": (32.07, 205.3),
    "MuSu A=2": (32.27, 209.5),
    "MuSu A=3": (32.46, 213.7),
    "MuSu A=4": (32.66, 217.8),
    "MuSu A=5": (32.85, 222.0),
}


class DenseNetwork(nn.Module):
    """Backbone + head of a Detectron2 dense detector on a normalized, padded image tensor."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone = detector.backbone
        self.head = detector.head
        self.in_features = list(detector.head_in_features)

    def forward(self, images: Tensor) -> List[Tensor]:
        features = self.backbone(images)
        outputs = self.head([features[name] for name in self.in_features])
        return [level for per_output in outputs for level in per_output]


def count(model: nn.Module, images: Tensor) -> Dict[str, float]:
    """Parameters (M) of the whole detector and GFLOPs of its network on ``images``."""
    network = DenseNetwork(model).eval()
    analysis = FlopCountAnalysis(network, images)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with torch.no_grad():
        total = analysis.total()
        by_module = analysis.by_module()
    return {
        "params_m": num_parameters(model) / 1e6,
        "gflops": total / 1e9,
        "head_gflops": by_module.get("head", 0) / 1e9,
        "head_params_m": sum(p.numel() for p in model.head.parameters()) / 1e6,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line (musu.cli convention: --config-file, trailing KEY VALUE overrides)."""
    parser = tool_argument_parser(__doc__.split("\n")[0], config_required=False, reads_data=False)
    parser.set_defaults(config_file="configs/COCO-Detection/musu_R_50_FPN_1x.yaml")
    parser.add_argument("--num-anchors", type=positive_int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--height", type=positive_int, default=800)
    parser.add_argument("--width", type=positive_int, default=1333)
    add_threads_argument(parser)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    return parser


def _build_models(cfg: CfgNode, num_anchors: List[int]) -> Dict[str, nn.Module]:
    """Detectron2's FCOS, then MuSu for each anchor number, all from ``cfg`` (seed 0)."""
    models = {"FCOS": build_fcos(cfg, cfg.MODEL.MUSU.SCORE_THRESH_TEST, seed=0)}
    for anchors in num_anchors:
        models[f"MuSu A={anchors}"] = build_musu(
            cfg, anchors, cfg.MODEL.MUSU.SCORE_THRESH_TEST, seed=0
        )
    return models


def _records(
    models: Dict[str, nn.Module], images: Tensor, with_paper: bool
) -> List[Dict[str, object]]:
    """One row per model: its counts, the paper's Table 7 values (when ``with_paper``, else
    None) and the increments over the first model (FCOS) and over the paper's FCOS."""
    records = []
    for name, model in models.items():
        row = {"model": name, **count(model, images)}
        paper = PAPER_TABLE_7.get(name) if with_paper else None
        row["paper_params_m"], row["paper_gflops"] = paper if paper else (None, None)
        records.append(row)
    base = records[0]
    for row in records:
        row["params_increment_m"] = row["params_m"] - base["params_m"]
        row["gflops_increment"] = row["gflops"] - base["gflops"]
        if row["paper_params_m"] is not None:
            row["paper_params_increment_m"] = row["paper_params_m"] - PAPER_TABLE_7["FCOS"][0]
            row["paper_gflops_increment"] = row["paper_gflops"] - PAPER_TABLE_7["FCOS"][1]
    return records


def _cell(value: Optional[float], fmt: str) -> str:
    """``value`` formatted with ``fmt``, or ``-`` when it is None."""
    return "-" if value is None else format(value, fmt)


def _markdown(records: List[Dict[str, object]]) -> str:
    """The records as a Markdown table of parameters and GFLOPs next to the paper's."""
    headers = ["model", "params M", "+ vs FCOS", "paper params M", "paper +"]
    headers += ["GFLOPs", "+ vs FCOS", "paper GFLOPs", "paper +", "head GFLOPs"]
    rows = [
        [
            r["model"],
            _cell(r["params_m"], ".2f"),
            _cell(r["params_increment_m"], "+.3f"),
            _cell(r["paper_params_m"], ".2f"),
            _cell(r.get("paper_params_increment_m"), "+.2f"),
            _cell(r["gflops"], ".1f"),
            _cell(r["gflops_increment"], "+.2f"),
            _cell(r["paper_gflops"], ".1f"),
            _cell(r.get("paper_gflops_increment"), "+.1f"),
            _cell(r["head_gflops"], ".1f"),
        ]
        for r in records
    ]
    return markdown_table(headers, rows)


def main(argv: Optional[List[str]] = None) -> None:
    """Count both models, print the table, and write the rows as JSON if asked."""
    args = parse_tool_args(build_parser(), argv)
    quiet_warnings()
    set_torch_threads(args.threads)
    cfg = load_config(args.config_file, "cpu", args.opts)
    cfg.MODEL.WEIGHTS = ""
    padded = [((side + 31) // 32) * 32 for side in (args.height, args.width)]
    images = torch.zeros(1, 3, *padded)  # (1, 3, H_pad, W_pad), the content does not matter

    models = _build_models(cfg, args.num_anchors)
    records = _records(models, images, args.config_file.endswith("musu_R_50_FPN_1x.yaml"))
    print(
        f"\n### Parameters and FLOPs ({args.config_file}, one {args.height}x{args.width} image padded "
        f"to {padded[0]}x{padded[1]}; fvcore, 1 flop = 1 multiply-add)\n"
    )
    print(_markdown(records))
    print(f"\nEnvironment: {environment_summary(torch.device('cpu'))}")
    print(f"Command: `{command_line()}`")
    if args.json is not None:
        payload = {"command": command_line(), "rows": records}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
