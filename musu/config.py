"""MuSu config: ``add_musu_config(cfg)`` adds ``cfg.MODEL.MUSU`` and never edits other defaults."""

from __future__ import annotations

import math
from importlib.metadata import entry_points

from detectron2.config import CfgNode as CN

from .modeling.assigners.constants import CRITERIA

__all__ = [
    "add_musu_config",
    "add_project_configs",
    "validate_musu_config",
    "validate_project_configs",
    "PROJECTS_ENTRY_POINT",
]

# Entry-point group through which installed projects (projects/*) offer their add_*_config.
PROJECTS_ENTRY_POINT = "musu.projects"


def add_musu_config(cfg: CN) -> None:
    """Add the ``MODEL.MUSU`` node (paper defaults) to a Detectron2 config, in place."""
    _C = cfg
    _C.MODEL.MUSU = CN()
    # Number of foreground classes.
    _C.MODEL.MUSU.NUM_CLASSES = 80
    # Backbone features the head reads, finest first (FPN P3-P7, strides 8-128).
    _C.MODEL.MUSU.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Conv layers in each of the classification and regression towers (paper: 4).
    _C.MODEL.MUSU.NUM_CONVS = 4
    # Normalization in the towers: "GN" (32 groups, paper), "" for none, or any Detectron2 norm.
    _C.MODEL.MUSU.NORM = "GN"
    # Last conv of each tower as a modulated deformable conv (paper Table 6 DCN variant).
    _C.MODEL.MUSU.DEFORMABLE_LAST_CONV = False
    # Prior probability of the classification bias at initialization (focal-loss prior).
    _C.MODEL.MUSU.PRIOR_PROB = 0.01
    # Anchor slots A per location (paper Table 5: 1-5; 1 has exactly FCOS's parameters).
    _C.MODEL.MUSU.NUM_ANCHORS = 1
    # With A > 1, each slot's initial box is 2s x 2s times a scale drawn uniformly from this range.
    _C.MODEL.MUSU.ANCHOR_SCALE_RANGE = [1.0, 2.0]
    # With A > 1, each slot's initial aspect ratio (h / w) is drawn uniformly from this range.
    _C.MODEL.MUSU.ANCHOR_ASPECT_RATIO_RANGE = [0.5, 2.0]
    # Seed of the anchor-shape draw, so that the same config always gives the same initial anchors.
    _C.MODEL.MUSU.ANCHOR_INIT_SEED = 0

    # FCOS-rule assigner (build_fcos_assigner): centre-sampling radius in strides, 0 disables.
    _C.MODEL.MUSU.FCOS_CENTER_SAMPLING_RADIUS = 1.5

    # --- Assigner (Procedure 1) ---
    # Assigner builder registered in musu.modeling.build.ASSIGNER_REGISTRY (cfg -> assigner).
    _C.MODEL.MUSU.ASSIGNER = "build_musu_assigner"
    # Assigner used instead of ASSIGNER during the first WARMUP_ASSIGNER_ITERS iterations (a
    # geometric warm start, not in the paper; its only early prior is the 2s x 2s initial box).
    _C.MODEL.MUSU.WARMUP_ASSIGNER = "build_fcos_assigner"
    # Length of that warm start in training iterations; 0 disables it (paper setting).
    _C.MODEL.MUSU.WARMUP_ASSIGNER_ITERS = 0
    # theta in q = IoU ** theta (Eq. 1).
    _C.MODEL.MUSU.THETA = 4.0
    # b in the candidate-bag threshold t = b * max P (Eq. 2); must lie in (0, 1).
    _C.MODEL.MUSU.BAG_THRESHOLD = 0.1
    # alpha in v_cls = q * p**alpha, v_reg = p * q**alpha (Eq. 3); must lie in [0, 1].
    _C.MODEL.MUSU.ALPHA = 1.0 / 3.0
    # Ranking criterion: "mutual" (Eq. 3), "cls" (both heads ranked by p), "iou" (both by q).
    _C.MODEL.MUSU.CRITERION = "mutual"
    # Fixed tau_cls (Table 3) if > 0; 0 means adaptive tau_cls = sqrt(|C_j|) (Eq. 6).
    _C.MODEL.MUSU.TEMPERATURE = 0.0
    # tau_cls / tau_reg (Eq. 6, Table 4).
    _C.MODEL.MUSU.TAU_RATIO = 2.0
    # Soft weights w = exp(-R / tau) (Eq. 4) if True, else hard weights w = [R < tau].
    _C.MODEL.MUSU.SOFT_WEIGHTS = True

    # --- Losses (Eqs. 7-8) ---
    # beta, the decay of the penalty term (1 - w)**beta (Eq. 7).
    _C.MODEL.MUSU.BETA = 4.0
    # Focal loss balance alpha: positives weigh alpha, negatives 1 - alpha.
    _C.MODEL.MUSU.FOCAL_LOSS_ALPHA = 0.25
    # Focal loss focusing parameter gamma.
    _C.MODEL.MUSU.FOCAL_LOSS_GAMMA = 2.0
    # Weight of the regression loss in L_det = L_cls + weight * L_reg (paper: 1).
    _C.MODEL.MUSU.REG_LOSS_WEIGHT = 1.0

    # --- Inference ---
    # Scores (sigmoid(cls) * sigmoid(obj)) below this are dropped before NMS.
    _C.MODEL.MUSU.SCORE_THRESH_TEST = 0.05
    # Top-scoring candidates kept per FPN level before NMS.
    _C.MODEL.MUSU.TOPK_CANDIDATES_TEST = 1000
    # IoU threshold of the class-wise NMS.
    _C.MODEL.MUSU.NMS_THRESH_TEST = 0.6
    # (Detections kept per image: TEST.DETECTIONS_PER_IMAGE, Detectron2's key, default 100.)


def _project_modules() -> list:
    """The installed projects' modules, from entry points of group ``musu.projects``."""
    found = sorted(entry_points(group=PROJECTS_ENTRY_POINT), key=lambda e: e.name)
    return [entry_point.load() for entry_point in found]


def add_project_configs(cfg: CN) -> list[str]:
    """Call ``add_config(cfg)`` of every installed project; return the projects' module names.

    A project declares ``[options.entry_points] musu.projects = <name> = <package>`` in its
    setup.cfg; its package exposes ``add_config(cfg)`` (adding its own config nodes) and may expose
    ``validate_config(cfg)``. Importing the package registers its META_ARCHs and assigners.
    """
    modules = _project_modules()
    for module in modules:
        module.add_config(cfg)
    return [module.__name__ for module in modules]


def validate_project_configs(cfg: CN) -> None:
    """Call ``validate_config(cfg)`` of every installed project that has one."""
    for module in _project_modules():
        validate = getattr(module, "validate_config", None)
        if validate is not None:
            validate(cfg)


def _fail(key: str, message: str, value: object) -> None:
    raise ValueError(f"Invalid config: MODEL.MUSU.{key} {message}, got {value!r}")


def _check_range(cfg: CN, key: str, low: float, high: float, closed: bool) -> None:
    value = cfg.MODEL.MUSU[key]
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low <= value <= high if closed else low < value < high)
    if not ok:
        _fail(
            key, f"must lie in {'[' if closed else '('}{low}, {high}{']' if closed else ')'}", value
        )


def _check_positive(cfg: CN, key: str, allow_zero: bool = False) -> None:
    value = cfg.MODEL.MUSU[key]
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        _fail(key, "must be a finite number " + (">= 0" if allow_zero else "> 0"), value)


def validate_musu_config(cfg: CN) -> None:
    """Raise ValueError naming the key for any invalid ``MODEL.MUSU`` value."""
    musu = cfg.MODEL.MUSU
    if not isinstance(musu.NUM_CLASSES, int) or musu.NUM_CLASSES < 1:
        _fail("NUM_CLASSES", "must be an integer >= 1", musu.NUM_CLASSES)
    if not isinstance(musu.NUM_ANCHORS, int) or musu.NUM_ANCHORS < 1:
        _fail("NUM_ANCHORS", "must be an integer >= 1", musu.NUM_ANCHORS)
    if not isinstance(musu.NUM_CONVS, int) or musu.NUM_CONVS < 0:
        _fail("NUM_CONVS", "must be an integer >= 0", musu.NUM_CONVS)
    if len(musu.IN_FEATURES) == 0:
        _fail("IN_FEATURES", "must name at least one backbone feature", musu.IN_FEATURES)
    for key, low_bound in (("ANCHOR_SCALE_RANGE", 0.0), ("ANCHOR_ASPECT_RATIO_RANGE", 0.0)):
        low_high = musu[key]
        if len(low_high) != 2 or not (low_bound < low_high[0] <= low_high[1]):
            _fail(key, "must be [low, high] with 0 < low <= high", low_high)
    _check_range(cfg, "PRIOR_PROB", 0.0, 1.0, closed=False)
    _check_positive(cfg, "THETA")
    _check_range(cfg, "BAG_THRESHOLD", 0.0, 1.0, closed=False)
    _check_range(cfg, "ALPHA", 0.0, 1.0, closed=True)
    if musu.CRITERION not in CRITERIA:
        _fail("CRITERION", f"must be one of {CRITERIA}", musu.CRITERION)
    _check_positive(cfg, "TEMPERATURE", allow_zero=True)
    _check_positive(cfg, "TAU_RATIO")
    _check_positive(cfg, "BETA", allow_zero=True)
    _check_range(cfg, "FOCAL_LOSS_ALPHA", 0.0, 1.0, closed=True)
    _check_positive(cfg, "FOCAL_LOSS_GAMMA", allow_zero=True)
    _check_positive(cfg, "REG_LOSS_WEIGHT", allow_zero=True)
    _check_range(cfg, "SCORE_THRESH_TEST", 0.0, 1.0, closed=True)
    if not isinstance(musu.TOPK_CANDIDATES_TEST, int) or musu.TOPK_CANDIDATES_TEST < 1:
        _fail("TOPK_CANDIDATES_TEST", "must be an integer >= 1", musu.TOPK_CANDIDATES_TEST)
    _check_range(cfg, "NMS_THRESH_TEST", 0.0, 1.0, closed=True)
    if not isinstance(musu.WARMUP_ASSIGNER_ITERS, int) or musu.WARMUP_ASSIGNER_ITERS < 0:
        _fail("WARMUP_ASSIGNER_ITERS", "must be an integer >= 0", musu.WARMUP_ASSIGNER_ITERS)
