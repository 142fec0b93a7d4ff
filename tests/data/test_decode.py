"""Decoding and validating raw samples: pixels, reject reasons, labels from sidecars.

    pytest tests/data/test_decode.py -q
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from vlmray.config.data import SyntheticConfig
from vlmray.data import schema
from vlmray.data.decode import (
    DECODE_ERROR,
    EMPTY_TEXT,
    IMAGE_TOO_SMALL,
    MISSING_IMAGE,
    MISSING_TEXT,
    TEXT_TOO_LONG,
    DecodeSpec,
    check_text,
    decode_image,
    label_of,
    prepare_rows,
)
from vlmray.data.synthetic import make_sample
from vlmray.data.tokenize import BOS, EOS, PAD, HashTokenizer

SPEC = DecodeSpec(image_size=24, min_image_side=16, max_text_chars=100)
SYN = SyntheticConfig(num_train=10, num_eval=10, image_size=48, shard_size=10)


def encode(pixels: np.ndarray, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_synthetic_jpeg_decodes_to_uint8_chw() -> None:
    sample = make_sample(SYN, "eval", 0)
    img, reason = decode_image(sample[schema.IMAGE], SPEC)
    assert reason == "" and img is not None
    assert img.dtype == np.uint8 and img.shape == (3, 24, 24)
    assert img.flags.c_contiguous and img.std() > 5                 # a picture, not a blank


def test_real_photo_matches_a_pil_resize() -> None:
    """A non-square photo (skimage's chelsea, 451x300): shorter side -> S, centre crop."""
    skimage_data = pytest.importorskip("skimage.data")
    photo = skimage_data.chelsea()                                  # (300, 451, 3)
    img, reason = decode_image(encode(photo), SPEC)
    assert reason == "" and img.shape == (3, 24, 24)
    ref = Image.fromarray(photo).resize((36, 24), Image.BICUBIC)    # round(451 * 24 / 300) = 36
    ref = np.asarray(ref)[:, 6:30].transpose(2, 0, 1)
    np.testing.assert_array_equal(img, ref)


def test_centre_crop_keeps_the_middle() -> None:
    """80x40 image: red | green (middle half) | blue -> the centre crop is all green."""
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:60] = (0, 255, 0)
    pixels[:, 60:] = (0, 0, 255)
    img, reason = decode_image(encode(pixels), DecodeSpec(image_size=20))
    assert reason == "" and img.shape == (3, 20, 20)
    inner = img[:, :, 2:-2].astype(int)                             # away from bicubic ringing
    assert (abs(inner[1] - 255) <= 2).all() and (inner[0] <= 2).all() and (inner[2] <= 2).all()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_become_rgb(mode: str) -> None:
    grey = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))      # (32, 32) ramp
    im = Image.fromarray(grey).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    img, reason = decode_image(buf.getvalue(), SPEC)
    assert reason == "" and img.shape == (3, 24, 24)
    np.testing.assert_array_equal(img[0], img[1])
    np.testing.assert_array_equal(img[1], img[2])


def test_bad_images_give_reasons() -> None:
    good = encode(np.full((32, 32, 3), 128, np.uint8), "JPEG")
    rng = np.random.default_rng(0)
    assert decode_image(None, SPEC) == (None, MISSING_IMAGE)
    assert decode_image(b"", SPEC) == (None, MISSING_IMAGE)
    assert decode_image(rng.bytes(500), SPEC) == (None, DECODE_ERROR)
    assert decode_image(good[: len(good) // 3], SPEC) == (None, DECODE_ERROR)   # truncated
    corrupt = make_sample(SYN, "train", 1, kind="corrupt")[schema.IMAGE]
    assert decode_image(corrupt, SPEC) == (None, DECODE_ERROR)


def test_small_images_are_rejected_at_the_boundary() -> None:
    assert decode_image(encode(np.zeros((8, 8, 3), np.uint8)), SPEC) == (None, IMAGE_TOO_SMALL)
    assert decode_image(encode(np.zeros((15, 64, 3), np.uint8)), SPEC) == (None, IMAGE_TOO_SMALL)
    img, reason = decode_image(encode(np.zeros((16, 64, 3), np.uint8)), SPEC)
    assert reason == "" and img.shape == (3, 24, 24)                # upscaled, not rejected


def test_text_checks() -> None:
    assert check_text(None, SPEC) == MISSING_TEXT
    assert check_text("", SPEC) == EMPTY_TEXT
    assert check_text(" \n\t ", SPEC) == EMPTY_TEXT
    assert check_text("x" * 100, SPEC) == ""
    assert check_text("x" * 101, SPEC) == TEXT_TOO_LONG
    overlong = make_sample(SyntheticConfig(num_train=10, num_eval=10, overlong_chars=150),
                           "train", 2, kind="overlong")[schema.TEXT]
    assert check_text(overlong, SPEC) == TEXT_TOO_LONG


@pytest.mark.parametrize("meta, label", [
    ('{"label": 7, "classname": "x"}', 7), (b'{"label": 3}', 3), ('{"classname": "x"}', -1),
    ('{"label": null}', -1), ("{not json", -1), (None, -1), ("[1, 2]", -1),
    ('{"label": "seven"}', -1), (b"\xff\xfe", -1), ("", -1),
])
def test_label_of(meta: object, label: int) -> None:
    assert label_of(meta) == label


def test_prepare_rows_mixed_batch() -> None:
    tok = HashTokenizer(vocab_size=512, context_length=10)
    clean = [make_sample(SYN, "eval", i) for i in range(2)]
    tiny = encode(np.zeros((4, 4, 3), np.uint8))
    c0 = clean[0]
    rows = [
        (c0[schema.KEY], c0[schema.IMAGE], c0[schema.TEXT], c0[schema.META]),
        ("bytes-text", clean[1][schema.IMAGE], clean[1][schema.TEXT].encode(), b'{"label": 4}'),
        ("no-image", None, "a red circle", '{"label": 1}'),
        ("garbage", b"\x00not an image", "a red circle", "{broken"),
        ("tiny", tiny, "a red circle", None),
        ("empty-text", clean[0][schema.IMAGE], "   ", '{"label": 2}'),
        ("long-text", clean[0][schema.IMAGE], "y" * 101, '{"label": 2}'),
        ("no-text", clean[0][schema.IMAGE], None, '{"label": 2}'),
        ("both-bad", None, "", '{"label": 2}'),                    # image reason wins
    ]
    keys, images, texts, metas = map(list, zip(*rows))
    out = prepare_rows(keys, images, texts, metas, SPEC, tok)
    assert set(out) == {schema.KEY, schema.TEXT, schema.LABEL, schema.PIXELS, schema.TOKENS,
                        schema.TOKEN_MASK, schema.REJECT_REASON}
    assert out[schema.KEY].tolist() == keys
    assert out[schema.REJECT_REASON].tolist() == [
        "", "", MISSING_IMAGE, DECODE_ERROR, IMAGE_TOO_SMALL, EMPTY_TEXT, TEXT_TOO_LONG,
        MISSING_TEXT, MISSING_IMAGE]
    labels = [json.loads(clean[0][schema.META])["label"], 4, 1, -1, -1, 2, 2, 2, 2]
    assert out[schema.LABEL].tolist() == labels and out[schema.LABEL].dtype == np.int64
    assert out[schema.TEXT][1] == clean[1][schema.TEXT] and out[schema.TEXT][7] == ""

    pixels = out[schema.PIXELS]
    assert pixels.shape == (9, 3, 24, 24) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[0], decode_image(clean[0][schema.IMAGE], SPEC)[0])
    assert not pixels[2:5].any() and not pixels[8].any()            # rejected images: zeros
    np.testing.assert_array_equal(pixels[5], pixels[0])             # kept, though text is bad

    ids, mask = out[schema.TOKENS], out[schema.TOKEN_MASK]
    assert ids.shape == mask.shape == (9, 10)
    np.testing.assert_array_equal(ids[:2], tok([clean[0][schema.TEXT], clean[1][schema.TEXT]])[0])
    for i in range(2, 9):                                           # rejected rows: empty text
        assert ids[i].tolist() == [BOS, EOS] + [PAD] * 8
    np.testing.assert_array_equal(mask, (ids != PAD).astype(np.int64))
