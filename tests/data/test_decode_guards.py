"""Training's decode has curation's guards: one decode function, so a decompression bomb or a
format outside the allow-list is rejected for the same reason, before pixels are decoded,
while normal images decode to exactly the pixels they always did."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlmray.config.curation import ImageConfig
from vlmray.data.curation import images
from vlmray.data.curation.images import DECOMPRESSION_BOMB
from vlmray.data.decode import DECODE_ERROR, DecodeSpec, decode_image

SPEC = DecodeSpec(image_size=24)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _grey_png(side: int, *, pixels: bool = True) -> bytes:
    """A ``side`` x ``side`` all-black 8-bit greyscale PNG, its rows compressed a block at a
    time (fast deflate: a 169-megapixel one is ~0.7 MB); ``pixels=False``: the header alone."""
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0,
                                                                 0, 0))
    if pixels:
        z, rows = zlib.compressobj(1), bytes(side + 1) * 1000
        body = b"".join(z.compress(rows[:(side + 1) * min(1000, side - i)])
                        for i in range(0, side, 1000)) + z.flush()
        out += _chunk(b"IDAT", body)
    return out + _chunk(b"IEND", b"")


def _encode(pixels: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_a_169_megapixel_png_is_a_bomb_before_decoding() -> None:
    data = _grey_png(13_000)                     # the case: under PIL's error limit
    assert len(data) < 1_000_000
    assert decode_image(data, SPEC)[1] == DECOMPRESSION_BOMB


def test_the_pixel_limit_is_the_specs() -> None:
    small = _encode(np.zeros((70, 70, 3), np.uint8), "PNG")          # 4,900 pixels
    large = _encode(np.zeros((100, 100, 3), np.uint8), "PNG")        # 10,000 pixels
    spec = DecodeSpec(image_size=24, max_pixels=5_000)
    assert decode_image(small, spec)[1] == ""
    assert decode_image(large, spec)[1] == DECOMPRESSION_BOMB


@pytest.mark.parametrize("fmt", ["PCX", "TGA", "PPM"])
def test_formats_outside_the_allow_list_are_decode_errors(fmt: str) -> None:
    data = _encode(np.full((32, 32, 3), 90, np.uint8), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt                 # PIL itself would open it
    assert decode_image(data, SPEC)[1] == DECODE_ERROR


def test_training_and_curation_reject_the_same_bytes_for_the_same_reasons() -> None:
    jpeg = _encode(np.full((40, 40, 3), 128, np.uint8), "JPEG")
    bad = {"garbage": np.random.default_rng(0).bytes(500), "truncated": jpeg[: len(jpeg) // 3],
           "pcx": _encode(np.zeros((32, 32, 3), np.uint8), "PCX"),
           "header_only_64mp": _grey_png(8_000, pixels=False)}
    cfg = ImageConfig()
    for name, data in bad.items():
        curation = images.decode(data, cfg)[1]
        assert curation in (DECODE_ERROR, DECOMPRESSION_BOMB), name
        assert decode_image(data, SPEC)[1] == curation, name
    assert images.decode(bad["header_only_64mp"], cfg)[1] == DECOMPRESSION_BOMB


def _before(data: bytes, size: int) -> np.ndarray:
    """Training's decode as it was: PIL open, load, RGB, shorter side to ``size`` (bicubic),
    centre crop."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        img = im.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def test_normal_images_decode_to_the_same_pixels_as_before() -> None:
    """A guard, not a fix: plain JPEG/PNG (RGB, greyscale, palette), larger and smaller than
    the output, decode exactly as before (no reduced-scale JPEG decoding in training)."""
    rng = np.random.default_rng(1)
    smooth = np.cumsum(rng.integers(-8, 9, (300, 400, 3)), axis=1).clip(0, 255).astype(np.uint8)
    cases = {"jpeg_rgb": _encode(smooth, "JPEG", quality=90),
             "jpeg_grey": _encode(smooth[..., 0], "JPEG"),
             "png_rgb_small": _encode(smooth[:20, :30], "PNG"),
             "png_grey": _encode(smooth[:64, :100, 1], "PNG"),
             "png_palette": _encode_palette(smooth[:50, :80])}
    for name, data in cases.items():
        img, reason = decode_image(data, SPEC)
        assert reason == "", name
        np.testing.assert_array_equal(img, _before(data, SPEC.image_size), err_msg=name)


def _encode_palette(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "PNG")
    return buf.getvalue()
