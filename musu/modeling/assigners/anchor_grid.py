"""Anchor layouts an assigner is called with: :class:`AnchorGrid` (FPN grids of points) and
:class:`AnchorList` (explicit points / boxes). Both implement the ``Anchors`` protocol of
``base.py``.

An :class:`AnchorGrid` lists the points inside each box directly from the grid arithmetic
(memory and time O(P) for P inside pairs) instead of testing every (object, point) pair.
Shapes: N images, M objects (padded to M_max), R anchor slots, L levels, P inside pairs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .geometry import points_in_boxes

__all__ = ["AnchorGrid", "AnchorList", "dense_inside_pairs"]


def dense_inside_pairs(points: Tensor, boxes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(image, object, anchor) triples with the point strictly inside the box, from one
    (N, M_max, R) boolean test, in that order. points (R, 2); boxes (N, M_max, 4)."""
    return points_in_boxes(points, boxes).nonzero(as_tuple=True)


@dataclass(frozen=True)
class AnchorGrid:
    """Layout of anchor points on FPN grids: level l has an H_l x W_l grid of stride s_l, point
    (j, i) at ((j + 0.5) * s_l, (i + 0.5) * s_l), repeated for A slots; flattened in
    (level, H, W, A) order, as the head outputs are.
    """

    feature_sizes: Tuple[Tuple[int, int], ...]
    strides: Tuple[float, ...]
    num_anchors: int

    @property
    def num_slots(self) -> int:
        """R = sum over levels of H_l * W_l * A."""
        return sum(h * w for h, w in self.feature_sizes) * self.num_anchors

    def points(self, device: torch.device | str = "cpu") -> Tensor:
        """(R, 2) float32 points (x, y) in (level, H, W, A) order.

        Cached per (grid, device): repeated calls return the same tensor, so treat it as
        read-only (clone before modifying it in place).
        """
        return _grid_tensors(self, torch.device(device))[0]

    def point_strides(self, device: torch.device | str = "cpu") -> Tensor:
        """(R,) float32 stride of every point, same order and caching as :meth:`points`."""
        return _grid_tensors(self, torch.device(device))[1]

    def boxes(self, device: torch.device | str = "cpu") -> Tensor:
        """Not defined: a grid has points only (anchor-box assigners take an AnchorList)."""
        raise ValueError("AnchorGrid has anchor points only; pass AnchorList(boxes=...) instead")

    def inside_pairs(self, boxes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(image, object, anchor) index triples of points strictly inside ``boxes``
        (N, M_max, 4) float32, listed per box; the same triples, in the same order, as
        :func:`dense_inside_pairs` on :meth:`points`."""
        return _grid_inside_pairs(self, boxes)


class AnchorList:
    """Anchors given explicitly: points (R, 2), and optionally strides (R,) and boxes (R, 4).

    Without ``points`` the points are the box centres. Inside pairs come from one dense
    (N, M_max, R) test.
    """

    def __init__(
        self,
        points: Optional[Tensor] = None,
        strides: Optional[Tensor] = None,
        boxes: Optional[Tensor] = None,
    ) -> None:
        if boxes is not None and (boxes.dim() != 2 or boxes.shape[1] != 4):
            raise ValueError(f"AnchorList: boxes must have shape (R, 4), got {tuple(boxes.shape)}")
        if points is None:
            if boxes is None:
                raise ValueError("AnchorList: give points (R, 2) or boxes (R, 4)")
            points = (boxes[:, :2] + boxes[:, 2:]) / 2
        if points.dim() != 2 or points.shape[1] != 2:
            raise ValueError(
                f"AnchorList: points must have shape (R, 2), got {tuple(points.shape)}"
            )
        for name, value in (("strides", strides), ("boxes", boxes)):
            if value is not None and len(value) != len(points):
                raise ValueError(
                    f"AnchorList: {name} must have R={len(points)} rows, got {tuple(value.shape)}"
                )
        self._points, self._strides, self._boxes = points, strides, boxes

    def __repr__(self) -> str:
        extras = [
            k for k, v in (("strides", self._strides), ("boxes", self._boxes)) if v is not None
        ]
        return f"AnchorList(R={self.num_slots}{''.join(', ' + k for k in extras)})"

    @property
    def num_slots(self) -> int:
        return len(self._points)

    def points(self, device: torch.device | str = "cpu") -> Tensor:
        return self._points.to(device=device, dtype=torch.float32)

    def point_strides(self, device: torch.device | str = "cpu") -> Tensor:
        if self._strides is None:
            raise ValueError("AnchorList: this assigner needs strides: AnchorList(points, strides)")
        return self._strides.to(device=device, dtype=torch.float32)

    def boxes(self, device: torch.device | str = "cpu") -> Tensor:
        if self._boxes is None:
            raise ValueError("AnchorList: this assigner needs anchor boxes: AnchorList(boxes=...)")
        return self._boxes.to(device=device, dtype=torch.float32)

    def inside_pairs(self, boxes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return dense_inside_pairs(self.points(boxes.device), boxes)


@functools.lru_cache(maxsize=64)
def _grid_tensors(grid: AnchorGrid, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Points (R, 2) and strides (R,) of a grid, built once per (grid, device).

    Built as normal tensors even under ``torch.inference_mode`` so that a grid first seen during
    evaluation can still serve training.
    """
    with torch.inference_mode(False):
        return _build_grid_tensors(grid, device)


def _coordinates(index: Tensor, stride) -> Tensor:
    """Float32 coordinate (index + 0.5) * stride; the one formula for grid coordinates."""
    return (index.to(torch.float32) + 0.5) * stride


def _build_grid_tensors(grid: AnchorGrid, device: torch.device) -> Tuple[Tensor, Tensor]:
    points, strides = [], []
    for (height, width), stride in zip(grid.feature_sizes, grid.strides):
        xs = _coordinates(torch.arange(width, device=device), float(stride))  # (W,)
        ys = _coordinates(torch.arange(height, device=device), float(stride))  # (H,)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
        level = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)  # (H*W, 2)
        points.append(level.repeat_interleave(grid.num_anchors, dim=0))
        count = height * width * grid.num_anchors
        strides.append(torch.full((count,), float(stride), device=device))
    if not points:
        return torch.zeros(0, 2, device=device), torch.zeros(0, device=device)
    return torch.cat(points), torch.cat(strides)


@functools.lru_cache(maxsize=64)
def _grid_levels(grid: AnchorGrid, device: torch.device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per level (L,): heights, widths (long), strides (float32), offset of its first slot."""
    with torch.inference_mode(False):
        heights = torch.tensor([h for h, _ in grid.feature_sizes], device=device)
        widths = torch.tensor([w for _, w in grid.feature_sizes], device=device)
        strides = torch.tensor(grid.strides, dtype=torch.float32, device=device)
        slots_per_level = heights * widths * grid.num_anchors
        level_offset = torch.cumsum(slots_per_level, 0) - slots_per_level
    return heights, widths, strides, level_offset


def _grid_index_range(
    low: Tensor, high: Tensor, stride: Tensor, size: Tensor
) -> Tuple[Tensor, Tensor]:
    """Smallest and largest grid index whose coordinate lies strictly inside (low, high).

    low, high: (N, M, 1) float32; stride, size: (L,). Returns (N, M, L) long, first > last when
    empty. The float64 estimate is corrected by one step each way against the float32 coordinates
    of AnchorGrid.points, so the result equals a direct comparison with those points.
    """
    stride64 = stride.to(torch.float64)
    first = torch.floor(low.double() / stride64 - 0.5).long() + 1  # (N, M, L)
    last = torch.ceil(high.double() / stride64 - 0.5).long() - 1
    first = first - (_coordinates(first - 1, stride) > low).long()
    first = first + (_coordinates(first, stride) <= low).long()
    last = last + (_coordinates(last + 1, stride) < high).long()
    last = last - (_coordinates(last, stride) >= high).long()
    return first.clamp(min=0), torch.minimum(last, size - 1)


def _grid_inside_pairs(grid: AnchorGrid, boxes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """:meth:`AnchorGrid.inside_pairs`; padding boxes of zeros contain no point."""
    device = boxes.device
    max_objects = boxes.shape[1]
    slots = grid.num_anchors
    heights, widths, strides, level_offset = _grid_levels(grid, device)  # (L,) each
    x_first, x_last = _grid_index_range(boxes[..., 0:1], boxes[..., 2:3], strides, widths)
    y_first, y_last = _grid_index_range(boxes[..., 1:2], boxes[..., 3:4], strides, heights)
    num_x = (x_last - x_first + 1).clamp(min=0)  # (N, M, L)
    num_y = (y_last - y_first + 1).clamp(min=0)
    counts = (num_x * num_y * slots).reshape(-1)  # (G,) one group per (image, object, level)
    group = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)  # (P,)
    start = torch.cumsum(counts, 0) - counts
    local = torch.arange(len(group), device=device) - start[group]  # (P,) index inside group
    slot, cell = local % slots, local // slots
    row_length = num_x.reshape(-1)[group]
    row = y_first.reshape(-1)[group] + cell // row_length
    column = x_first.reshape(-1)[group] + cell % row_length
    num_levels = len(grid.feature_sizes)
    level = group % num_levels
    anchor = level_offset[level] + (row * widths[level] + column) * slots + slot
    return group // (num_levels * max_objects), (group // num_levels) % max_objects, anchor
