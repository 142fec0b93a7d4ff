"""Captions of the built-in data: the class vocabulary and templated, noisy text.

A scene is anything with ``objects``, ``colour``, ``shape``, ``size``, ``region`` and ``label``
(the generator's private scene record).
"""

from __future__ import annotations

from typing import Any

import numpy as np

Scene = Any

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple")
CLASSNAMES = [f"{c} {s}" for s in SHAPES for c in COLOURS]   # label = shape * 5 + colour


# --- captions ----------------------------------------------------------------------------------

_COUNT_WORDS = {1: ("a", "one", "1", "a single"), 2: ("two", "2", "a pair of"),
                3: ("three", "3")}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_POSITIONS = {
    "left": ("on the left", "on the left side", "at the left of the picture"),
    "right": ("on the right", "on the right side", "at the right of the image"),
    "top": ("near the top", "at the top", "in the upper part of the picture"),
    "bottom": ("near the bottom", "at the bottom", "in the lower part of the image"),
    "centre": ("in the centre", "in the middle", "in the centre of the picture"),
    "anywhere": ("",),
}
_CAPTIONS = (
    "{n} {adj} {noun} {pos}",
    "a photo of {n} {adj} {noun} {pos}",
    "{n} {adj} {noun}",
    "an image showing {n} {adj} {noun} {pos}",
    "there {be} {n} {adj} {noun} {pos}",
    "picture of {n} {adj} {noun} {pos} on a plain background",
)
_JUNK = ("IMG_{:04d}.jpg", "DSC{:05d}.JPG", "click here", "image", "thumbnail", "download now",
         "untitled", "photo", "{:08x}.png", "Screenshot {:04d}", "no description available")
_STUFFING = ("free", "hd", "wallpaper", "download", "best", "cheap", "stock photo", "vector",
             "clipart", "png", "high quality", "buy now", "sale", "4k", "icon", "logo")


def _plural(noun: str, n: int) -> str:
    if n == 1:
        return noun
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A varied, grammatical caption naming count, (size), colour, shape and (position)."""
    count = len(scene.objects)
    n = _pick(rng, _COUNT_WORDS[count])
    adj = COLOURS[scene.colour]
    if rng.random() < 0.7:
        adj = f"{_pick(rng, _SIZE_WORDS[scene.size])} {adj}"
    if n == "a" and adj[0] in "aeiou":
        n = "an"
    pos = _pick(rng, _POSITIONS[scene.region]) if rng.random() < 0.8 else ""
    text = _pick(rng, _CAPTIONS).format(
        n=n, adj=adj, noun=_plural(SHAPES[scene.shape], count), pos=pos,
        be="is" if count == 1 else "are")
    text = " ".join(text.split())
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    return text + ("." if rng.random() < 0.3 else "")


def junk_alt_text(rng: np.random.Generator) -> str:
    """Alt-text junk such as ``IMG_4821.jpg`` or ``click here``."""
    return _pick(rng, _JUNK).format(int(rng.integers(0, 100000)))


def stuffed(caption: str, scene: Scene, rng: np.random.Generator, min_chars: int) -> str:
    """The caption followed by keyword stuffing until it exceeds ``min_chars`` characters."""
    words = list(_STUFFING) + [COLOURS[scene.colour], SHAPES[scene.shape], CLASSNAMES[scene.label]]
    target = min_chars + int(rng.integers(1, 500))
    parts, length = [caption], len(caption)
    while length <= target:
        parts.append(_pick(rng, words))
        length += len(parts[-1]) + 1
    return " ".join(parts)


__all__ = ["CLASSNAMES", "COLOURS", "SHAPES", "caption", "junk_alt_text", "stuffed"]
