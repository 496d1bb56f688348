#!/usr/bin/env python
"""Publish a training run's weights to MuSu's model zoo.

python tools/publish_model.py --run-dir /tmp/runs/zoo/synthetic \\
    --name Synthetic/musu_R_18_FPN_synthetic --output /path/to/mirror [--update-table] \\
    [--config-file RUN/config.yaml] [KEY VALUE ...]
python tools/publish_model.py --print-table     # MODEL_ZOO.md's table, from models.json

Reads ``<run-dir>/model_final.pth`` (or ``--checkpoint``), keeps only the model's state dict
(optimizer, scheduler and iteration state are dropped) and writes
``<output>/<name>/model_final_<sha256 prefix>.pth`` plus ``metrics.json`` (box AP of the run's
last evaluation, train s/iter from Detectron2's ``metrics.json`` ``time`` field, inference s/im
from ``log.txt``). Prints the ``MODEL_ZOO.md`` row and the ``musu/model_zoo/models.json`` record;
``--update-table`` writes that record into the table file. Upload the ``<name>/`` folder to the
release location (``musu.model_zoo.DEFAULT_MODEL_ZOO_URL``) or to your own mirror
(``MUSU_MODEL_ZOO_URL``), then paste ``--print-table``'s output into MODEL_ZOO.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml
from detectron2.config import CfgNode

from musu.cli import output_folder, parse_tool_args, tool_argument_parser
from musu.engine import atomic_write, read_metrics_json, train_seconds_per_iter
from musu.model_zoo.file_io import (
    DEFAULT_MODEL_ZOO_URL,
    HASH_PREFIX_LENGTH,
    PREFIX,
    validate_checkpoint,
)
from musu.model_zoo.table import TABLE_FILE, ModelZooEntry, entry_record, read_table

logger = logging.getLogger("musu.publish_model")

AUTHOR = "musu model zoo"
TABLE_HEADER = (
    "| Name | config | lr sched | train time (s/iter) | inference time (s/im) | box AP | AP50 "
    "| AP75 | musu:// name | download |\n"
    "|:-----|:------:|:--------:|:-------------------:|:---------------------:|:------:|:----:"
    "|:----:|:-------------|:--------:|"
)
_PURE_COMPUTE = re.compile(
    r"Total inference pure compute time: \S+ \(([0-9.]+) s / iter per device, on (\d+) devices\)"
)
_OVERALL_SPEED = re.compile(r"Overall training speed: \d+ iterations in \S+ \(([0-9.]+) s / it\)")
_COPYPASTE_HEADER = re.compile(r"copypaste: (AP,AP50.*)$")
_COPYPASTE_VALUES = re.compile(r"copypaste: ([-0-9.nan,]+)$")


def schedule_name(max_iter: int, ims_per_batch: int) -> str:
    """Detectron2's schedule names (1x = 90k iterations of 16 images), else ``<iter> it x <im>``."""
    times_1x = max_iter * ims_per_batch / (90000 * 16)
    for multiple in (1, 2, 3):
        if math.isclose(times_1x, multiple):
            return f"{multiple}x"
    return f"{max_iter} it × {ims_per_batch} im"


@dataclass(frozen=True)
class PublishedModel:
    """Where :func:`publish` wrote a model, and the numbers it recorded."""

    name: str
    path: Path
    relpath: str
    sha256: str
    metrics: dict[str, Any]

    @property
    def url(self) -> str:
        """``musu://`` URL of the published file."""
        return PREFIX + self.relpath

    def entry(self) -> ModelZooEntry:
        """The model-zoo table entry of this model."""
        m, bbox = self.metrics, self.metrics.get("bbox", {})
        schedule = "-"
        if m.get("max_iter") and m.get("ims_per_batch"):
            schedule = schedule_name(int(m["max_iter"]), int(m["ims_per_batch"]))
        return ModelZooEntry(
            self.relpath,
            self.sha256,
            schedule,
            m.get("train_time_s_per_iter"),
            m.get("inference_time_s_per_im"),
            bbox.get("AP"),
            bbox.get("AP50"),
            bbox.get("AP75"),
        )

    def table_entry(self) -> str:
        """The record to add to ``musu/model_zoo/models.json`` (what ``--update-table`` adds)."""
        return json.dumps(entry_record(self.name, self.entry()), indent=2, ensure_ascii=False)


def publishable_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The published content of a training checkpoint: its model state dict only (tensors,
    detached, on CPU, contiguous) and ``__author__``. Everything else is dropped."""
    state = checkpoint["model"] if "model" in checkpoint else checkpoint
    model = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model state {key!r} is a {type(value).__name__}, not a Tensor")
        model[key] = value.detach().cpu().contiguous().clone()
    return validate_checkpoint({"model": model, "__author__": AUTHOR})


def _log_numbers(log_lines: list[str]) -> tuple[dict[str, float], float | None, float | None]:
    """From ``log.txt``: the last ``copypaste:`` box metrics, the last inference time (s/im) and
    the overall training speed (s/iter)."""
    bbox: dict[str, float] = {}
    for index, line in enumerate(log_lines[:-1]):
        header = _COPYPASTE_HEADER.search(line)
        values = _COPYPASTE_VALUES.search(log_lines[index + 1])
        if header and values:
            bbox = dict(zip(header.group(1).split(","), map(float, values.group(1).split(","))))
    inference = overall = None
    for line in log_lines:
        if match := _PURE_COMPUTE.search(line):
            inference = float(match.group(1))
        if match := _OVERALL_SPEED.search(line):
            overall = float(match.group(1))
    return bbox, inference, overall


def read_run_metrics(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Numbers of a ``train_net.py`` output folder.

    * ``bbox``: the last evaluation's box metrics (``bbox/...`` keys of Detectron2's
      ``metrics.json``; else the last ``copypaste:`` block of ``log.txt``), ``{}`` if none.
    * ``train_time_s_per_iter``: median of the ``time`` field over ``metrics.json`` records
      (each a 20-iteration median), ``None`` without training records.
    * ``train_time_overall_s_per_iter``: Detectron2's "Overall training speed" of ``log.txt``
      (wall clock over the whole run, including any slowdown by other jobs), ``None`` if absent.
    * ``inference_time_s_per_im``: the last "Total inference pure compute time" of ``log.txt``
      (seconds per image per device, test batch size 1), ``None`` if absent.
    """
    output_dir = Path(output_dir)
    records = read_metrics_json(output_dir / "metrics.json")
    bbox: dict[str, float] = {}
    for record in records:
        found = {k.split("bbox/", 1)[1]: v for k, v in record.items() if "bbox/" in k}
        if found:
            bbox = found
    log = output_dir / "log.txt"
    log_lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    log_bbox, inference, overall = _log_numbers(log_lines)
    train_time = train_seconds_per_iter(output_dir / "metrics.json")
    return {
        "bbox": bbox or log_bbox,
        "train_time_s_per_iter": None if math.isnan(train_time) else train_time,
        "train_time_overall_s_per_iter": overall,
        "inference_time_s_per_im": inference,
        "iterations_logged": max(
            (int(r["iteration"]) for r in records if "iteration" in r), default=None
        ),
    }


def publish(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    name: str,
    run_dir: str | os.PathLike | None = None,
    config_file: str | os.PathLike | None = None,
    opts: Sequence[str] = (),
) -> PublishedModel:
    """Write ``<output>/<name>/model_final_<sha256[:12]>.pth`` and ``metrics.json``.

    ``checkpoint``: a Detectron2 training checkpoint (loaded weights-only); ``name``: the config
    name in the zoo (``"Synthetic/musu_R_18_FPN_synthetic"``, ``.yaml`` optional); ``run_dir``:
    the training output folder the numbers come from (default: the checkpoint's folder);
    ``config_file``: the run's config (default: ``<run_dir>/config.yaml``, if present), read
    as plain YAML, with ``opts`` (``KEY VALUE`` pairs naming keys it holds) applied; its schedule
    and test datasets go into ``metrics.json``.
    """
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    run_dir = Path(run_dir) if run_dir is not None else Path(checkpoint).parent
    config_file = Path(config_file) if config_file is not None else run_dir / "config.yaml"
    content = publishable_checkpoint(
        torch.load(os.fspath(checkpoint), map_location="cpu", weights_only=True)
    )
    buffer = io.BytesIO()  # saved in memory: the archive is then named "archive", so the
    torch.save(content, buffer)  # bytes (and the hash) depend on the weights only
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    folder = Path(output) / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"model_final_{digest[:HASH_PREFIX_LENGTH]}.pth"
    with atomic_write(path, "wb") as f:
        f.write(data)
    metrics = read_run_metrics(run_dir)
    metrics.update(name=name, config=f"configs/{name}.yaml", file=path.name, sha256=digest)
    if opts and not config_file.is_file():
        raise FileNotFoundError(
            f"config overrides {list(opts)} need the run's config: no {config_file}"
        )
    if config_file.is_file():
        cfg = CfgNode(yaml.safe_load(config_file.read_text()) or {})
        cfg.merge_from_list(list(opts))
        solver, datasets = cfg.get("SOLVER", {}), cfg.get("DATASETS", {})
        metrics.update(
            max_iter=solver.get("MAX_ITER"),
            ims_per_batch=solver.get("IMS_PER_BATCH"),
            test_datasets=list(datasets.get("TEST", [])),
        )
    with atomic_write(folder / "metrics.json", "w") as f:
        f.write(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    relpath = f"{name}/{path.name}"
    logger.info("Published %s as %s (sha256 %s)", checkpoint, path, digest)
    return PublishedModel(name=name, path=path, relpath=relpath, sha256=digest, metrics=metrics)


def _number(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_row(name: str, entry: ModelZooEntry, base_url: str = DEFAULT_MODEL_ZOO_URL) -> str:
    """The ``MODEL_ZOO.md`` row of a published model: name, config, schedule, train s/iter,
    inference s/im, box AP / AP50 / AP75, ``musu://`` name, links to the model and its metrics."""
    base = base_url if base_url.endswith("/") else base_url + "/"
    folder = entry.file.rsplit("/", 1)[0]
    cells = [
        name.rsplit("/", 1)[-1],
        f"[config](configs/{name}.yaml)",
        entry.schedule,
        _number(entry.train_time_s_per_iter, 3),
        _number(entry.inference_time_s_per_im, 3),
        _number(entry.ap, 1),
        _number(entry.ap50, 1),
        _number(entry.ap75, 1),
        f"`{PREFIX}{entry.file}`",
        f"[model]({base}{entry.file}) \\| [metrics]({base}{folder}/metrics.json)",
    ]
    return "| " + " | ".join(cells) + " |"


def model_zoo_row(published: PublishedModel, base_url: str = DEFAULT_MODEL_ZOO_URL) -> str:
    """:func:`table_row` of a model :func:`publish` just wrote."""
    return table_row(published.name, published.entry(), base_url)


def render_table(table: Mapping[str, ModelZooEntry], base_url: str = DEFAULT_MODEL_ZOO_URL) -> str:
    """``MODEL_ZOO.md``'s table of published models: the header and a row per table entry."""
    rows = [table_row(name, entry, base_url) for name, entry in table.items()]
    return "\n".join([TABLE_HEADER, *rows]) + "\n"


def update_table(published: PublishedModel, path: str | os.PathLike = TABLE_FILE) -> None:
    """Write ``published``'s entry into the table file ``path`` (replacing one of the same name,
    else appended), atomically."""
    table = dict(read_table(path))
    table[published.name] = published.entry()
    records = [entry_record(name, entry) for name, entry in table.items()]
    with atomic_write(path, "w") as f:
        f.write(json.dumps({"models": records}, indent=2, ensure_ascii=False) + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line (:mod:`musu.cli`'s convention; reads no dataset)."""
    parser = tool_argument_parser(__doc__, config_required=False, reads_data=False)
    parser.add_argument("--run-dir", help="train_net.py OUTPUT_DIR of the run")
    parser.add_argument(
        "--name", help="config path under configs/, e.g. Synthetic/musu_R_18_FPN_synthetic"
    )
    parser.add_argument(
        "--output", type=output_folder, help="folder mirroring the release location"
    )
    parser.add_argument("--checkpoint", help="default: <run-dir>/model_final.pth")
    parser.add_argument(
        "--base-url", default=DEFAULT_MODEL_ZOO_URL, help="release location for the printed links"
    )
    parser.add_argument("--table", default=str(TABLE_FILE), help="the published-model table")
    parser.add_argument("--update-table", action="store_true", help="add the model to --table")
    parser.add_argument(
        "--print-table", action="store_true", help="print MODEL_ZOO.md's table from --table"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_tool_args(parser, argv)
    if not args.print_table and not (args.run_dir and args.name and args.output):
        parser.error("--run-dir, --name and --output are required (unless --print-table)")
    return args


def main(argv: list[str] | None = None) -> PublishedModel | None:
    args = parse_args(argv)
    if args.print_table:
        print(render_table(read_table(args.table), args.base_url), end="")
        return None
    run_dir = Path(args.run_dir)
    checkpoint = Path(args.checkpoint) if args.checkpoint else run_dir / "model_final.pth"
    if not checkpoint.is_file():
        sys.exit(f"publish_model: checkpoint {checkpoint} not found")
    published = publish(
        checkpoint, args.output, args.name, run_dir, args.config_file, opts=args.opts
    )
    print(f"Published {published.path} (sha256 {published.sha256})")
    print(f"metrics: {published.path.parent / 'metrics.json'}")
    print("\nMODEL_ZOO.md row:")
    print(model_zoo_row(published, args.base_url))
    print(f"\n{Path(args.table).name} record:")
    print(published.table_entry())
    if args.update_table:
        update_table(published, args.table)
        print(
            f"\nadded to {args.table}; MODEL_ZOO.md's table: tools/publish_model.py --print-table"
        )
    return published


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
