"""MuSu: Mutual Supervision for dense object detection, as a Detectron2 extension.

``import musu`` registers the ``MuSu`` META_ARCH, the ``build_musu_resnet_fpn_backbone``
backbone, the built-in datasets and the ``musu://`` path handler; ``musu.build_config`` builds a
run's config (``musu.add_musu_config(cfg)`` adds ``cfg.MODEL.MUSU``).
"""

from . import data  # noqa: F401  (registers the built-in datasets)
from . import evaluation  # noqa: F401  (ConsistencyEvaluator)
from . import model_zoo  # noqa: F401 (registers musu://)
from . import modeling  # noqa: F401  (registers META_ARCH "MuSu" and the backbone)
from .config import (
    add_musu_config,
    add_project_configs,
    build_config,
    validate_musu_config,
    validate_project_configs,
)

__version__ = "0.1.0"
__all__ = [
    "add_musu_config",
    "add_project_configs",
    "build_config",
    "validate_musu_config",
    "validate_project_configs",
    "modeling",
    "__version__",
]
