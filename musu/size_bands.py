"""COCO's object size bands, defined once for every per-size statistic in musu.

An object's band is read from its box side ``sqrt(w * h)`` (COCO's area thresholds 32^2 and
96^2 are sides 32 and 96): small below 32, medium from 32 up to 96, large from 96 on.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["SIZE_BANDS", "box_size_bands"]

SIZE_BANDS: Tuple[Tuple[str, float, float], ...] = (
    ("small", 0.0, 32.0),
    ("medium", 32.0, 96.0),
    ("large", 96.0, math.inf),
)
"""(name, lowest side, side bound) per band; a band holds sides in [lowest, bound)."""


def box_size_bands(boxes: Tensor) -> Tensor:
    """(M,) long index into :data:`SIZE_BANDS` of each XYXY box of ``boxes`` (M, 4), from its
    side sqrt(w * h) (an empty or inverted box has side 0: small)."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    sides = (wh[:, 0] * wh[:, 1]).sqrt()
    bounds = torch.tensor([low for _, low, _ in SIZE_BANDS[1:]], dtype=sides.dtype)
    return torch.bucketize(sides, bounds.to(sides.device), right=True)
