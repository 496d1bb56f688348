"""Rank & Sort loss (Oksuz et al., ICCV 2021) as a base loss of MuSu-style dense detectors.

``import musu_ranksort`` registers the ``MuSuRankSort`` META_ARCH (any registered assigner,
e.g. ``build_fcos_assigner``, supplies its positives);
``add_ranksort_config(cfg)`` adds ``cfg.MODEL.RANKSORT``.
"""

import musu  # noqa: F401  (registers MuSu, its backbone and datasets)

from .config import add_ranksort_config, validate_ranksort_config
from .meta_arch import MuSuRankSort
from .rank_sort import RankSortLoss, rank_sort_loss, smoothed_step

# Generic names for a project hook in the root train_net.py (import module, add_config(cfg)).
add_config = add_ranksort_config
validate_config = validate_ranksort_config

__version__ = "0.1.0"
__all__ = [
    "add_config",
    "add_ranksort_config",
    "validate_config",
    "validate_ranksort_config",
    "MuSuRankSort",
    "RankSortLoss",
    "rank_sort_loss",
    "smoothed_step",
]
