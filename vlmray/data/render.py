"""Text rendered as an image (CLIPPO): a caption -> uint8 (3, S, S), word-wrapped, black on grey,
with the font Pillow embeds (no font files, no downloads).

CLIPPO (Tschannen et al., 2023) renders alt-text with GNU Unifont at 16 px on a 224 px canvas,
lower-cased, black (0) on mid-grey (127); the same drawing serves training (the views stage,
``schema.TEXT_PIXELS``) and evaluation (captions and class prompts in ``vlmray.eval``), so both
must call :func:`render_text` with the same arguments. Small canvases use a relatively larger
font (``size // 8``: 8 px at 64 px), so a 10-15 word caption still fits and stays legible.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TEXT_BRIGHTNESS = 0
BACKGROUND_BRIGHTNESS = 127   # mid-grey: about zero once pixels are standardised


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def default_font_size(size: int) -> int:
    """The font size :func:`render_text` picks for a ``size`` x ``size`` canvas."""
    return max(6, size // 8)


def render_text(text: str, size: int, *, font_size: int = 0, lower: bool = True) -> np.ndarray:
    """``text`` drawn onto a ``size`` x ``size`` grey canvas -> uint8 (3, size, size).

    Words wrap at the right edge; lines that do not fit below are dropped. ``font_size`` 0
    picks :func:`default_font_size`. ``lower`` lower-cases first (as the paper's renderer).
    Deterministic: the same arguments give the same pixels."""
    font_size = font_size or default_font_size(size)
    font = _font(font_size)
    canvas = Image.new("L", (size, size), BACKGROUND_BRIGHTNESS)
    draw = ImageDraw.Draw(canvas)
    line_h = font_size + 1
    y, line = 0, ""
    for word in (text.lower() if lower else text).split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > size - 2:
            draw.text((1, y), line, fill=TEXT_BRIGHTNESS, font=font)
            y, line = y + line_h, word
            if y + line_h > size:
                line = ""
                break
        else:
            line = trial
    if line:
        draw.text((1, y), line, fill=TEXT_BRIGHTNESS, font=font)
    grey = np.asarray(canvas, dtype=np.uint8)
    return np.repeat(grey[None], 3, axis=0)                                  # (3, S, S)


def render_texts(texts: Sequence[str], size: int, **kwargs: object) -> np.ndarray:
    """Many strings -> uint8 (N, 3, size, size); ``kwargs`` as :func:`render_text`."""
    if not texts:
        return np.zeros((0, 3, size, size), dtype=np.uint8)
    return np.stack([render_text(str(t), size, **kwargs) for t in texts])    # (N, 3, S, S)


__all__ = ["BACKGROUND_BRIGHTNESS", "TEXT_BRIGHTNESS", "default_font_size", "render_text",
           "render_texts"]
