"""Assigner registry: ``MODEL.MUSU.ASSIGNER`` names the builder of the detector's assigner.

Like Detectron2's BACKBONE_REGISTRY, entries are builder functions registered under their own
names (``build_musu_assigner`` is the default). A builder takes the config and returns an
assigner (the protocol of ``base.py``). Projects register their own with
``@ASSIGNER_REGISTRY.register()`` on a ``build_..._assigner(cfg)`` function.
"""

from __future__ import annotations

from fvcore.common.registry import Registry

from .base import Assigner
from .fcos import FCOSAssigner
from .musu import MuSuAssigner
from .wrappers import WarmupSwitch

__all__ = [
    "ASSIGNER_REGISTRY",
    "build_assigner",
    "build_fcos_assigner",
    "build_musu_assigner",
    "build_training_assigner",
]

ASSIGNER_REGISTRY = Registry("ASSIGNER")
ASSIGNER_REGISTRY.__doc__ = "Builders of assigners: cfg -> callable returning an Assignment."


@ASSIGNER_REGISTRY.register()
def build_musu_assigner(cfg) -> MuSuAssigner:
    """The paper's assigner from ``MODEL.MUSU`` keys (TEMPERATURE 0 means adaptive)."""
    musu = cfg.MODEL.MUSU
    return MuSuAssigner(
        theta=musu.THETA,
        bag_threshold=musu.BAG_THRESHOLD,
        alpha=musu.ALPHA,
        tau_ratio=musu.TAU_RATIO,
        temperature=musu.TEMPERATURE if musu.TEMPERATURE > 0 else None,
        soft=musu.SOFT_WEIGHTS,
        criterion=musu.CRITERION,
    )


@ASSIGNER_REGISTRY.register()
def build_fcos_assigner(cfg) -> FCOSAssigner:
    """FCOS rule with ``MODEL.MUSU.FCOS_CENTER_SAMPLING_RADIUS`` (default 1.5, Detectron2's FCOS
    default; 0 turns center sampling off)."""
    return FCOSAssigner(center_sampling_radius=cfg.MODEL.MUSU.FCOS_CENTER_SAMPLING_RADIUS)


def build_assigner(cfg, key: str = "ASSIGNER") -> Assigner:
    """The assigner named by ``MODEL.MUSU.<key>`` (default ``ASSIGNER``; also
    ``WARMUP_ASSIGNER``); a clear error naming the key for an unknown name."""
    name = cfg.MODEL.MUSU[key]
    try:
        builder = ASSIGNER_REGISTRY.get(name)
    except KeyError:
        known = sorted(name for name, _ in ASSIGNER_REGISTRY)
        raise ValueError(
            f"Invalid config: MODEL.MUSU.{key} {name!r} is not registered (known: {known}); "
            "import the module that registers it before building the model"
        ) from None
    return builder(cfg)


def build_training_assigner(cfg) -> Assigner:
    """``MODEL.MUSU.ASSIGNER``, behind a :class:`WarmupSwitch` to ``MODEL.MUSU.WARMUP_ASSIGNER``
    for the first ``MODEL.MUSU.WARMUP_ASSIGNER_ITERS`` iterations when that is > 0."""
    main = build_assigner(cfg)
    iters = cfg.MODEL.MUSU.WARMUP_ASSIGNER_ITERS
    if iters <= 0:
        return main
    return WarmupSwitch(build_assigner(cfg, "WARMUP_ASSIGNER"), main, iters)
