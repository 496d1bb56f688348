"""MuSu config: ``add_musu_config(cfg)`` adds ``cfg.MODEL.MUSU`` and the precision / memory-format
keys (``SOLVER.AMP.PRECISION``, ``SOLVER.AMP.CPU_BFLOAT16``, ``TEST.AMP.ENABLED``,
``MODEL.CHANNELS_LAST``); it never edits Detectron2's defaults.

:func:`build_config` is the one way every entry point (``train_net.py``, ``tools/``, the model zoo,
the projects' tools) turns a config file and command-line options into a config. This module is a
leaf: it imports nothing of musu, so any musu module may import it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from importlib.metadata import entry_points
from typing import Sequence

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from fvcore.common.config import BASE_KEY

__all__ = [
    "CLS_LOSS_NORMALIZERS",
    "CRITERIA",
    "PROJECTS_ENTRY_POINT",
    "add_musu_config",
    "add_project_configs",
    "build_config",
    "check_base_files",
    "check_bool",
    "check_choice",
    "check_number",
    "validate_musu_config",
    "validate_project_configs",
    "AMP_PRECISIONS",
    "CPU_BFLOAT16_MODES",
]

logger = logging.getLogger(__name__)

# Ranking criteria of the MuSu assigner (MODEL.MUSU.CRITERION): "mutual" (Eq. 3), "cls", "iou".
CRITERIA = ("mutual", "cls", "iou")
# What MODEL.MUSU.CLS_LOSS_NORMALIZER divides the classification loss by.
CLS_LOSS_NORMALIZERS = ("weights", "members")

# Entry-point group through which installed projects (projects/*) offer their add_*_config.
PROJECTS_ENTRY_POINT = "musu.projects"
# SOLVER.AMP.PRECISION values (the autocast dtype on CUDA).
AMP_PRECISIONS = ("float16", "bfloat16")
# SOLVER.AMP.CPU_BFLOAT16 values (see add_musu_config).
CPU_BFLOAT16_MODES = ("native", "always")


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
    # Side of every initial box in strides (paper Sec. 4.1: 2, i.e. 2s x 2s). Other values are not
    # in the paper: they move the geometric prior, hence the early candidate bags, across levels.
    _C.MODEL.MUSU.INITIAL_BOX_SIZE = 2.0
    # With A > 1, each slot's initial box is 2s x 2s times a scale drawn uniformly from this range.
    _C.MODEL.MUSU.ANCHOR_SCALE_RANGE = [1.0, 2.0]
    # With A > 1, each slot's initial aspect ratio (h / w) is drawn uniformly from this range.
    _C.MODEL.MUSU.ANCHOR_ASPECT_RATIO_RANGE = [0.5, 2.0]
    # Side in strides of each slot's square initial box, one value per slot (e.g. [4.0, 8.0] with
    # NUM_ANCHORS 2); replaces INITIAL_BOX_SIZE and the random draw when set. Not in the paper,
    # which draws the shapes at random; empty keeps the paper's initialization.
    _C.MODEL.MUSU.ANCHOR_SIZES = []
    # Seed of the anchor-shape draw, so that the same config always gives the same initial anchors.
    _C.MODEL.MUSU.ANCHOR_INIT_SEED = 0

    # FCOS-rule assigner (build_fcos_assigner): centre-sampling radius in strides, 0 disables.
    _C.MODEL.MUSU.FCOS_CENTER_SAMPLING_RADIUS = 1.5

    # --- Assigner (Procedure 1) ---
    # Assigner builder registered in musu.modeling.assigners.ASSIGNER_REGISTRY (cfg -> assigner).
    _C.MODEL.MUSU.ASSIGNER = "build_musu_assigner"
    # Assigner used instead of ASSIGNER during the first WARMUP_ASSIGNER_ITERS iterations (a
    # geometric warm start, not in the paper; its only early prior is the 2s x 2s initial box).
    _C.MODEL.MUSU.WARMUP_ASSIGNER = "build_fcos_assigner"
    # Length of that warm start in training iterations; 0 disables it (paper setting).
    _C.MODEL.MUSU.WARMUP_ASSIGNER_ITERS = 0
    # Assigner run on the same predictions for logging only (musu_shadow/* scalars, e.g.
    # "build_fcos_assigner" to watch the FCOS rule beside MuSu); never trained on; "" disables.
    _C.MODEL.MUSU.SHADOW_ASSIGNER = ""
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
    # What the classification loss is divided by: "weights", the summed cls weights (Eq. 5), or
    # "members", the number of anchors with a classification target (the bags' members; not in
    # the paper: the scale FCOS's rule gives a bag of that size). "members" costs 4.8-5.4 AP on
    # large synthetic objects at 600 iterations (docs/study/size_bands.md, rule 4).
    _C.MODEL.MUSU.CLS_LOSS_NORMALIZER = "weights"
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

    # --- Precision and memory format (musu.engine.amp), used by every detector of this repo ---
    # Training runs under autocast when Detectron2's SOLVER.AMP.ENABLED is True. On CUDA the
    # autocast dtype is SOLVER.AMP.PRECISION ("float16", with a gradient scaler, or "bfloat16").
    if "PRECISION" not in _C.SOLVER.AMP:
        _C.SOLVER.AMP.PRECISION = "float16"
    # On CPU the dtype is bfloat16. "native": only where the CPU has bfloat16 instructions
    # (AVX512-BF16, AMX or Arm BF16), else float32 with a log line saying so (emulated bfloat16
    # is usually slower than float32); "always": bfloat16 on every CPU.
    _C.SOLVER.AMP.CPU_BFLOAT16 = "native"
    # Evaluation under the same autocast rule (SOLVER.AMP.PRECISION / CPU_BFLOAT16) if True.
    if "AMP" not in _C.TEST:
        _C.TEST.AMP = CN({"ENABLED": False})
    # Store the model's convolution weights channels-last (NHWC), so convolutions run in that
    # memory format; faster on CPUs and tensor-core GPUs where oneDNN / cuDNN have NHWC kernels.
    _C.MODEL.CHANNELS_LAST = False


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


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def check_number(
    node: CN,
    path: str,
    key: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    hint: str = "",
) -> None:
    """Raise ``ValueError("Invalid config: <path>.<key> must be ...")`` unless ``node[key]`` is a
    finite number (an ``int`` if ``integer``; never a bool) between ``low`` and ``high`` (closed
    ends unless ``low_open`` / ``high_open``; ``None``: unbounded). ``hint`` explains a bound."""
    value = node[key]
    kinds = int if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        expected = "an integer" if integer else "a finite number"
        bounds = _interval(low, high, low_open, high_open)
        expected += f" {bounds}" if bounds else ""
        expected += f" ({hint})" if hint else ""
        raise ValueError(f"Invalid config: {path}.{key} must be {expected}, got {value!r}")


def check_choice(node: CN, path: str, key: str, choices: Sequence[object]) -> None:
    """Raise ``ValueError`` naming ``<path>.<key>`` unless ``node[key]`` is one of ``choices``."""
    if node[key] not in choices:
        raise ValueError(
            f"Invalid config: {path}.{key} must be one of {tuple(choices)}, got {node[key]!r}"
        )


def check_bool(node: CN, path: str, key: str) -> None:
    """Raise ``ValueError`` naming ``<path>.<key>`` unless ``node[key]`` is True or False."""
    if not isinstance(node[key], bool):
        raise ValueError(f"Invalid config: {path}.{key} must be True or False, got {node[key]!r}")


def validate_musu_config(cfg: CN) -> None:
    """Raise ValueError naming the key for any invalid ``MODEL.MUSU`` or precision value, and
    for ``MODEL.LOAD_PROPOSALS`` (proposal files are unpickled by Detectron2)."""
    musu, path = cfg.MODEL.MUSU, "MODEL.MUSU"
    for key, low in (("NUM_CLASSES", 1), ("NUM_ANCHORS", 1), ("NUM_CONVS", 0)):
        check_number(musu, path, key, low=low, integer=True)
    if len(musu.IN_FEATURES) == 0:
        raise ValueError(
            f"Invalid config: {path}.IN_FEATURES must name at least one backbone feature, "
            f"got {musu.IN_FEATURES!r}"
        )
    for key in ("ANCHOR_SCALE_RANGE", "ANCHOR_ASPECT_RATIO_RANGE"):
        low_high = musu[key]
        if len(low_high) != 2 or not (0.0 < low_high[0] <= low_high[1]):
            raise ValueError(
                f"Invalid config: {path}.{key} must be [low, high] with 0 < low <= high, "
                f"got {low_high!r}"
            )
    sizes = musu.ANCHOR_SIZES
    if len(sizes) > 0 and (
        len(sizes) != musu.NUM_ANCHORS
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in sizes)
    ):
        raise ValueError(
            f"Invalid config: {path}.ANCHOR_SIZES must be empty or hold one positive side in "
            f"strides per anchor slot ({path}.NUM_ANCHORS = {musu.NUM_ANCHORS}), got {sizes!r}"
        )
    for key in ("PRIOR_PROB", "BAG_THRESHOLD"):
        check_number(musu, path, key, low=0.0, high=1.0, low_open=True, high_open=True)
    for key in ("ALPHA", "FOCAL_LOSS_ALPHA", "SCORE_THRESH_TEST", "NMS_THRESH_TEST"):
        check_number(musu, path, key, low=0.0, high=1.0)
    for key in ("THETA", "TAU_RATIO", "INITIAL_BOX_SIZE"):
        check_number(musu, path, key, low=0.0, low_open=True)
    for key in ("TEMPERATURE", "BETA", "FOCAL_LOSS_GAMMA", "REG_LOSS_WEIGHT"):
        check_number(musu, path, key, low=0.0)
    check_choice(musu, path, "CRITERION", CRITERIA)
    check_choice(musu, path, "CLS_LOSS_NORMALIZER", CLS_LOSS_NORMALIZERS)
    check_number(musu, path, "TOPK_CANDIDATES_TEST", low=1, integer=True)
    check_number(musu, path, "WARMUP_ASSIGNER_ITERS", low=0, integer=True)
    if cfg.MODEL.LOAD_PROPOSALS:
        raise ValueError(
            "Invalid config: MODEL.LOAD_PROPOSALS must be False: Detectron2 reads "
            "DATASETS.PROPOSAL_FILES_* with pickle.load, which can run code from the file, and "
            "no detector of this repository uses precomputed proposals"
        )
    check_choice(cfg.SOLVER.AMP, "SOLVER.AMP", "PRECISION", AMP_PRECISIONS)
    check_choice(cfg.SOLVER.AMP, "SOLVER.AMP", "CPU_BFLOAT16", CPU_BFLOAT16_MODES)
    for node, path_to_bool, key in (
        (cfg.TEST.AMP, "TEST.AMP", "ENABLED"),
        (cfg.MODEL, "MODEL", "CHANNELS_LAST"),
    ):
        check_bool(node, path_to_bool, key)


def check_base_files(config_file: str) -> None:
    """Follow the ``_BASE_`` chain of a local YAML config as Detectron2 resolves it (relative to
    the file that names it; ``~`` expanded; absolute paths and URLs as they are) and raise
    ``FileNotFoundError`` naming ``_BASE_``, the file that holds it and the resolved path when a
    base does not exist, or ``ValueError`` when the chain loops back on itself."""

    def visit(path: str, chain: tuple[str, ...]) -> None:
        real = os.path.realpath(path)
        if real in chain:
            raise ValueError(
                f"Config _BASE_ chain loops: {' -> '.join((*chain, real))} (in {path})"
            )
        with open(path) as f:
            try:
                content = yaml.safe_load(f)
            except yaml.YAMLError as error:
                raise ValueError(
                    f"Config {path} cannot be read with yaml.safe_load (configs are plain YAML; "
                    f"tags such as !!python/... are refused): {error}"
                ) from error
        bases = content.get(BASE_KEY) if isinstance(content, dict) else None
        for base in [bases] if isinstance(bases, str) else list(bases or []):
            if not isinstance(base, str):
                raise ValueError(f"Config {path}: {BASE_KEY} entries must be paths, got {base!r}")
            resolved = os.path.expanduser(base) if base.startswith("~") else base
            if "://" in resolved:
                continue
            if not os.path.isabs(resolved):
                resolved = os.path.join(os.path.dirname(path), resolved)
            if not os.path.isfile(resolved):
                raise FileNotFoundError(
                    f"Config {path}: {BASE_KEY}: {base!r} resolves to {os.path.abspath(resolved)}, "
                    f"which does not exist ({BASE_KEY} paths are relative to the file that names "
                    "them)"
                )
            visit(resolved, (*chain, real))

    if "://" not in config_file:
        visit(config_file, ())


def build_config(
    config_file: str | os.PathLike | None, opts: Sequence[str] = (), *, freeze: bool = True
) -> CN:
    """The config of a run: Detectron2's defaults + ``MODEL.MUSU`` + the installed projects' keys
    + ``config_file`` (``None``: none) + ``opts`` (``["KEY", "VALUE", ...]``).

    Guarantees: an unknown key or a malformed option raises ``KeyError`` naming the key and the
    file (or "command-line options"); a missing local file, or a ``_BASE_`` that points nowhere,
    raises ``FileNotFoundError`` naming ``_BASE_``, the file holding it and the resolved path
    (:func:`check_base_files`); YAML is read with ``yaml.safe_load`` only (a file it cannot read,
    e.g. one with ``!!python/...`` tags, raises ``ValueError`` naming the file);
    ``MODEL.DEVICE`` "cuda..." becomes "cpu" (with a warning) where CUDA is unavailable; the
    values pass :func:`validate_musu_config` and every project's ``validate_config``; the result
    is frozen if ``freeze``.
    """
    cfg = get_cfg()
    add_musu_config(cfg)
    add_project_configs(cfg)
    sources = []
    if config_file is not None:
        config_file = os.fspath(config_file)
        if "://" not in config_file and not os.path.isfile(config_file):
            raise FileNotFoundError(f"Config file {config_file} not found")
        check_base_files(config_file)
        # YAML through yaml.safe_load only (Detectron2 falls back to yaml.unsafe_load, which runs
        # Python named in tags such as !!python/object/apply, unless told otherwise).
        merge_file = functools.partial(cfg.merge_from_file, allow_unsafe=False)
        sources.append((f"config file {config_file}", merge_file, config_file))
    sources.append(("command-line options", cfg.merge_from_list, list(opts)))
    for source, merge, value in sources:
        try:
            merge(value)
        except (KeyError, AssertionError) as error:  # yacs: "Non-existent (config) key: A.B"
            message = error.args[0] if error.args else repr(error)
            raise KeyError(f"Invalid config in {source}: {message}") from error
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: MODEL.DEVICE set to 'cpu'.")
        cfg.MODEL.DEVICE = "cpu"
    validate_musu_config(cfg)
    validate_project_configs(cfg)
    if freeze:
        cfg.freeze()
    return cfg
