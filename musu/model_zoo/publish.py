"""Publishing a training run's weights to the model zoo (used by ``tools/publish_model.py``).

:func:`publish` turns a Detectron2 training checkpoint into the published form: only
``{"model": state_dict, "__author__": ...}`` (optimizer, scheduler and iteration state dropped),
written as ``<output>/<config name>/model_final_<sha256 prefix>.pth`` with a ``metrics.json``
beside it. :func:`read_run_metrics` collects the numbers of the run's output folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import statistics
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from .file_io import DEFAULT_MODEL_ZOO_URL, HASH_PREFIX_LENGTH, PREFIX, validate_checkpoint

__all__ = [
    "AUTHOR",
    "PublishedModel",
    "model_zoo_row",
    "publish",
    "publishable_checkpoint",
    "read_run_metrics",
    "schedule_name",
]

logger = logging.getLogger(__name__)

AUTHOR = "musu model zoo"
_PURE_COMPUTE = re.compile(
    r"Total inference pure compute time: \S+ \(([0-9.]+) s / iter per device, on (\d+) devices\)"
)
_OVERALL_SPEED = re.compile(r"Overall training speed: \d+ iterations in \S+ \(([0-9.]+) s / it\)")
_COPYPASTE_HEADER = re.compile(r"copypaste: (AP,AP50.*)$")
_COPYPASTE_VALUES = re.compile(r"copypaste: ([-0-9.nan,]+)$")


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

    def table_entry(self) -> str:
        """The line to add to ``MODEL_ZOO_FILES`` in ``musu/model_zoo/model_zoo.py``."""
        return (
            f'    "{self.name}": ModelZooEntry(\n'
            f'        "{self.relpath}",\n'
            f'        "{self.sha256}",\n'
            "    ),"
        )


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


def schedule_name(max_iter: int, ims_per_batch: int) -> str:
    """Detectron2's schedule names (1x = 90k iterations of 16 images), else ``<iter> it x <im>``."""
    times_1x = max_iter * ims_per_batch / (90000 * 16)
    for multiple in (1, 2, 3):
        if math.isclose(times_1x, multiple):
            return f"{multiple}x"
    return f"{max_iter} it × {ims_per_batch} im"


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # an interrupted write leaves a partial last line
            if isinstance(record, dict):
                records.append(record)
    return records


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
    records = _read_json_lines(output_dir / "metrics.json")
    times = [float(r["time"]) for r in records if isinstance(r.get("time"), (int, float))]
    bbox: dict[str, float] = {}
    for record in records:
        found = {k.split("bbox/", 1)[1]: v for k, v in record.items() if "bbox/" in k}
        if found:
            bbox = found
    log = output_dir / "log.txt"
    log_lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    if not bbox:
        for index, line in enumerate(log_lines[:-1]):
            header = _COPYPASTE_HEADER.search(line)
            values = _COPYPASTE_VALUES.search(log_lines[index + 1])
            if header and values:
                bbox = dict(zip(header.group(1).split(","), map(float, values.group(1).split(","))))
    inference = overall = None
    for line in log_lines:
        match = _PURE_COMPUTE.search(line)
        if match:
            inference = float(match.group(1))
        match = _OVERALL_SPEED.search(line)
        if match:
            overall = float(match.group(1))
    return {
        "bbox": bbox,
        "train_time_s_per_iter": statistics.median(times) if times else None,
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
) -> PublishedModel:
    """Write ``<output>/<name>/model_final_<sha256[:12]>.pth`` and ``metrics.json``.

    ``checkpoint``: a Detectron2 training checkpoint (loaded weights-only); ``name``: the config
    name in the zoo (``"Synthetic/musu_R_18_FPN_synthetic"``, ``.yaml`` optional); ``run_dir``:
    the training output folder the numbers come from (default: the checkpoint's folder);
    ``config_file``: the run's config (default: ``<run_dir>/config.yaml``, if present).
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
    tmp = folder / f".{path.name}.{uuid.uuid4().hex}.part"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    metrics = read_run_metrics(run_dir)
    metrics.update(name=name, config=f"configs/{name}.yaml", file=path.name, sha256=digest)
    if config_file.is_file():
        cfg = yaml.safe_load(config_file.read_text()) or {}
        solver, datasets = cfg.get("SOLVER", {}), cfg.get("DATASETS", {})
        metrics.update(
            max_iter=solver.get("MAX_ITER"),
            ims_per_batch=solver.get("IMS_PER_BATCH"),
            test_datasets=list(datasets.get("TEST", [])),
        )
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    relpath = f"{name}/{path.name}"
    logger.info("Published %s as %s (sha256 %s)", checkpoint, path, digest)
    return PublishedModel(name=name, path=path, relpath=relpath, sha256=digest, metrics=metrics)


def _number(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def model_zoo_row(published: PublishedModel, base_url: str = DEFAULT_MODEL_ZOO_URL) -> str:
    """The ``MODEL_ZOO.md`` table row: name, config, schedule, train s/iter, inference s/im,
    box AP / AP50 / AP75, links to the model and its metrics."""
    m = published.metrics
    schedule = "-"
    if m.get("max_iter") and m.get("ims_per_batch"):
        schedule = schedule_name(int(m["max_iter"]), int(m["ims_per_batch"]))
    bbox = m.get("bbox", {})
    base = base_url if base_url.endswith("/") else base_url + "/"
    folder = published.relpath.rsplit("/", 1)[0]
    cells = [
        published.name.rsplit("/", 1)[-1],
        f"[config]({m.get('config', f'configs/{published.name}.yaml')})",
        schedule,
        _number(m.get("train_time_s_per_iter"), 3),
        _number(m.get("inference_time_s_per_im"), 3),
        _number(bbox.get("AP"), 1),
        _number(bbox.get("AP50"), 1),
        _number(bbox.get("AP75"), 1),
        f"`{published.url}`",
        f"[model]({base}{published.relpath}) \\| [metrics]({base}{folder}/metrics.json)",
    ]
    return "| " + " | ".join(cells) + " |"
