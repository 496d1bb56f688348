#!/usr/bin/env python
"""Train and evaluate detectors side by side with identical budgets; print one table.

    python tools/compare.py --config-file configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml \\
        configs/Synthetic/fcos_R_18_FPN_1200it.yaml \\
        --dataset synthetic --output /tmp/runs/compare/synthetic [KEY VALUE ...]
    python tools/compare.py --config-file CFG_A CFG_B --eval-only \\
        --checkpoints A/model_final.pth B/model_final.pth --output DIR

How it runs (per config, one after the other):

1. Training: a subprocess running the root ``train_net.py`` exactly as a user would
   (``train_net.py --config-file CFG [--register-coco ...] OUTPUT_DIR <output>/<config name>
   [opts]``). Its stdout/stderr go to ``<run dir>/train_stdout.log``.
   With ``--reuse`` a run dir that already holds ``model_final.pth`` is not trained again.
   SIGTERM / SIGINT go on to the training, which saves its last iteration and exits; the script
   then exits with status 128 + signal (no orphaned training).
   The subprocess gets ``DATASETS.TEST ()`` (no evaluation inside training: step 2 evaluates)
   unless ``--train-eval`` is given (then ``TEST.EVAL_PERIOD`` evaluations land in metrics.json,
   which ``tools/analysis/visualize.py curves`` plots as AP curves).
2. Evaluation, in-process, on the config's ``DATASETS.TEST[0]`` (or ``--dataset``):
   pass 1 with the config's own inference settings: ``COCOEvaluator`` (AP...) and wall-clock
   model time per image (batch 1, after ``--warmup`` images), AP50 / AP75 and the object count
   per COCO size band (``musu.evaluation.evaluate_size_bands``); pass 2 with NMS disabled
   (``musu.evaluation.PRE_NMS_OPTS``): ``ConsistencyEvaluator`` on the pre-NMS candidates.
3. Training s/iter: median of the ``time`` entries (Detectron2's per-iteration time, a
   20-iteration median) in the run's ``metrics.json``, skipping the first ``--skip-iters``.

Outputs ``<output>/compare.md`` and ``<output>/compare.json`` and prints the Markdown table.
With ``--seeds 0 1 ...`` every config is trained once per seed (``SEED s``, run dir
``<config name>_seed<s>``); the table then has a row per run and a second table the mean and
spread (sample standard deviation, min-max) per method. A training that stops on a non-finite
loss (Detectron2's ``FloatingPointError``) is recorded as diverged, not evaluated, and counted
in that summary; any other training failure stops the script.
Datasets: ``--dataset synthetic`` / ``bccd`` / ``cards`` (built-in), ``--dataset TRAIN,TEST``
(registered names), or ``--register-coco NAME JSON IMAGE_ROOT`` (repeatable) for any COCO-format
folder.
Overrides (``KEY VALUE`` after all options, or after ``--opts``) apply to every config.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from musu.cli import non_negative_int, output_folder, parse_tool_args, tool_argument_parser
from musu.data import register_coco_datasets
from musu.engine import forward_signals_to_children, train_seconds_per_iter
from musu.evaluation import evaluate_checkpoint

logger = logging.getLogger("musu.compare")

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILTIN = {
    "synthetic": ("musu_synthetic_train", "musu_synthetic_val"),
    "bccd": ("bccd_train", "bccd_val"),
    "cards": ("cards_train", "cards_val"),
}
COLUMNS = [
    ("AP", "AP", "{:.1f}"),
    ("AP50", "AP50", "{:.1f}"),
    ("AP75", "AP75", "{:.1f}"),
    ("APs", "APs", "{:.1f}"),
    ("APm", "APm", "{:.1f}"),
    ("APl", "APl", "{:.1f}"),
    (("AP50-small", "AP75-small"), "AP50 / AP75 small", "{:.1f}"),
    (("AP50-medium", "AP75-medium"), "AP50 / AP75 medium", "{:.1f}"),
    (("AP50-large", "AP75-large"), "AP50 / AP75 large", "{:.1f}"),
    (("objects-small", "objects-medium", "objects-large"), "objects s / m / l", "{}"),
    ("train_s_per_iter", "train s/iter", "{:.3f}"),
    ("infer_s_per_image", "infer s/img", "{:.4f}"),
    ("spearman", "rank corr (pre-NMS)", "{:.3f}"),
    ("top1", "top-1 = best IoU (pre-NMS)", "{:.3f}"),
    (("top1_iou", "best_iou"), "IoU of top-1 / best", "{:.3f}"),
    ("num_evaluated", "objects (>=2 cand.)", "{}"),
]


def dataset_names(dataset: Optional[str]) -> Optional[tuple]:
    """(train, test) names for --dataset, or None to keep each config's own."""
    if dataset is None:
        return None
    if dataset in BUILTIN:
        return BUILTIN[dataset]
    names = tuple(n.strip() for n in dataset.split(","))
    if len(names) != 2 or not all(names):
        raise ValueError(f"--dataset must be synthetic, bccd, cards or TRAIN,TEST; got {dataset!r}")
    return names


def dataset_opts(dataset: Optional[str]) -> List[str]:
    """Config overrides selecting --dataset (train/test names and class count)."""
    names = dataset_names(dataset)
    if names is None:
        return []
    train, test = names
    opts = ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{test}',)"]
    classes = MetadataCatalog.get(train).get("thing_classes", None)
    if classes is None:  # registered COCO sets fill thing_classes when first loaded
        DatasetCatalog.get(train)
        classes = MetadataCatalog.get(train).get("thing_classes", None)
    if classes:
        opts += ["MODEL.MUSU.NUM_CLASSES", str(len(classes))]
    return opts


def train_command(
    config_file: str, run_dir: Path, opts: Sequence[str], registered: Sequence[Sequence[str]]
) -> List[str]:
    """The subprocess command: the root train_net.py, exactly as a user runs it."""
    register = [arg for triple in registered for arg in ("--register-coco", *triple)]
    return [
        sys.executable,
        str(REPO_ROOT / "train_net.py"),
        "--config-file",
        str(config_file),
        *register,
        *opts,
        "OUTPUT_DIR",
        str(run_dir),
    ]


class Diverged(RuntimeError):
    """The training stopped on a non-finite loss."""


def train(
    config_file: str, run_dir: Path, opts: Sequence[str], registered: list, evaluate: bool = False
) -> float:
    """Train through train_net.py in a subprocess; returns wall seconds. Raises ``Diverged``
    when it stopped on a non-finite loss, ``RuntimeError`` on any other failure."""
    run_dir.mkdir(parents=True, exist_ok=True)
    opts = list(opts) + ([] if evaluate else ["DATASETS.TEST", "()"])
    command = train_command(config_file, run_dir, opts, registered)
    logger.info("Training: %s", " ".join(command[3:]))
    start = time.perf_counter()
    with open(run_dir / "train_stdout.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=log)
        with forward_signals_to_children(pids=lambda: [process.pid]) as received:
            returncode = process.wait()
    where = f"see {run_dir}/train_stdout.log"
    if received:  # the training saved its last iteration and stopped: so does this script
        name = signal.Signals(received[0]).name
        logger.error("Stopped by %s; %s for the checkpoint and the resume command", name, where)
        raise SystemExit(128 + received[0])
    if returncode != 0:
        if "FloatingPointError" in (run_dir / "train_stdout.log").read_text(errors="replace"):
            raise Diverged(f"training diverged (non-finite loss); {where}")
        raise RuntimeError(f"training failed ({returncode}); {where}")
    return time.perf_counter() - start


def _format(value, fmt: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if fmt == "{}" and isinstance(value, float) and value.is_integer():
        return str(int(value))
    return fmt.format(value)


def markdown_table(rows: Dict[str, Dict[str, float]]) -> str:
    """One Markdown table: a row per method, the COLUMNS above (a tuple of keys: one cell,
    their values joined by " / ")."""
    header = "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, row in rows.items():
        cells = []
        for keys, _, fmt in COLUMNS:
            keys = keys if isinstance(keys, tuple) else (keys,)
            cells.append(" / ".join(_format(row.get(k, float("nan")), fmt) for k in keys))
        label = f"{name} (diverged)" if row.get("diverged") else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SUMMARY_COLUMNS = [("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("spearman", "rank corr"),
                   ("top1", "top-1 = best IoU")]  # fmt: skip


def seed_summary(rows: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, object]]:
    """Per method (rows named ``<method>_seed<s>``): runs, diverged runs and, over the runs that
    finished, mean, sample standard deviation (0 for one run), min and max of each summary
    column."""
    methods: Dict[str, List[Dict[str, float]]] = {}
    for name, row in rows.items():
        methods.setdefault(name.rsplit("_seed", 1)[0], []).append(row)
    summary: Dict[str, Dict[str, object]] = {}
    for method, runs in methods.items():
        finished = [r for r in runs if not r.get("diverged")]
        entry: Dict[str, object] = {"runs": len(runs), "diverged": len(runs) - len(finished)}
        for key, _ in SUMMARY_COLUMNS:
            values = [float(r[key]) for r in finished if key in r]
            if values:
                mean = sum(values) / len(values)
                var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
                entry[key] = {"mean": mean, "std": math.sqrt(var), "min": min(values),
                              "max": max(values), "n": len(values)}  # fmt: skip
        summary[method] = entry
    return summary


def summary_table(summary: Dict[str, Dict[str, object]]) -> str:
    """Markdown: a row per method, ``mean ± std (min-max)`` per column."""
    header = "| method | runs (diverged) | " + " | ".join(t for _, t in SUMMARY_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(SUMMARY_COLUMNS) + 2)]
    for method, entry in summary.items():
        cells = [f"{entry['runs']} ({entry['diverged']})"]
        for key, _ in SUMMARY_COLUMNS:
            stats = entry.get(key)
            fmt = "{:.1f}" if key.startswith("AP") else "{:.3f}"
            if not stats:
                cells.append("n/a")
                continue
            m, sd, lo, hi = (fmt.format(stats[k]) for k in ("mean", "std", "min", "max"))
            cells.append(f"{m} ± {sd} ({lo}-{hi})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line (:mod:`musu.cli`'s convention, one or more configs)."""
    parser = tool_argument_parser(__doc__, several_configs=True)
    parser.add_argument(
        "--dataset", default=None, help="synthetic | bccd | cards | TRAIN,TEST names"
    )
    parser.add_argument(
        "--output", type=output_folder, default="/tmp/runs/compare", help="output folder"
    )
    parser.add_argument(
        "--max-iter", type=non_negative_int, default=0, help="SOLVER.MAX_ITER of all; 0: keep"
    )
    parser.add_argument(
        "--seeds", type=non_negative_int, nargs="+", default=None,
        help="train every config once per seed (SEED s); adds a mean / spread table",
    )  # fmt: skip
    parser.add_argument("--eval-only", action="store_true", help="evaluate --checkpoints only")
    parser.add_argument("--checkpoints", nargs="*", default=[], help="one per config")
    parser.add_argument("--reuse", action="store_true", help="skip training if final exists")
    parser.add_argument("--train-eval", action="store_true", help="let train_net.py evaluate")
    parser.add_argument(
        "--warmup", type=non_negative_int, default=5, help="images not timed at inference"
    )
    parser.add_argument(
        "--max-eval-images", type=non_negative_int, default=0, help="0: whole test set"
    )
    parser.add_argument(
        "--skip-iters", type=non_negative_int, default=20, help="iterations not timed"
    )
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_tool_args(parser, argv)
    args.register_coco = args.register_coco or []
    if args.eval_only and len(args.checkpoints) != len(args.config_file):
        parser.error("--eval-only needs one --checkpoints path per --config-file")
    if args.eval_only and args.seeds:
        parser.error("--seeds trains; with --eval-only give the checkpoints instead")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    register_coco_datasets(args.register_coco)
    opts = dataset_opts(args.dataset) + list(args.opts)
    if args.max_iter > 0:
        opts += ["SOLVER.MAX_ITER", str(args.max_iter)]
    output = Path(args.output)
    rows: Dict[str, Dict[str, float]] = {}
    seeds = args.seeds or [None]
    for index, config_file in enumerate(args.config_file):
        for seed in seeds:
            name = Path(config_file).stem + ("" if seed is None else f"_seed{seed}")
            run_opts = opts + ([] if seed is None else ["SEED", str(seed)])
            rows[name] = run_one(args, index, config_file, output / name, run_opts)
            logger.info("%s: %s", name, rows[name])
    table = markdown_table(rows)
    output.mkdir(parents=True, exist_ok=True)
    result: Dict[str, object] = dict(rows)
    if args.seeds:
        summary = seed_summary(rows)
        table += "\n" + summary_table(summary)
        result = {"runs": rows, "summary": summary}
    (output / "compare.md").write_text(table)
    (output / "compare.json").write_text(json.dumps(result, indent=2, default=float))
    print(table)
    return rows


def run_one(
    args: argparse.Namespace, index: int, config_file: str, run_dir: Path, opts: List[str]
) -> Dict[str, float]:
    """Train (unless --eval-only or --reuse finds it done) and evaluate one run; a diverged
    training gives ``{"diverged": True}`` and the error, no evaluation."""
    seconds = float("nan")
    if args.eval_only:
        checkpoint = args.checkpoints[index]
        metrics = Path(checkpoint).resolve().parent / "metrics.json"
    else:
        checkpoint = str(run_dir / "model_final.pth")
        metrics = run_dir / "metrics.json"
        if not (args.reuse and Path(checkpoint).is_file()):
            try:
                seconds = train(config_file, run_dir, opts, args.register_coco, args.train_eval)
            except Diverged as error:
                logger.error("%s: %s", run_dir.name, error)
                return {"diverged": True, "error": str(error), "config": str(config_file)}
            logger.info("%s trained in %.0f s", run_dir.name, seconds)
    row = evaluate_checkpoint(
        config_file, checkpoint, opts, run_dir, args.warmup, args.max_eval_images
    )
    row["train_s_per_iter"] = train_seconds_per_iter(metrics, args.skip_iters)
    row.update(config=str(config_file), checkpoint=str(checkpoint))
    row["train_wall_s"] = seconds  # nan when not trained here
    return row


if __name__ == "__main__":
    main()
