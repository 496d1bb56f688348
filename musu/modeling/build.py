"""Assigner registry: ``MODEL.MUSU.ASSIGNER`` names the builder of the detector's assigner.

Like Detectron2's BACKBONE_REGISTRY, entries are builder functions registered under their own
names (``build_musu_assigner`` is the default). A builder takes the config and returns a callable with the :class:`MuSuAssigner` call signature
``(points, scores, pred_boxes, gt_boxes, gt_classes) -> Assignment``. Projects register their
own (e.g. Mutual Guidance, the FCOS rule) with ``@ASSIGNER_REGISTRY.register()`` on a ``build_..._assigner(cfg)`` function.
"""

from __future__ import annotations

from typing import Callable

from fvcore.common.registry import Registry

from .assigner import Assignment, MuSuAssigner

__all__ = ["ASSIGNER_REGISTRY", "build_assigner", "build_musu_assigner"]

ASSIGNER_REGISTRY = Registry("ASSIGNER")
ASSIGNER_REGISTRY.__doc__ = "Builders of assigners: cfg -> callable returning an Assignment."

AssignerFn = Callable[..., Assignment]


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


def build_assigner(cfg, key: str = "ASSIGNER") -> AssignerFn:
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
