"""The published-weights table (``models.json`` beside this file) and the config folder.

A leaf of :mod:`musu.model_zoo`: :mod:`.file_io` and :mod:`.model_zoo` both read it, and it
imports neither. ``tools/publish_model.py --update-table`` adds a model to ``models.json``;
``MODEL_ZOO.md``'s table of published models is rendered from it
(``tools/publish_model.py --print-table``; ``tests/test_zoo_configs.py`` checks they agree).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "MODEL_ZOO_FILES",
    "TABLE_FILE",
    "ModelZooEntry",
    "configs_root",
    "entry_record",
    "read_table",
]

TABLE_FILE = Path(__file__).with_name("models.json")
"""The published-model table: ``{"models": [record, ...]}``, one record per config name."""


class ModelZooEntry(NamedTuple):
    """A published checkpoint: its path under the release location, its full SHA-256 and the
    numbers shown in ``MODEL_ZOO.md`` (``None`` / ``"-"`` where not measured)."""

    file: str
    sha256: str
    schedule: str = "-"
    train_time_s_per_iter: float | None = None
    inference_time_s_per_im: float | None = None
    ap: float | None = None
    ap50: float | None = None
    ap75: float | None = None


# JSON key of each ModelZooEntry field (box AP keys as Detectron2's COCOEvaluator names them).
_JSON_KEYS = dict(zip(ModelZooEntry._fields, ModelZooEntry._fields))
_JSON_KEYS.update(ap="AP", ap50="AP50", ap75="AP75")


def entry_record(name: str, entry: ModelZooEntry) -> dict[str, Any]:
    """The ``models.json`` record of ``entry`` published for config ``name``."""
    return {"name": name, **{_JSON_KEYS[k]: v for k, v in entry._asdict().items()}}


def read_table(path: str | os.PathLike = TABLE_FILE) -> dict[str, ModelZooEntry]:
    """Config name (path under ``configs/``, no ``.yaml``) -> :class:`ModelZooEntry`.

    Raises ``ValueError`` naming the file and the record for a record without ``name``,
    ``file`` or ``sha256``, with an unknown key, or a name listed twice.
    """
    records = json.loads(Path(path).read_text())["models"]
    table: dict[str, ModelZooEntry] = {}
    fields = {json_key: field for field, json_key in _JSON_KEYS.items()}
    for index, record in enumerate(records):
        record = dict(record)
        name = record.pop("name", None)
        unknown = set(record) - set(fields)
        if not name or "file" not in record or "sha256" not in record or unknown or name in table:
            raise ValueError(
                f"{path}: model record {index} ({name}) needs 'name', 'file' and 'sha256', "
                f"unique names and only the keys {sorted(fields)}; got {sorted(record)}"
            )
        table[name] = ModelZooEntry(**{fields[k]: v for k, v in record.items()})
    return table


# Config name -> published file; the files live at the release location (file_io.py), not in git.
MODEL_ZOO_FILES: dict[str, ModelZooEntry] = read_table()


def configs_root() -> Path:
    """The folder holding the config files: ``musu/model_zoo/configs`` (a copy or link made by
    ``setup.py`` at build time, present in wheels and editable installs), else the source
    checkout's ``configs/``."""
    packaged = Path(__file__).parent / "configs"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "configs"
    if checkout.is_dir():
        return checkout
    raise RuntimeError(
        f"MuSu's config files are missing: neither {packaged} nor {checkout} exists. Reinstall "
        "musu (pip install .), which puts them into the package."
    )
