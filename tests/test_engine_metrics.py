"""musu.engine's metrics.json reader, shared by tools/compare.py, tools/analysis/visualize.py and
tools/publish_model.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from musu.engine import read_metrics_json, train_seconds_per_iter


def test_records_in_order_and_a_partial_last_line_skipped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    records = [{"iteration": 19, "time": 0.5}, {"iteration": 39, "time": 0.7, "bbox/AP": 3.0}]
    path.write_text("\n".join(json.dumps(r) for r in records) + '\n\n[1, 2]\n{"iteration": 5')
    assert read_metrics_json(path) == records
    assert read_metrics_json(tmp_path / "absent.json") == []


def test_train_seconds_per_iter_median_after_skip(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    times = [(19, 5.0), (39, 0.5), (59, 0.9), (79, 0.6)]
    lines = [json.dumps({"iteration": i, "time": t}) for i, t in times]
    lines.append(json.dumps({"iteration": 99, "bbox/AP": 1.0}))  # an evaluation, no time
    path.write_text("\n".join(lines) + "\n")
    assert train_seconds_per_iter(path) == pytest.approx(0.75)
    assert train_seconds_per_iter(path, skip_iters=20) == pytest.approx(0.6)
    assert math.isnan(train_seconds_per_iter(path, skip_iters=100))
    assert math.isnan(train_seconds_per_iter(tmp_path / "absent.json"))
