"""Image decoding, validation, repair and deterministic re-encoding.

Each live row's bytes are opened (web formats only), checked against a decompression-bomb
limit from the header, fully decoded (truncation is an error), repaired (EXIF orientation,
first frame of animations, CMYK, transparency on white, 16-bit and float greyscale scaled to
8 bits), checked for aspect ratio then size, resized and re-encoded without metadata, so the
same input bytes always give the same output bytes. The guarded decode (:func:`decode_rgb`:
format allow-list, header pixel limit, bombs and truncation as reasons) is also training's
(:mod:`vlmray.data.decode`), so both reject the same bytes for the same reasons.

    batch = ImageStage(ImageConfig(target_size=384, format="webp"))(batch)
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

from vlmray.config.curation import ImageConfig
from vlmray.data import schema
from vlmray.data.curation.hashing import phash, sha256_hex
from vlmray.data.curation.stage import Batch, Resources, Stage, StageOutput

# Reject reasons (values of the reject_reason column).
MISSING_IMAGE = "missing_image"
EMPTY_IMAGE = "empty_image"
DECODE_ERROR = "decode_error"
DECOMPRESSION_BOMB = "decompression_bomb"
IMAGE_TOO_SMALL = "image_too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
REASONS = (MISSING_IMAGE, EMPTY_IMAGE, DECODE_ERROR, DECOMPRESSION_BOMB, IMAGE_TOO_SMALL,
           BAD_ASPECT_RATIO)

# Repairs (entries of the repairs column).
EXIF_ROTATED = "exif_rotated"
ANIMATED_FIRST_FRAME = "animated_first_frame"
CMYK_CONVERTED = "cmyk_converted"
ALPHA_FLATTENED = "alpha_flattened"
HIGH_BIT_DEPTH_SCALED = "high_bit_depth_scaled"
REPAIRS = (EXIF_ROTATED, ANIMATED_FIRST_FRAME, CMYK_CONVERTED, ALPHA_FLATTENED,
           HIGH_BIT_DEPTH_SCALED)

OPENABLE = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")
"""PIL formats that are decoded; anything else (EPS, PSD, ...) is a ``decode_error``."""

_PIL_FORMAT = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_SWAPS_AXES = (5, 6, 7, 8)                    # EXIF orientations that transpose the image
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


@dataclass
class Decoded:
    """A decoded, oriented, 8-bit RGB image and what it took to get there."""

    image: Image.Image
    """RGB pixels; JPEGs that will be downscaled are decoded at a reduced (DCT) scale."""
    width: int
    """Full-resolution width after EXIF orientation."""
    height: int
    """Full-resolution height after EXIF orientation."""
    format: str
    """PIL format name of the original (``JPEG``, ``PNG``...)."""
    plain: bool
    """The original was plain RGB or greyscale (no mode conversion of note)."""
    repairs: list[str] = field(default_factory=list)


# --- decoding ----------------------------------------------------------------------------------


@functools.cache
def _openable() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in OPENABLE if f in Image.OPEN)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (2-8 when the image must be transposed), 1 otherwise."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001  # corrupt EXIF is ignored, not fatal
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def _draft_size(w: int, h: int, side: int | None) -> tuple[int, int] | None:
    """The smallest size worth decoding a JPEG at, when its shorter side will be downscaled
    to ``side`` anyway (None: decode at full size)."""
    if side is None or min(w, h) <= side:
        return None
    s = side / min(w, h)
    return math.ceil(w * s), math.ceil(h * s)


def _open(data: bytes, max_pixels: int, draft_side: int | None) -> Decoded | str:
    """The first frame, fully loaded and oriented (not yet RGB), or a reject reason."""
    with Image.open(io.BytesIO(data), formats=_openable()) as im:
        w, h = im.size
        if w * h > max_pixels:
            return DECOMPRESSION_BOMB
        repairs = []
        # a multi-picture JPEG's first picture is its primary image, not an animation frame
        if getattr(im, "is_animated", False) and im.format != "MPO":
            repairs.append(ANIMATED_FIRST_FRAME)
            im.seek(0)
        draft = _draft_size(w, h, draft_side)
        if draft is not None and im.format in ("JPEG", "MPO"):
            im.draft(im.mode, draft)
        im.load()                               # every byte decoded: truncation raises
        orientation = _orientation(im)
        fmt = str(im.format)
        img: Image.Image = im
        if orientation != 1:
            img = ImageOps.exif_transpose(im)
            repairs.insert(0, EXIF_ROTATED)
    if orientation in _SWAPS_AXES:
        w, h = h, w
    return Decoded(image=img, width=w, height=h, format=fmt, plain=img.mode in ("RGB", "L"),
                   repairs=repairs)


def _scale_to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> L, stretched over the actual value range."""
    x = np.asarray(im).astype(np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return Image.new("L", im.size, 0)
    lo, hi = float(x[finite].min()), float(x[finite].max())
    x = np.where(finite, x, lo)
    if hi > lo:
        y = (x - lo) * (255.0 / (hi - lo))
    else:                                           # constant: keep its nominal level
        nominal = 65535.0 if im.mode.startswith("I;16") else 255.0
        y = np.full(x.shape, min(max(lo * 255.0 / nominal, 0.0), 255.0))
    return Image.fromarray(np.rint(y).astype(np.uint8))


def _flatten(rgba: Image.Image) -> tuple[Image.Image, str]:
    """RGBA -> RGB over white; a repair only when some pixel is not opaque."""
    if rgba.getchannel("A").getextrema()[0] == 255:
        return rgba.convert("RGB"), ""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB"), ALPHA_FLATTENED


def _to_rgb(im: Image.Image) -> tuple[Image.Image, str]:
    """Any mode -> 8-bit RGB, and the repair that took (or "")."""
    mode = im.mode
    if mode == "RGB":
        return im, ""
    if mode == "CMYK":
        return im.convert("RGB"), CMYK_CONVERTED
    if mode == "F" or mode.startswith("I"):
        return _scale_to_8bit(im).convert("RGB"), HIGH_BIT_DEPTH_SCALED
    if mode in _ALPHA_MODES or im.has_transparency_data:
        return _flatten(im.convert("RGBA"))
    return im.convert("RGB"), ""                    # L, 1, P, YCbCr...: nothing of note


def decode(data: bytes | None, cfg: ImageConfig) -> tuple[Decoded | None, str]:
    """Encoded bytes -> (decoded RGB image, "") or (None, reject reason), with ``cfg``'s pixel
    limit (JPEGs that will be downscaled are decoded at a reduced scale)."""
    draft_side = None if cfg.resize == "none" else cfg.target_size
    return decode_rgb(data, max_pixels=cfg.max_pixels, draft_side=draft_side)


def decode_rgb(data: bytes | None, *, max_pixels: int,
               draft_side: int | None = None) -> tuple[Decoded | None, str]:
    """Encoded bytes -> (decoded, oriented, repaired 8-bit RGB image, "") or (None, reason).

    The one guarded decode of curation and training: only :data:`OPENABLE` formats are
    opened, an image whose header declares more than ``max_pixels`` pixels (or trips PIL's
    own limit) is a ``decompression_bomb`` before any pixel is decoded, garbage and truncated
    bytes are a ``decode_error``. ``draft_side``: the shorter side a JPEG may be decoded down
    to (DCT scaling), None for full size.
    """
    if data is None:
        return None, MISSING_IMAGE
    if not data:
        return None, EMPTY_IMAGE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            dec = _open(bytes(data), max_pixels, draft_side)
            if isinstance(dec, str):
                return None, dec
            dec.image, repair = _to_rgb(dec.image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, DECOMPRESSION_BOMB
    except Exception:  # noqa: BLE001  # PIL raises many types for garbage/truncated bytes
        return None, DECODE_ERROR
    if repair:
        dec.repairs.append(repair)
    return dec, ""


# --- checks and output -------------------------------------------------------------------------


def check_size(width: int, height: int, cfg: ImageConfig) -> str:
    """The reject reason of an image of this (oriented) size, or "". The aspect ratio is
    checked first: a 4000x8 strip is ``bad_aspect_ratio`` (what is wrong with it), though its
    short side is also under ``min_side``."""
    if max(width, height) > cfg.max_aspect * min(width, height):
        return BAD_ASPECT_RATIO
    if min(width, height) < cfg.min_side:
        return IMAGE_TOO_SMALL
    return ""


def target_size(width: int, height: int, cfg: ImageConfig) -> tuple[int, int]:
    """Size after resizing (before a centre crop): the shorter side to ``target_size``."""
    side = cfg.target_size
    if cfg.resize == "none" or min(width, height) <= side:
        return width, height
    if width <= height:
        return side, max(side, round(height * side / width))
    return max(side, round(width * side / height)), side


def _resized(img: Image.Image, size: tuple[int, int], crop: bool) -> Image.Image:
    if img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    if crop and size[0] != size[1]:
        side = min(size)
        left, top = (size[0] - side) // 2, (size[1] - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return img


def encode(img: Image.Image, cfg: ImageConfig) -> bytes:
    """RGB image -> bytes in ``cfg.format``, without EXIF, ICC or other metadata."""
    img.info = {}                                   # nothing of the original is carried over
    buf = io.BytesIO()
    if cfg.format == "png":
        img.save(buf, "PNG")
    else:
        img.save(buf, _PIL_FORMAT[cfg.format], quality=cfg.quality)
    return buf.getvalue()


def output_bytes(dec: Decoded, data: bytes, cfg: ImageConfig) -> bytes:
    """The row's new image bytes: resized and re-encoded, or the original when allowed."""
    size = target_size(dec.width, dec.height, cfg)
    crop = cfg.resize == "center_crop" and size[0] != size[1]
    if (not cfg.reencode and not dec.repairs and not crop and size == (dec.width, dec.height)
            and dec.plain and dec.format == _PIL_FORMAT[cfg.format]):
        return bytes(data)
    return encode(_resized(dec.image, size, cfg.resize == "center_crop"), cfg)


# --- the stage ---------------------------------------------------------------------------------


class ImageStage(Stage):
    """Decodes, validates, repairs and re-encodes images; records size and content hashes."""

    name: ClassVar[str] = "image"
    reasons: ClassVar[tuple[str, ...]] = REASONS
    repair_kinds: ClassVar[tuple[str, ...]] = REPAIRS
    fills: ClassVar[dict[str, Any]] = {schema.WIDTH: 0, schema.HEIGHT: 0, schema.SHA256: "",
                                       schema.PHASH: 0}
    resources = Resources(num_cpus=0.5, batch_size=32)

    def __init__(self, cfg: ImageConfig | None = None) -> None:
        self.cfg = cfg or ImageConfig()

    def setup(self) -> None:
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: "
                               "truncated images would pass as valid; leave it False")
        _openable()

    def process(self, batch: Batch) -> StageOutput:
        rows = [self.row(data) for data in batch[schema.IMAGE]]
        images, widths, heights, shas, hashes, reasons, repairs = zip(*rows) if rows else [()] * 7
        return StageOutput(
            columns={schema.IMAGE: _objects(images),
                     schema.WIDTH: np.asarray(widths, dtype=np.int64),
                     schema.HEIGHT: np.asarray(heights, dtype=np.int64),
                     schema.SHA256: _objects(shas),
                     schema.PHASH: np.asarray(hashes, dtype=np.int64)},
            reasons=_objects(reasons), repairs=_objects(repairs))

    def row(self, data: bytes | None) -> tuple[bytes, int, int, str, int, str, str]:
        """One image -> (bytes, width, height, sha256, phash, reason, repairs)."""
        sha = sha256_hex(bytes(data)) if data else ""
        dec, reason = decode(data, self.cfg)
        if dec is None:
            return b"", 0, 0, sha, 0, reason, ""
        reason = check_size(dec.width, dec.height, self.cfg)
        if reason:
            return b"", dec.width, dec.height, sha, 0, reason, ""
        assert data is not None
        out = output_bytes(dec, data, self.cfg)
        return out, dec.width, dec.height, sha, phash(dec.image), "", ";".join(dec.repairs)


def _objects(values: Any) -> np.ndarray:
    values = list(values)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


__all__ = ["ALPHA_FLATTENED", "ANIMATED_FIRST_FRAME", "BAD_ASPECT_RATIO", "CMYK_CONVERTED",
           "DECODE_ERROR", "DECOMPRESSION_BOMB", "EMPTY_IMAGE", "EXIF_ROTATED",
           "HIGH_BIT_DEPTH_SCALED", "IMAGE_TOO_SMALL", "MISSING_IMAGE", "OPENABLE",
           "REASONS", "REPAIRS", "Decoded", "ImageStage", "check_size", "decode", "decode_rgb",
           "encode", "output_bytes", "target_size"]
