"""Optimizers. ``SGD``: Detectron2's ``SOLVER`` defaults (momentum 0.9, weight decay 1e-4, none on
norm layers). ``AdamW``: the optimizer ViTDet trains plain ViTs with. Set
``optimizer.params.model`` to the model before instantiating."""

import torch
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

SGD = L(torch.optim.SGD)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
    nesterov=False,
)

AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=0.1,
)
