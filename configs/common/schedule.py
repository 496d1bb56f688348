"""Learning-rate schedules, as multipliers of the optimizer's ``lr`` (fvcore param schedulers)."""

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import DictConfig


def multistep(
    *, max_iter: int, steps: tuple, warmup_iters: int, gamma: float = 0.1, warmup_factor=0.001
) -> DictConfig:
    """The schedule of ``SOLVER.LR_SCHEDULER_NAME WarmupMultiStepLR``: the rate times ``gamma``
    at each of ``steps``, after a linear warm-up from ``warmup_factor`` over ``warmup_iters``."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[gamma**k for k in range(len(steps) + 1)],
            milestones=list(steps),
            num_updates=max_iter,
        ),
        warmup_length=warmup_iters / max_iter,
        warmup_method="linear",
        warmup_factor=warmup_factor,
    )
