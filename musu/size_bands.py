"""COCO's object size bands, defined once for every per-size statistic in musu.

An object's band is read from its box side ``sqrt(w * h)`` (COCO's area thresholds 32^2 and
96^2 are sides 32 and 96): small below 32, medium from 32 up to 96, large from 96 on.
"""

from __future__ import annotations

import math
from typing import Tuple

__all__ = ["SIZE_BANDS", "size_band"]

SIZE_BANDS: Tuple[Tuple[str, float, float], ...] = (
    ("small", 0.0, 32.0),
    ("medium", 32.0, 96.0),
    ("large", 96.0, math.inf),
)
"""(name, lowest side, side bound) per band; a band holds sides in [lowest, bound)."""


def size_band(side: float) -> str:
    """The name of the band of an object whose box side ``sqrt(w * h)`` is ``side`` (>= 0)."""
    for name, low, high in SIZE_BANDS:
        if low <= side < high:
            return name
    raise ValueError(f"size_band: side must be a finite number >= 0, got {side!r}")
