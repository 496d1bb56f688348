"""MuSu's model zoo: config files shipped with the package and the weights published for them.

Mirrors ``detectron2.model_zoo``: :func:`get_config_file`, :func:`get_config`,
:func:`get_checkpoint_url` and :func:`get` take a config path relative to the repository's
``configs/`` folder (e.g. ``"Synthetic/musu_R_18_FPN_synthetic.yaml"``). Checkpoint URLs are
``musu://`` paths, resolved, downloaded and verified by :mod:`musu.model_zoo.file_io`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from torch import nn

from ..config import add_musu_config
from .file_io import PREFIX

__all__ = [
    "MODEL_ZOO_FILES",
    "ModelZooEntry",
    "WeightsOnlyCheckpointer",
    "configs_root",
    "get",
    "get_checkpoint_url",
    "get_config",
    "get_config_file",
    "list_configs",
]


class ModelZooEntry(NamedTuple):
    """A published checkpoint: its path under the release location and its full SHA-256."""

    file: str
    sha256: str


# Config name (path under configs/, no ".yaml") -> published file. tools/publish_model.py prints
# the line to add here; the files themselves live at the release location (file_io.py), not in git.
MODEL_ZOO_FILES: dict[str, ModelZooEntry] = {
    "Synthetic/musu_R_18_FPN_synthetic": ModelZooEntry(
        "Synthetic/musu_R_18_FPN_synthetic/model_final_e74fca883bf5.pth",
        "e74fca883bf57973fb161aa85ee3efffef97b2ee74bc25af9a20716b3cc08081",
    ),
    "BCCD/musu_R_18_FPN_bccd": ModelZooEntry(
        "BCCD/musu_R_18_FPN_bccd/model_final_81cdf5f98ed9.pth",
        "81cdf5f98ed91461593122398b181be42625660b6215f40272ccaa14070e9898",
    ),
}


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


def list_configs() -> list[str]:
    """Every config path the model zoo knows (relative, ``/``-separated, sorted)."""
    root = configs_root()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))


def get_config_file(config_path: str) -> str:
    """Real path of a built-in config file, e.g. ``"COCO-Detection/musu_R_50_FPN_1x.yaml"``.

    Raises ``RuntimeError`` if there is no such config.
    """
    root = configs_root()
    path = root / config_path
    parts = Path(config_path).parts
    if Path(config_path).is_absolute() or ".." in parts or not path.is_file():
        raise RuntimeError(f"{config_path} not available in MuSu's model zoo (configs in {root}).")
    return str(path)


def get_checkpoint_url(config_path: str) -> str:
    """``musu://`` URL of the weights published for ``config_path``; ``RuntimeError`` if none."""
    name = config_path[: -len(".yaml")] if config_path.endswith(".yaml") else config_path
    if name not in MODEL_ZOO_FILES:
        published = ", ".join(sorted(MODEL_ZOO_FILES)) or "<none>"
        raise RuntimeError(f"No published MuSu weights for {config_path} (published: {published}).")
    return PREFIX + MODEL_ZOO_FILES[name].file


def get_config(config_path: str, trained: bool = False) -> CfgNode:
    """Detectron2 defaults + ``add_musu_config`` + the built-in file ``config_path``.

    With ``trained=True``, ``MODEL.WEIGHTS`` is the published checkpoint's ``musu://`` URL;
    otherwise it is the file's own (e.g. ImageNet initialization, or none).
    """
    cfg = get_cfg()
    add_musu_config(cfg)
    cfg.merge_from_file(get_config_file(config_path))
    if trained:
        cfg.MODEL.WEIGHTS = get_checkpoint_url(config_path)
    return cfg


class WeightsOnlyCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose ``.pth`` loads always use ``torch.load(...,
    weights_only=True)``, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says."""

    def _torch_load(self, f: str) -> dict:
        return torch.load(f, map_location=torch.device("cpu"), weights_only=True)


def get(config_path: str, trained: bool = False, device: str | None = None) -> nn.Module:
    """The model of ``config_path`` with its weights loaded (see :func:`get_config`), in eval
    mode, on ``device`` (default: the config's, or ``"cpu"`` without CUDA).

    Example::

        from musu import model_zoo
        model = model_zoo.get("Synthetic/musu_R_18_FPN_synthetic.yaml", trained=True)
    """
    cfg = get_config(config_path, trained)
    if device is None and not torch.cuda.is_available():
        device = "cpu"
    if device is not None:
        cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    WeightsOnlyCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()
