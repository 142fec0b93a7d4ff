"""Scenes of the built-in dataset: sampling what an image shows, and drawing it.

A scene is 1-3 objects of one shape and colour in a region of the image, drawn anti-aliased
over a smooth per-image backdrop with seeded pixel noise. Pure functions of their generator, so
:mod:`vlmray.data.synthetic` can regenerate any sample alone.
"""

from __future__ import annotations

import functools
import io
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vlmray.data.synthetic_text import COLOURS, SHAPES

_RGB = {"red": (205, 40, 40), "green": (40, 165, 60), "blue": (45, 75, 210),
        "yellow": (235, 205, 30), "purple": (135, 50, 175)}
_RADII = {"small": (0.07, 0.10), "large": (0.14, 0.19)}      # normalised object radius
_REGIONS = {                                                  # where centres may fall
    "left": (0.0, 0.0, 0.42, 1.0), "right": (0.58, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.42), "bottom": (0.0, 0.58, 1.0, 1.0),
    "centre": (0.3, 0.3, 0.7, 0.7), "anywhere": (0.0, 0.0, 1.0, 1.0),
}


@dataclass(frozen=True)
class Scene:
    """What an image shows; objects are (cx, cy, r) in [0, 1] image coordinates."""

    shape: int
    colour: int
    size: str
    region: str
    objects: tuple[tuple[float, float, float], ...]

    @property
    def label(self) -> int:
        return self.shape * len(COLOURS) + self.colour


def rng_for(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """An independent generator for one (seed, split, index, stream)."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index, stream])


def _place(rng: np.random.Generator, region: str, count: int, size: str) -> list[tuple]:
    """Sample ``count`` object (cx, cy, r) in ``region``, avoiding overlaps when possible."""
    x0, y0, x1, y1 = _REGIONS[region]
    objects: list[tuple[float, float, float]] = []
    for _ in range(count):
        r = float(rng.uniform(*_RADII[size]))
        lo_x, lo_y = max(x0, r), max(y0, r)
        hi_x, hi_y = max(lo_x, min(x1, 1 - r)), max(lo_y, min(y1, 1 - r))
        for _attempt in range(20):
            cx, cy = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
            if all(math.hypot(cx - ox, cy - oy) > 1.05 * (r + orr) for ox, oy, orr in objects):
                break
        objects.append((cx, cy, r))
    return objects


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene: class, count (1-3), size, region and object placements."""
    shape, colour = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS)))
    count = int(rng.integers(1, 4))
    size = ("small", "large")[int(rng.integers(2))]
    region = list(_REGIONS)[int(rng.integers(len(_REGIONS)))]
    return Scene(shape, colour, size, region, tuple(_place(rng, region, count, size)))


# Object extent around its centre, in units of r: (left, up, right, down).
_EXTENT = {"circle": (1.0, 1.0, 1.0, 1.0), "square": (0.85, 0.85, 0.85, 0.85),
           "triangle": (0.95, 1.0, 0.95, 0.8), "cross": (1.0, 1.0, 1.0, 1.0)}


def _polygons(shape: str, cx: float, cy: float, r: float) -> list[list[tuple[float, float]]]:
    """Polygons (pixel coordinates) that draw a square, triangle or cross."""
    if shape == "square":
        h = 0.85 * r
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "triangle":
        return [[(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]]
    w = 0.35 * r                                              # cross: two bars
    return [[(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
            [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)]]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
          fill: tuple[int, int, int]) -> None:
    """Draw one object centred at (cx, cy) with radius r, in pixels."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    for poly in _polygons(shape, cx, cy, r):
        draw.polygon(poly, fill=fill)


def boxes_of(scene: Scene) -> list[list[float]]:
    """Normalised (x0, y0, x1, y1) box per object, clipped to [0, 1]."""
    left, up, right, down = _EXTENT[SHAPES[scene.shape]]
    out = []
    for cx, cy, r in scene.objects:
        box = (cx - left * r, cy - up * r, cx + right * r, cy + down * r)
        out.append([round(min(max(v, 0.0), 1.0), 4) for v in box])
    return out


@functools.lru_cache(maxsize=4)
def _noise_bank(n: int) -> np.ndarray:
    """A fixed bank of 4n triangular int16 noise values in [-15, 15] (std ~6.5)."""
    raw = np.random.default_rng(n).integers(0, 16, (2, 4 * n), dtype=np.int16)
    return raw[0] + raw[1] - 15


def _backdrop(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth, per-image background pattern: three low-frequency waves (int16, (S, S, 1)).

    Web photos differ in their low frequencies; without this, every built-in image would be a
    nearly flat field and perceptual hashes of distinct images would collide."""
    y, x = np.mgrid[0:size, 0:size] / size
    field = np.zeros((size, size))
    for _ in range(3):
        kx, ky = (int(v) for v in rng.integers(-2, 3, 2))
        kx = kx if (kx, ky) != (0, 0) else 1
        phase = rng.uniform(0, 2 * np.pi)
        field += rng.uniform(10, 22) * np.cos(2 * np.pi * (kx * x + ky * y) + phase)
    return field.astype(np.int16)[..., None]


def render(scene: Scene, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw the scene: (size, size, 3) uint8. Drawn at 2x and box-downsampled (anti-aliasing),
    over a smooth per-image backdrop; pixel noise is a seeded window into a fixed noise bank
    (much cheaper than fresh draws)."""
    big = 2 * size
    grey = rng.uniform(175, 245)
    background = tuple(int(min(255.0, grey + t)) for t in rng.uniform(-12, 12, 3))
    canvas = Image.new("RGB", (big, big), background)
    mask = Image.new("L", (big, big), 0)
    draw, draw_mask = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    base = _RGB[COLOURS[scene.colour]]
    for cx, cy, r in scene.objects:
        fill = tuple(min(255, max(0, b + int(j))) for b, j in zip(base, rng.integers(-18, 19, 3)))
        _draw(draw, SHAPES[scene.shape], cx * big, cy * big, r * big, fill)
        _draw(draw_mask, SHAPES[scene.shape], cx * big, cy * big, r * big, 255)
    pixels = np.asarray(canvas.reduce(2), dtype=np.float32)    # (H, W, 3)
    behind = 1.0 - np.asarray(mask.reduce(2), dtype=np.float32)[..., None] / 255.0
    pixels = (pixels + behind * _backdrop(rng, size)).astype(np.int16)
    n = pixels.size
    start = int(rng.integers(0, 3 * n))
    noise = _noise_bank(n)[start:start + n].reshape(pixels.shape)
    return np.clip(pixels + noise, 0, 255).astype(np.uint8)


def object_mask(shape: str, objects: Sequence[Sequence[float]], size: int) -> np.ndarray:
    """Where ``render`` draws the objects at ``size``: bool (size, size), True on pixels at
    least half covered. Drawn as ``render`` draws its alpha mask (at 2x, box-downsampled), so
    the coverage is exactly the one ``render`` blends with; ``objects`` are (cx, cy, r) in
    [0, 1] image coordinates and ``shape`` is one of ``SHAPES``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")
    big = 2 * size
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for cx, cy, r in objects:
        _draw(draw, shape, cx * big, cy * big, r * big, 255)
    coverage = np.asarray(mask.reduce(2), dtype=np.uint8)            # (size, size) in [0, 255]
    return coverage >= 128


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    """Encode (H, W, 3) uint8 as JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


__all__ = ["Scene", "boxes_of", "jpeg", "object_mask", "render", "rng_for", "sample_scene"]
