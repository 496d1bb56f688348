#!/usr/bin/env python
"""Publish a training run's weights to MuSu's model zoo.

python tools/publish_model.py --run-dir /tmp/runs/zoo/synthetic \
    --name Synthetic/musu_R_18_FPN_synthetic --output /path/to/mirror

Reads ``<run-dir>/model_final.pth`` (or ``--checkpoint``), keeps only the model's state dict
(optimizer, scheduler and iteration state are dropped) and writes
``<output>/<name>/model_final_<sha256 prefix>.pth`` plus ``metrics.json`` (box AP of the run's
last evaluation, train s/iter from Detectron2's ``metrics.json`` ``time`` field, inference s/im
from ``log.txt``). Prints the ``MODEL_ZOO.md`` row and the ``MODEL_ZOO_FILES`` entry. Upload the
``<name>/`` folder to the release location (``musu.model_zoo.DEFAULT_MODEL_ZOO_URL``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from musu.model_zoo.file_io import DEFAULT_MODEL_ZOO_URL
from musu.model_zoo.publish import PublishedModel, model_zoo_row, publish


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="train_net.py OUTPUT_DIR of the run")
    parser.add_argument(
        "--name",
        required=True,
        help="config path under configs/, e.g. Synthetic/musu_R_18_FPN_synthetic",
    )
    parser.add_argument("--output", required=True, help="folder mirroring the release location")
    parser.add_argument("--checkpoint", help="default: <run-dir>/model_final.pth")
    parser.add_argument("--config-file", help="the run's config; default: <run-dir>/config.yaml")
    parser.add_argument(
        "--base-url", default=DEFAULT_MODEL_ZOO_URL, help="release location for the printed links"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> PublishedModel:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    checkpoint = Path(args.checkpoint) if args.checkpoint else run_dir / "model_final.pth"
    if not checkpoint.is_file():
        sys.exit(f"publish_model: checkpoint {checkpoint} not found")
    published = publish(checkpoint, args.output, args.name, run_dir, args.config_file)
    print(f"Published {published.path} (sha256 {published.sha256})")
    print(f"metrics: {published.path.parent / 'metrics.json'}")
    print("\nMODEL_ZOO.md row:")
    print(model_zoo_row(published, args.base_url))
    print("\nMODEL_ZOO_FILES entry (musu/model_zoo/model_zoo.py):")
    print(published.table_entry())
    return published


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
