"""Reading Detectron2's ``metrics.json``: one JSON object per line, appended during training."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

__all__ = ["read_metrics_json", "train_seconds_per_iter"]


def read_metrics_json(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.json``, in file order; ``[]`` if the file does not exist.

    A line that is not a JSON object (an interrupted write leaves a partial last line) is skipped.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def train_seconds_per_iter(metrics_json: str | os.PathLike, skip_iters: int = 0) -> float:
    """Median of the ``time`` field (Detectron2's per-iteration time, itself a 20-iteration
    median) over the records at ``iteration >= skip_iters``; ``nan`` if there is none."""
    times = [
        float(record["time"])
        for record in read_metrics_json(metrics_json)
        if isinstance(record.get("time"), (int, float))
        and record.get("iteration", -1) >= skip_iters
    ]
    return statistics.median(times) if times else math.nan
