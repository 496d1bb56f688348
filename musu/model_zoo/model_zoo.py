"""MuSu's model zoo: config files shipped with the package and the weights published for them.

Mirrors ``detectron2.model_zoo``: :func:`get_config_file`, :func:`get_config`,
:func:`get_checkpoint_url` and :func:`get` take a config path relative to the repository's
``configs/`` folder (e.g. ``"Synthetic/musu_R_18_FPN_synthetic.yaml"``). Checkpoint URLs are
``musu://`` paths, resolved, downloaded and verified by :mod:`musu.model_zoo.file_io`.
:func:`load_model` and :class:`Predictor` load any config's weights without running code from the
file (:class:`musu.engine.AtomicCheckpointer`).
"""

from __future__ import annotations

from pathlib import Path

from detectron2.config import CfgNode
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from torch import nn

from ..config import build_config
from ..engine.amp import apply_memory_format
from ..engine.checkpoint import AtomicCheckpointer
from .file_io import PREFIX
from .table import MODEL_ZOO_FILES, configs_root

__all__ = [
    "Predictor",
    "WeightsOnlyCheckpointer",
    "get",
    "get_checkpoint_url",
    "get_config",
    "get_config_file",
    "list_configs",
    "load_model",
]


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
    """:func:`musu.config.build_config` of the built-in file ``config_path``, not frozen.

    With ``trained=True``, ``MODEL.WEIGHTS`` is the published checkpoint's ``musu://`` URL;
    otherwise it is the file's own (e.g. ImageNet initialization, or none).
    """
    opts = ["MODEL.WEIGHTS", get_checkpoint_url(config_path)] if trained else []
    return build_config(get_config_file(config_path), opts, freeze=False)


WeightsOnlyCheckpointer = AtomicCheckpointer
"""The checkpointer musu loads weights with (:class:`musu.engine.AtomicCheckpointer`): ``.pth``
through tensor-only ``torch.load``, Detectron2 model-zoo ``.pkl`` through a numpy-only
unpickler, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says."""


def load_model(cfg: CfgNode, weights: str | None = None) -> nn.Module:
    """``build_model(cfg)`` with ``weights`` (default ``cfg.MODEL.WEIGHTS``; a local path or any
    PathManager path such as ``musu://``) loaded without running code from the file, in eval
    mode, channels-last where ``MODEL.CHANNELS_LAST``."""
    model = apply_memory_format(build_model(cfg), cfg)
    AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS if weights is None else weights)
    return model.eval()


class Predictor(DefaultPredictor):
    """Detectron2's ``DefaultPredictor`` (one BGR/RGB ``(H, W, 3)`` uint8 image in, the model's
    output dict out, after the test-time resize) whose ``MODEL.WEIGHTS`` are loaded by
    :class:`musu.engine.AtomicCheckpointer`, so that a weights file cannot run code."""

    def __init__(self, cfg: CfgNode) -> None:
        unloaded = cfg.clone()
        unloaded.defrost()
        unloaded.MODEL.WEIGHTS = ""  # DefaultPredictor builds the model and loads nothing
        super().__init__(unloaded)
        self.cfg = cfg.clone()
        AtomicCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)


def get(config_path: str, trained: bool = False, device: str | None = None) -> nn.Module:
    """The model of ``config_path`` with its weights loaded (see :func:`get_config`), in eval
    mode, on ``device`` (default: the config's, or ``"cpu"`` without CUDA).

    Example::

        from musu import model_zoo
        model = model_zoo.get("Synthetic/musu_R_18_FPN_synthetic.yaml", trained=True)
    """
    cfg = get_config(config_path, trained)
    if device is not None:
        cfg.MODEL.DEVICE = device
    return load_model(cfg)
