"""ImageStage: every reject reason and repair, pixel content after repairs, resizing,
deterministic re-encoding, and the built-in dataset's images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.data.curation.corpus import (
    animated_gif,
    bomb_png,
    cmyk_jpeg,
    exif_rotated_jpeg,
    grey16_png,
    palette_alpha_png,
)
from vlmray.config.curation import IMAGE_SUFFIX, ImageConfig
from vlmray.config.data import SyntheticConfig
from vlmray.data import schema
from vlmray.data.curation.hashing import phash, sha256_hex
from vlmray.data.curation.images import (
    ALPHA_FLATTENED,
    ANIMATED_FIRST_FRAME,
    BAD_ASPECT_RATIO,
    CMYK_CONVERTED,
    DECODE_ERROR,
    DECOMPRESSION_BOMB,
    EMPTY_IMAGE,
    EXIF_ROTATED,
    HIGH_BIT_DEPTH_SCALED,
    IMAGE_TOO_SMALL,
    MISSING_IMAGE,
    REASONS,
    REPAIRS,
    ImageStage,
)
from vlmray.data.synthetic import make_sample

LOSSLESS = ImageConfig(format="png", resize="none")


def _encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).astype(np.int64)


def _pattern(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric (h, w, 3) uint8 test image."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + 2 * y) % 256], -1)
    return np.clip(base + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)


def _row(data: bytes | None, cfg: ImageConfig | None = None) -> dict:
    out = ImageStage(cfg).row(data)
    return dict(zip(("image", "width", "height", "sha", "phash", "reason", "repairs"), out))


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _bomb(side: int) -> bytes:
    """A valid 1-bit PNG of side x side (only the header matters to the guard)."""
    return bomb_png(side)


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    ({"min_side": 0}, "min_side"),
    ({"target_size": 0}, "target_size"),
    ({"max_aspect": 0.5}, "max_aspect"),
    ({"max_pixels": 10}, "max_pixels"),
    ({"resize": "stretch"}, "'keep_ratio'"),
    ({"format": "gif"}, "'webp'"),
    ({"quality": 0}, "[1, 100]"),
    ({"quality": 101}, "[1, 100]"),
])
def test_config_rejects_invalid_values(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError) as err:
        ImageConfig(**kwargs)
    assert words in str(err.value)


def test_stage_declarations() -> None:
    assert set(ImageStage.reasons) == set(REASONS) and set(ImageStage.repair_kinds) == set(REPAIRS)
    assert set(ImageStage.fills) == {schema.WIDTH, schema.HEIGHT, schema.SHA256, schema.PHASH}
    assert IMAGE_SUFFIX == {"jpeg": "jpg", "png": "png", "webp": "webp"}
    # half a core: the stage runs beside training workers and retrieval actors on a small node
    assert ImageStage.resources.batch_size > 0 and 0 < ImageStage.resources.num_cpus <= 1


# --- reasons -----------------------------------------------------------------------------------


def test_missing_empty_garbage_and_unsupported() -> None:
    assert _row(None)["reason"] == MISSING_IMAGE
    assert _row(b"")["reason"] == EMPTY_IMAGE
    assert _row(b"<html><body>404 Not Found</body></html>")["reason"] == DECODE_ERROR
    assert _row(np.random.default_rng(0).bytes(700))["reason"] == DECODE_ERROR
    ppm = _encode(Image.fromarray(_pattern(40, 40)), "PPM")   # decodable, but not a web format
    assert _row(ppm)["reason"] == DECODE_ERROR


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_truncated_images_are_decode_errors(fmt: str) -> None:
    data = _encode(Image.fromarray(_pattern(120, 90)), fmt)
    assert _row(data)["reason"] == ""
    assert _row(data[: len(data) * 2 // 3])["reason"] == DECODE_ERROR
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_setup_refuses_to_run_with_truncated_loading_on(monkeypatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        ImageStage()({schema.IMAGE: _objects([b""])})


def test_decompression_bombs_are_caught_from_the_header() -> None:
    # 64 M pixels: over our limit, under PIL's own warning threshold -> our header check
    data = _bomb(8000)
    assert len(data) < 20_000
    assert _row(data)["reason"] == DECOMPRESSION_BOMB
    # the same generator at a small size gives a valid image (a real PNG, not garbage)
    small = _row(_bomb(300), ImageConfig(max_pixels=300 * 300))
    assert (small["reason"], small["width"], small["height"]) == ("", 300, 300)
    # 100 M pixels: PIL warns (DecompressionBombWarning) -> still a bomb even with our limit off
    assert _row(_bomb(10_000), ImageConfig(max_pixels=10**9))["reason"] == DECOMPRESSION_BOMB
    # 196 M pixels: PIL raises DecompressionBombError itself
    assert _row(bomb_png(), ImageConfig(max_pixels=10**9))["reason"] == DECOMPRESSION_BOMB
    assert _row(bomb_png())["reason"] == DECOMPRESSION_BOMB


def test_size_and_aspect_ratio() -> None:
    def size(w: int, h: int, **kw: object) -> str:
        return _row(_encode(Image.fromarray(_pattern(w, h))), ImageConfig(**kw))["reason"]

    assert size(8, 8) == IMAGE_TOO_SMALL
    assert size(15, 40) == IMAGE_TOO_SMALL                    # small, aspect fine
    # both fail: the aspect check speaks first (a strip is a strip, issue 21)
    assert size(15, 200) == BAD_ASPECT_RATIO
    assert size(4000, 8) == BAD_ASPECT_RATIO
    assert size(8, 4000) == BAD_ASPECT_RATIO
    assert size(16, 16) == ""
    assert size(90, 30) == ""                                 # exactly max_aspect
    assert size(100, 30) == BAD_ASPECT_RATIO
    assert size(30, 100) == BAD_ASPECT_RATIO
    assert size(100, 30, max_aspect=4.0) == ""
    assert size(20, 20, min_side=32) == IMAGE_TOO_SMALL
    tiny = _row(_encode(Image.fromarray(_pattern(10, 12))))
    assert (tiny["width"], tiny["height"], tiny["image"]) == (10, 12, b"")


# --- repairs and pixel content -----------------------------------------------------------------

_EXIF_REFERENCE = {   # what each EXIF orientation means, written with numpy
    2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
    5: lambda a: np.rot90(np.fliplr(a), 1), 6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(np.fliplr(a), -1), 8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(_EXIF_REFERENCE))
def test_exif_orientation_pixels(orientation: int) -> None:
    pixels = _pattern(48, 32)
    exif = Image.Exif()
    exif[0x0112] = orientation
    row = _row(_encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes()), LOSSLESS)
    expected = _EXIF_REFERENCE[orientation](pixels)
    assert row["repairs"] == EXIF_ROTATED
    assert (row["width"], row["height"]) == (expected.shape[1], expected.shape[0])
    np.testing.assert_array_equal(_pixels(row["image"]), expected)


def test_exif_rotated_jpeg_swaps_width_and_height_and_drops_exif() -> None:
    data = exif_rotated_jpeg()
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (96, 64) and im.getexif()[0x0112] == 6
        stored = np.asarray(im.convert("RGB")).astype(np.int64)
    row = _row(data, LOSSLESS)
    assert (row["width"], row["height"], row["repairs"]) == (64, 96, EXIF_ROTATED)
    np.testing.assert_array_equal(_pixels(row["image"]), np.rot90(stored, -1))
    for cfg in (ImageConfig(), ImageConfig(format="webp"), LOSSLESS):
        with Image.open(io.BytesIO(_row(data, cfg)["image"])) as out:
            assert out.size == (64, 96) and not out.getexif() and "icc_profile" not in out.info
    orientation_one = Image.Exif()
    orientation_one[0x0112] = 1
    plain = _encode(Image.fromarray(_pattern(40, 30)), "JPEG", exif=orientation_one.tobytes())
    assert _row(plain)["repairs"] == ""


def test_cmyk_is_converted_with_the_right_colours() -> None:
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (200, 30, 30)
    rgb[:, 30:] = (20, 60, 220)
    data = _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "CMYK"
    row = _row(data, LOSSLESS)
    assert row["repairs"] == CMYK_CONVERTED
    out = _pixels(row["image"])
    assert np.abs(out[5:35, 5:25] - (200, 30, 30)).max() <= 6
    assert np.abs(out[5:35, 35:55] - (20, 60, 220)).max() <= 6
    assert _row(cmyk_jpeg())["repairs"] == CMYK_CONVERTED


def test_16_bit_ramp_is_stretched_not_clipped() -> None:
    ramp = np.tile(np.linspace(1000, 60000, 64).round().astype(np.uint16), (32, 1))
    data = _encode(Image.fromarray(ramp))
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I")
        assert np.asarray(im.convert("L")).min() == 255          # what a naive convert gives
    row = _row(data, LOSSLESS)
    assert row["repairs"] == HIGH_BIT_DEPTH_SCALED
    out = _pixels(row["image"])
    expected = np.rint((ramp.astype(np.float64) - 1000) * 255 / 59000)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert (out[..., 0] == out[..., 1]).all() and out.min() == 0 and out.max() == 255
    assert _row(grey16_png())["repairs"] == HIGH_BIT_DEPTH_SCALED


def test_32_bit_and_float_greyscale() -> None:
    signed = np.tile(np.arange(-500, 500, 25, dtype=np.int32), (20, 1))
    out = _pixels(_row(_encode(Image.fromarray(signed), "TIFF"), LOSSLESS)["image"])
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and (np.diff(out[0, :, 0]) >= 0).all()
    floats = np.tile(np.linspace(-1.0, 1.0, 40, dtype=np.float32), (20, 1))
    floats[0, 0] = np.nan
    row = _row(_encode(Image.fromarray(floats), "TIFF"), LOSSLESS)
    assert row["repairs"] == HIGH_BIT_DEPTH_SCALED and _pixels(row["image"])[1, -1, 0] == 255
    flat = _row(_encode(Image.fromarray(np.full((20, 20), 65535, np.uint16))), LOSSLESS)
    assert _pixels(flat["image"]).min() == 255                 # constant: its nominal level


def test_transparency_is_flattened_on_white() -> None:
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (10, 10, 30, 30))
    row = _row(_encode(palette, transparency=0), LOSSLESS)
    out = _pixels(row["image"])
    assert row["repairs"] == ALPHA_FLATTENED
    assert (out[0, 0] == 255).all() and tuple(out[20, 20]) == (255, 0, 0)
    half = _row(_encode(Image.new("RGBA", (30, 30), (255, 0, 0, 128))), LOSSLESS)
    assert half["repairs"] == ALPHA_FLATTENED
    assert tuple(_pixels(half["image"])[5, 5]) == (255, 127, 127)
    grey_alpha = _row(_encode(Image.new("LA", (30, 30), (0, 0))), LOSSLESS)
    assert grey_alpha["repairs"] == ALPHA_FLATTENED and _pixels(grey_alpha["image"]).min() == 255
    opaque = _row(_encode(Image.new("RGBA", (30, 30), (1, 2, 3, 255))), LOSSLESS)
    assert opaque["repairs"] == "" and tuple(_pixels(opaque["image"])[0, 0]) == (1, 2, 3)
    assert _row(palette_alpha_png())["repairs"] == ALPHA_FLATTENED


def test_animation_keeps_the_first_frame() -> None:
    frames = [Image.fromarray(_pattern(40, 40, 1)), Image.new("RGB", (40, 40), (0, 0, 255))]
    for fmt in ("GIF", "WEBP", "PNG"):
        data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)
        row = _row(data, LOSSLESS)
        assert row["repairs"] == ANIMATED_FIRST_FRAME, fmt
        out = _pixels(row["image"])
        assert out[..., 2].mean() < 200 and np.abs(out - _pattern(40, 40, 1)).mean() < 20, fmt
    assert _row(animated_gif())["repairs"] == ANIMATED_FIRST_FRAME


def test_plain_modes_need_no_repair() -> None:
    grey = _row(_encode(Image.fromarray(_pattern(30, 30)[..., 0])), LOSSLESS)
    assert grey["repairs"] == "" and _pixels(grey["image"]).shape == (30, 30, 3)
    bilevel = _row(_encode(Image.fromarray(_pattern(30, 30)).convert("1")), LOSSLESS)
    assert bilevel["repairs"] == ""
    palette = _row(_encode(Image.fromarray(_pattern(30, 30)).quantize(16)), LOSSLESS)
    assert palette["repairs"] == ""


# --- resizing, hashes, determinism -------------------------------------------------------------


@pytest.mark.parametrize("resize, size", [("keep_ratio", (384, 256)),
                                          ("center_crop", (256, 256)), ("none", (600, 400))])
def test_resize_modes(resize: str, size: tuple[int, int]) -> None:
    for fmt in ("PNG", "JPEG"):                  # JPEG: decoded at a reduced DCT scale first
        row = _row(_encode(Image.fromarray(_pattern(600, 400)), fmt), ImageConfig(resize=resize))
        with Image.open(io.BytesIO(row["image"])) as out:
            assert (out.size, out.format, out.mode) == (size, "JPEG", "RGB")
        assert (row["width"], row["height"]) == (600, 400)


def test_never_upscales_and_center_crop_is_square() -> None:
    small = _encode(Image.fromarray(_pattern(120, 80)))
    for resize, size in (("keep_ratio", (120, 80)), ("center_crop", (80, 80))):
        with Image.open(io.BytesIO(_row(small, ImageConfig(resize=resize))["image"])) as out:
            assert out.size == size
    crop = _pixels(_row(small, ImageConfig(resize="center_crop", format="png"))["image"])
    np.testing.assert_array_equal(crop, _pattern(120, 80)[:, 20:100])


def test_reduced_scale_jpeg_decoding_matches_a_full_decode() -> None:
    data = _encode(Image.fromarray(_pattern(1600, 1200)), "JPEG", quality=95)
    fast = _pixels(_row(data, ImageConfig(format="png"))["image"])
    with Image.open(io.BytesIO(data)) as im:
        full = im.convert("RGB").resize((341, 256), Image.Resampling.BICUBIC)
    assert fast.shape == (256, 341, 3)
    assert np.abs(fast - np.asarray(full).astype(np.int64)).mean() < 3


def test_hashes_and_sizes() -> None:
    data = _encode(Image.fromarray(_pattern(70, 50)))
    row = _row(data)
    assert row["sha"] == sha256_hex(data) and (row["width"], row["height"]) == (70, 50)
    with Image.open(io.BytesIO(data)) as im:
        assert row["phash"] == phash(im.convert("RGB"))
    assert _row(data[:40])["sha"] == sha256_hex(data[:40])      # rejected rows keep theirs
    assert _row(None)["sha"] == "" and _row(None)["phash"] == 0


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_reencoding_is_deterministic(fmt: str) -> None:
    sources = [_encode(Image.fromarray(_pattern(500, 300)), "JPEG"), exif_rotated_jpeg(),
               palette_alpha_png(), cmyk_jpeg()]
    cfg = ImageConfig(format=fmt, quality=80)
    first = [_row(d, cfg)["image"] for d in sources]
    assert first == [_row(bytes(d), cfg)["image"] for d in sources]
    for out in first:
        with Image.open(io.BytesIO(out)) as im:
            assert im.format == fmt.upper() and im.mode == "RGB" and "exif" not in im.info


def test_metadata_is_dropped() -> None:
    exif = Image.Exif()
    exif[0x010F] = "ACME camera"
    icc = b"\0" * 128                          # carried verbatim by PIL; must not be copied
    data = _encode(Image.fromarray(_pattern(60, 40)), "JPEG", exif=exif.tobytes(),
                   icc_profile=icc)
    for fmt in ("jpeg", "png", "webp"):
        with Image.open(io.BytesIO(_row(data, ImageConfig(format=fmt))["image"])) as im:
            assert not im.getexif() and "icc_profile" not in im.info, fmt


def test_reencode_false_keeps_original_bytes_only_when_nothing_changes() -> None:
    keep = ImageConfig(reencode=False)
    jpeg = _encode(Image.fromarray(_pattern(120, 80)), "JPEG")
    assert _row(jpeg, keep)["image"] == jpeg
    assert _row(jpeg)["image"] != jpeg
    png = _encode(Image.fromarray(_pattern(120, 80)))
    assert _row(png, keep)["image"] != png                       # wrong format for the output
    assert _row(png, ImageConfig(reencode=False, format="png"))["image"] == png
    big = _encode(Image.fromarray(_pattern(600, 400)), "JPEG")
    assert _row(big, keep)["image"] != big                        # resized
    assert _row(exif_rotated_jpeg(), keep)["image"] != exif_rotated_jpeg()     # repaired
    assert _row(jpeg, ImageConfig(reencode=False, resize="center_crop"))["image"] != jpeg


def test_stage_batch_and_earlier_rejections_pass_through() -> None:
    good = _encode(Image.fromarray(_pattern(64, 48)))
    batch = {schema.KEY: _objects(["a", "b", "c", "d"]),
             schema.IMAGE: _objects([good, b"junk", good, None]),
             schema.TEXT: _objects(["x", "y", "z", "w"]),
             schema.ROW_ID: np.arange(4, dtype=np.int64),
             schema.REJECT_REASON: _objects(["", "", "junk_alt_text", ""]),
             schema.REJECT_STAGE: _objects(["", "", "text", ""]),
             schema.REPAIRS: _objects(["html_stripped", "", "", ""])}
    out = ImageStage()(batch)
    assert list(out[schema.REJECT_REASON]) == ["", DECODE_ERROR, "junk_alt_text", MISSING_IMAGE]
    assert list(out[schema.REJECT_STAGE]) == ["", "image", "text", "image"]
    assert list(out[schema.REPAIRS]) == ["html_stripped", "", "", ""]
    assert out[schema.IMAGE][2] == good and out[schema.IMAGE][1] == b""
    assert out[schema.IMAGE][0][:3] == b"\xff\xd8\xff"
    assert list(out[schema.WIDTH]) == [64, 0, 0, 0] and list(out[schema.HEIGHT]) == [48, 0, 0, 0]
    assert out[schema.WIDTH].dtype == np.int64 and out[schema.PHASH].dtype == np.int64
    assert list(out[schema.SHA256]) == [sha256_hex(good), sha256_hex(b"junk"), "", ""]
    assert list(out[schema.TEXT]) == ["x", "y", "z", "w"]
    assert list(out[schema.ROW_ID]) == [0, 1, 2, 3]
    again = ImageStage()(batch)
    assert all(x == y for x, y in zip(again[schema.IMAGE], out[schema.IMAGE]))


def test_builtin_dataset_images() -> None:
    cfg = SyntheticConfig(num_train=40, num_eval=4)
    stage = ImageStage()
    for i in range(20):
        clean = stage.row(make_sample(cfg, "train", i)[schema.IMAGE])
        assert (clean[1:3], clean[5:]) == ((64, 64), ("", "")), i
        corrupt = stage.row(make_sample(cfg, "train", i, "corrupt")[schema.IMAGE])
        assert corrupt[5] == DECODE_ERROR, i
