"""A corpus of malformed and odd image-text rows, each with the outcome curation should give.

    from tests.data.curation.corpus import bad_rows
    rows = bad_rows()      # [{KEY, IMAGE, TEXT, META, "expect_reason", "expect_repair"}, ...]

``expect_reason`` is the reject reason ("" = kept) and ``expect_repair`` the one repair the row
gets ("" = none). Images are real photographs from ``skimage.data``'s files (downscaled) or
drawn with PIL; every kept row has a distinct image and caption, so deduplication keeps them
all. The last row is a plain good one (callers may duplicate it to test duplicate keys).
Deterministic: the same bytes on every call; builds in well under a second.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import zlib
from typing import Any

import numpy as np
import skimage.data
from PIL import Image, ImageDraw

from vlmray.data.schema import IMAGE, KEY, META, TEXT

EXPECT_REASON, EXPECT_REPAIR = "expect_reason", "expect_repair"
BOMB_SIDE = 14_000            # 196 M pixels declared, in a ~25 KB valid 1-bit PNG


# --- images ------------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(name: str, width: int) -> Image.Image:
    """A ``skimage.data`` sample (e.g. ``astronaut.png``) downscaled to ``width`` pixels wide,
    as RGB. Read with PIL: ``skimage.data.astronaut()`` would first import scipy (~1 s)."""
    with Image.open(os.path.join(skimage.data.data_dir, name)) as im:
        img = im.convert("RGB")
    return img.resize((width, round(img.height * width / img.width)), Image.Resampling.BICUBIC)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


@functools.cache
def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit black PNG of ``side`` x ``side`` pixels: a few tens of KB on disk."""
    row = b"\x00" * (100 * (1 + (side + 7) // 8))          # 100 rows: filter byte + bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side // 100))
    idat += comp.compress(b"\x00" * ((side % 100) * (1 + (side + 7) // 8))) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def exif_rotated_jpeg() -> bytes:
    """A 96x64 landscape JPEG whose EXIF orientation (6) says: show it rotated, 64x96."""
    exif = Image.Exif()
    exif[0x0112] = 6
    img = _photo("rocket.jpg", 96).resize((96, 64))
    return _encode(img, "JPEG", quality=90, exif=exif.tobytes())


def grey16_png() -> bytes:
    """A 16-bit greyscale PNG using only the range 4096..61216 (not 0..255)."""
    camera = np.asarray(_photo("camera.png", 80).convert("L"), np.float64)
    return _encode(Image.fromarray((4096 + camera * 224).astype(np.uint16)), "PNG")


def palette_alpha_png() -> bytes:
    """A palette PNG whose index 0 is transparent: a quantised photo with a clear hole."""
    img = _photo("color.png", 72).quantize(64)
    ImageDraw.Draw(img).ellipse((20, 16, 52, 48), fill=0)
    return _encode(img, "PNG", transparency=0)


def animated_gif() -> bytes:
    """Two different frames; the first is kept."""
    frames = [_photo(name, 80).quantize(128) for name in ("clock_motion.png", "coins.png")]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100,
                   loop=0)


def cmyk_jpeg() -> bytes:
    return _encode(_photo("chelsea.png", 90).convert("CMYK"), "JPEG", quality=92)


def _drawn(size: tuple[int, int], seed: int) -> Image.Image:
    """Random coloured rectangles on white (for the size-rejected rows)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(size[0])), int(rng.integers(size[1]))
        draw.rectangle((x0, y0, x0 + size[0] // 3, y0 + size[1] // 3),
                       fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


# --- rows --------------------------------------------------------------------------------------


def _row(key: str, image: bytes | None, text: bytes | None, reason: str = "",
         repair: str = "") -> dict[str, Any]:
    return {KEY: key, IMAGE: image, TEXT: text, META: None, EXPECT_REASON: reason,
            EXPECT_REPAIR: repair}


@functools.cache
def _rows() -> tuple[tuple[tuple[str, Any], ...], ...]:
    jpeg = _encode(_photo("astronaut.png", 96), "JPEG", quality=90)
    spare = _encode(_photo("ihc.png", 64), "JPEG", quality=90)  # text-rejected
    rows = [
        # images
        _row("truncated-jpeg", jpeg[: len(jpeg) // 2], b"an astronaut cut in half", "decode_error"),
        _row("zero-byte-image", b"", b"a picture that never arrived", "empty_image"),
        _row("html-not-image", b"<html><body><h1>404 Not Found</h1></body></html>",
             b"an error page saved as a photo", "decode_error"),
        _row("decompression-bomb", bomb_png(), b"a huge black square", "decompression_bomb"),
        _row("missing-image", None, b"a caption without its picture", "missing_image"),
        _row("tiny-image", _encode(_drawn((8, 8), 1), "PNG"), b"a very small icon of boxes",
             "image_too_small"),
        _row("extreme-aspect", _encode(_drawn((240, 20), 2), "PNG"), b"a long thin web banner",
             "bad_aspect_ratio"),
        _row("cmyk-jpeg", cmyk_jpeg(), b"a tabby cat from a print catalogue", "",
             "cmyk_converted"),
        _row("grey16-png", grey16_png(), b"a photographer with a camera on a tripod", "",
             "high_bit_depth_scaled"),
        _row("palette-alpha-png", palette_alpha_png(), b"a colour wheel with a round hole", "",
             "alpha_flattened"),
        _row("animated-gif", animated_gif(), b"an old clock on a wall", "", "animated_first_frame"),
        _row("exif-rotated-jpeg", exif_rotated_jpeg(), b"a rocket standing on a launch pad", "",
             "exif_rotated"),
        # captions
        _row("empty-caption", spare, b"", "empty_text"),
        _row("whitespace-caption", spare, " \t\n\u00a0\u3000 ".encode(), "empty_text"),
        _row("latin1-caption", spare, b"\xff\xfe caf\xe9 au lait", "text_not_utf8"),
        _row("huge-caption", spare, b"cheap hd wallpaper free download " * 3100, "text_too_long"),
        _row("missing-caption", spare, None, "missing_text"),
        _row("junk-filename", spare, b"IMG_4821.jpg", "junk_alt_text"),
        _row("junk-click-here", spare, b"Click here!", "junk_alt_text"),
        _row("cyrillic-caption", spare, "Кошка спит на диване".encode(), "wrong_language"),
        _row("cjk-caption", spare, "一只猫在沙发上睡觉".encode(), "wrong_language"),
        _row("short-caption", spare, b"ok", "text_too_short"),
        _row("symbols-caption", spare, "★★★★★ 5/5 (1,024)".encode(), "too_few_letters"),
        _row("html-caption", _encode(_photo("moon.png", 80), "PNG"),
             b"<p>The <b>moon</b> &amp; its craters, seen from Earth</p>", "", "html_stripped"),
        _row("messy-whitespace", _encode(_photo("coffee.png", 90), "JPEG", quality=90),
             "a cup of\u00a0coffee  on a\tsaucer \n".encode(), "", "whitespace_normalised"),
        # plain good rows (the last one stays last: callers duplicate it)
        _row("good-unicode", _encode(_photo("hubble_deep_field.jpg", 90), "WEBP", quality=90),
             "a café cat — naïve and curious".encode()),
        _row("good-jpeg", jpeg, b"an astronaut in a white suit next to a flag"),
    ]
    return tuple(tuple(r.items()) for r in rows)


def bad_rows() -> list[dict[str, Any]]:
    """The corpus: fresh dicts (safe to mutate) holding the same bytes on every call."""
    return [dict(r) for r in _rows()]


__all__ = ["BOMB_SIDE", "EXPECT_REASON", "EXPECT_REPAIR", "animated_gif", "bad_rows", "bomb_png",
           "cmyk_jpeg", "exif_rotated_jpeg", "grey16_png", "palette_alpha_png"]
