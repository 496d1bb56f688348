"""MuSu: Mutual Supervision for dense object detection, as a Detectron2 extension.

``import musu`` registers the ``MuSu`` META_ARCH, the ``build_musu_resnet_fpn_backbone``
backbone and the built-in datasets; ``musu.add_musu_config(cfg)`` adds ``cfg.MODEL.MUSU``.
"""

# modeling first: musu.config reads the assigner's constants, and the meta-arch reads the config.
# isort: off
from . import data  # noqa: F401  (registers the built-in datasets)
from . import evaluation  # noqa: F401  (ConsistencyEvaluator)
from . import modeling  # noqa: F401  (registers META_ARCH "MuSu" and the backbone)
from . import model_zoo  # noqa: F401 (registers musu://)

# isort: on
from .config import (
    add_musu_config,
    add_project_configs,
    validate_musu_config,
    validate_project_configs,
)

__version__ = "0.1.0"
__all__ = [
    "add_musu_config",
    "add_project_configs",
    "validate_musu_config",
    "validate_project_configs",
    "modeling",
    "__version__",
]
