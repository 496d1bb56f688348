"""Rendering of the built-in synthetic shapes images (:mod:`musu.data.synthetic` writes them).

Each image shows 1 to ``max_objects`` filled shapes (:data:`CLASSES`) of varied colour, size
(longer side drawn log-uniformly from ``min_object_size`` px to ``max_object_size``, by default
half the image) and aspect ratio, on a textured background (colour
gradient, low-frequency noise, soft blobs, thin lines, pixel noise). Shapes may occlude each other:
a shape is only placed where it leaves every earlier shape at least :data:`MIN_VISIBLE_FRACTION`
visible (otherwise the placement is resampled, and the shape skipped after a few tries), so no
unlabelled, mostly hidden shape remains. Each box is the extent of the shape's *visible* pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

__all__ = ["CLASSES", "MIN_VISIBLE_FRACTION", "render_image"]

CLASSES: tuple[str, ...] = ("circle", "rectangle", "triangle", "ellipse", "star")
MIN_VISIBLE_FRACTION = 0.6
"""Every labelled shape keeps at least this fraction of its drawn pixels visible."""

_PLACEMENT_TRIES = 8


def _hsv_to_bgr(h: float, s: float, v: float) -> np.ndarray:
    """Colour from hue in [0, 1) and saturation / value in [0, 1], as float BGR in [0, 255]."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array([b, g, r], dtype=np.float32) * 255.0


def _random_colour(rng: np.random.Generator, s_range: tuple[float, float]) -> np.ndarray:
    return _hsv_to_bgr(rng.random(), rng.uniform(*s_range), rng.uniform(0.3, 1.0))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured float32 background: gradient + low-frequency noise + soft blobs + thin lines."""
    import cv2

    theta = rng.uniform(0, 2 * math.pi)
    axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
    t = axis[None, :] * math.cos(theta) + axis[:, None] * math.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = _random_colour(rng, (0.0, 0.6)), _random_colour(rng, (0.0, 0.6))
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]

    k = int(rng.integers(3, 9))
    low = rng.normal(0.0, rng.uniform(5, 25), size=(k, k, 3)).astype(np.float32)
    img += cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)

    small = max(size // 4, 8)  # blobs are drawn and blurred at low resolution, then upsampled
    for _ in range(int(rng.integers(0, 6))):
        layer = np.zeros((small, small), np.float32)
        centre = (int(rng.integers(0, small)), int(rng.integers(0, small)))
        axes = tuple(int(a) for a in rng.integers(small // 16 + 1, small // 4 + 2, size=2))
        cv2.ellipse(layer, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        layer = cv2.GaussianBlur(layer, (0, 0), sigmaX=small / rng.uniform(12, 30))
        layer = cv2.resize(layer, (size, size), interpolation=cv2.INTER_LINEAR)
        alpha = (rng.uniform(0.3, 0.8) * layer)[..., None]
        img = img * (1 - alpha) + _random_colour(rng, (0.0, 0.8)) * alpha

    for _ in range(int(rng.integers(0, 9))):
        p0 = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        p1 = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        colour = tuple(float(c) for c in _random_colour(rng, (0.0, 1.0)))
        cv2.line(img, p0, p1, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _shape_polygon(rng: np.random.Generator, cls: int, length: float) -> np.ndarray:
    """Polygon (P, 2) centred near the origin; ``length`` is the shape's longer side."""
    name = CLASSES[cls]
    if name in ("circle", "ellipse"):
        a = length / 2
        if name == "circle":
            b, phi = a, 0.0
        else:
            b, phi = a / rng.uniform(1.6, 3.0), rng.uniform(0, math.pi)
        t = np.linspace(0, 2 * math.pi, max(24, int(length)), endpoint=False)
        pts = np.stack([a * np.cos(t), b * np.sin(t)], axis=1)
        rot = np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])
        return pts @ rot.T
    if name == "rectangle":
        ratio = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        w, h = (length, length / ratio) if ratio >= 1 else (length * ratio, length)
        return np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    if name == "triangle":
        ratio = math.exp(rng.uniform(math.log(0.5), math.log(2)))
        w, h = (length, length / ratio) if ratio >= 1 else (length * ratio, length)
        apex = -w / 2 + rng.uniform(0, 1) * w
        pts = np.array([[apex, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
        quarter = int(rng.integers(0, 4))
        rot = np.array([[0, -1], [1, 0]]) if quarter % 2 else np.eye(2)
        return (pts @ rot.T) * (-1 if quarter >= 2 else 1)
    # star: 5 outer points, inner radius ratio varies, stretched a little along x.
    outer = length / 2
    inner = outer * rng.uniform(0.38, 0.55)
    t = rng.uniform(0, 2 * math.pi) + np.arange(10) * math.pi / 5
    radius = np.where(np.arange(10) % 2 == 0, outer, inner)
    pts = np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    return pts * np.array([rng.uniform(0.75, 1.25), 1.0])


class _Placement(NamedTuple):
    """Where a shape goes: its offset and image window, its masks there, and what stays visible."""

    offset: np.ndarray  # (2,) x, y added to the polygon
    window: tuple[slice, slice]  # rows, columns of the image that the masks cover
    fill: np.ndarray  # uint8 mask of the interior, window-sized
    edge: np.ndarray  # uint8 mask of the outline (all zero without one)
    cover: np.ndarray  # bool, fill | edge
    left: np.ndarray  # (K,) visible pixels of each earlier shape once this one is on top


@dataclass
class _Layers:
    """The shapes placed so far: which is on top of each pixel, and per shape its class, window,
    pixel count when drawn and pixel count still on top."""

    owner: np.ndarray  # (S, S) int16 index of the shape on top of a pixel, -1 for background
    classes: list[int] = field(default_factory=list)
    windows: list[tuple[slice, slice]] = field(default_factory=list)
    drawn_area: list[int] = field(default_factory=list)
    visible: list[int] = field(default_factory=list)

    def add(self, cls: int, placement: _Placement) -> None:
        """Put the shape of ``placement`` on top of the earlier ones."""
        self.owner[placement.window][placement.cover] = len(self.classes)
        self.visible = [int(v) for v in placement.left] + [int(placement.cover.sum())]
        self.drawn_area.append(int(placement.cover.sum()))
        self.windows.append(placement.window)
        self.classes.append(cls)


def _rasterize(poly: np.ndarray, offset: np.ndarray, outline: int, layers: _Layers) -> _Placement:
    """Masks of ``poly`` moved by ``offset``, in its window only (to keep the cost per shape
    small), and the pixels each earlier shape keeps on top if it is drawn there."""
    import cv2

    size = layers.owner.shape[0]
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    margin = outline + 1
    x0, y0 = np.maximum(np.floor(offset + lo).astype(int) - margin, 0)
    x1, y1 = np.minimum(np.ceil(offset + hi).astype(int) + margin + 1, size)
    win = (slice(y0, y1), slice(x0, x1))
    pts = np.round((poly + offset - (x0, y0)) * 16).astype(np.int32)
    fill = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(fill, [pts], 1, cv2.LINE_8, 4)
    edge = np.zeros_like(fill)
    if outline:
        cv2.polylines(edge, [pts], True, 1, outline, cv2.LINE_8, 4)
    cover = (fill | edge).astype(bool)
    hidden = np.bincount(layers.owner[win][cover] + 1, minlength=len(layers.classes) + 1)[1:]
    left = np.asarray(layers.visible, dtype=np.int64) - hidden
    return _Placement(offset, win, fill, edge, cover, left)


def _place_shape(
    rng: np.random.Generator, poly: np.ndarray, outline: int, layers: _Layers
) -> _Placement | None:
    """A random placement of ``poly`` inside the image that leaves every earlier shape at least
    :data:`MIN_VISIBLE_FRACTION` visible, or None after :data:`_PLACEMENT_TRIES` failures."""
    size = layers.owner.shape[0]
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    margin = outline + 1
    for _ in range(_PLACEMENT_TRIES):
        offset = rng.uniform(margin - lo, size - 1 - margin - hi)
        placement = _rasterize(poly, offset, outline, layers)
        if np.all(placement.left >= MIN_VISIBLE_FRACTION * np.asarray(layers.drawn_area)):
            return placement
    return None


def _paint_shape(
    rng: np.random.Generator,
    img: np.ndarray,
    poly: np.ndarray,
    placement: _Placement,
    outline: int,
) -> None:
    """Paint the shape into float ``img`` in place: a random colour with a linear shading ramp,
    and a darker outline when ``outline`` > 0."""
    win, fill, offset = placement.window, placement.fill, placement.offset
    x0, y0 = win[1].start, win[0].start
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    colour = _random_colour(rng, (0.35, 1.0))
    phi = rng.uniform(0, 2 * math.pi)
    ys, xs = np.nonzero(fill)
    ramp = (xs + x0 - offset[0]) * math.cos(phi) + (ys + y0 - offset[1]) * math.sin(phi)
    shade = 1.0 + rng.uniform(0.0, 0.35) * np.clip(ramp / (hi - lo).max(), -1, 1)
    region = img[win]
    region[ys, xs] = np.clip(colour * shade[:, None], 0, 255)
    if outline:
        region[placement.edge.astype(bool) & ~fill.astype(bool)] = colour * rng.uniform(0.2, 0.6)


def _finish_image(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Add pixel noise to float ``img`` (in place), sometimes blur it; return it as uint8."""
    import cv2

    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 9))
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _visible_objects(layers: _Layers) -> list[dict[str, Any]]:
    """COCO object dicts of the placed shapes, each boxed by the extent of its visible pixels."""
    objects = []
    for i, (cls, win) in enumerate(zip(layers.classes, layers.windows)):
        ys, xs = np.nonzero(layers.owner[win] == i)
        if len(xs) < MIN_VISIBLE_FRACTION * layers.drawn_area[i]:
            continue  # safeguard; the placement check already prevents this
        x0, y0 = int(xs.min()) + win[1].start, int(ys.min()) + win[0].start
        w, h = int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1
        if w < 2 or h < 2:
            continue
        bbox = [float(x0), float(y0), float(w), float(h)]
        objects.append({"category_id": cls + 1, "bbox": bbox, "area": float(len(xs))})
    return objects


def render_image(
    seed: int,
    index: int,
    image_size: int = 256,
    max_objects: int = 12,
    min_object_size: int = 12,
    max_object_size: int | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Render image ``index`` of the stream defined by ``seed``.

    Returns:
        ``(image, objects)``: a BGR ``uint8`` array of shape ``(S, S, 3)`` and at least one
        object dict with ``category_id`` (1-based index into :data:`CLASSES`), ``bbox``
        (``[x, y, w, h]`` in pixels, inside the image, ``w, h >= 2``) and ``area`` (visible
        pixel count). The result depends only on the arguments.
    """
    size = image_size
    rng = np.random.default_rng([seed, index])
    img = _background(rng, size)
    layers = _Layers(owner=np.full((size, size), -1, dtype=np.int16))
    longest = size / 2 if max_object_size is None else max_object_size
    log_min, log_max = math.log(min_object_size), math.log(longest)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(0, len(CLASSES)))
        poly = _shape_polygon(rng, cls, math.exp(rng.uniform(log_min, log_max)))
        outline = int(rng.integers(1, 3)) if rng.random() < 0.3 else 0
        placement = _place_shape(rng, poly, outline, layers)
        if placement is None:
            continue  # no placement leaves the earlier shapes visible enough: skip this shape
        _paint_shape(rng, img, poly, placement, outline)
        layers.add(cls, placement)
    return _finish_image(rng, img), _visible_objects(layers)
