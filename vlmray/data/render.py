"""Text rendered as an image (CLIPPO): a caption -> uint8 (3, S, S), word-wrapped, black on
white, with the font Pillow embeds (no font files, no downloads)."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render_text(text: str, size: int, *, font_size: int = 0) -> np.ndarray:
    """``text`` drawn onto a white ``size`` x ``size`` canvas -> uint8 (3, size, size).

    Words wrap at the right edge; lines that do not fit below are dropped. ``font_size`` 0
    picks about a sixth of the side (at least 6 px), so short captions stay legible."""
    font_size = font_size or max(6, size // 6)
    font = _font(font_size)
    canvas = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(canvas)
    line_h = font_size + 1
    y, line = 0, ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > size - 2:
            draw.text((1, y), line, fill=0, font=font)
            y, line = y + line_h, word
            if y + line_h > size:
                line = ""
                break
        else:
            line = trial
    if line:
        draw.text((1, y), line, fill=0, font=font)
    grey = np.asarray(canvas, dtype=np.uint8)
    return np.repeat(grey[None], 3, axis=0)                                  # (3, S, S)


__all__ = ["render_text"]
