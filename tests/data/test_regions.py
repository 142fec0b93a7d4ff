"""Region columns (``data.regions``): prepare_rows on built-in samples (spans on the colour and
shape words, plurals, mismatched / junk / rejected rows masked, padding, K truncation), boxes
mapped through the centre crop of a non-square image, the ingest column selection and decode
stage, and the views / mixup stages passing the columns through.

    pytest tests/data/test_regions.py -q
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from vlmray.config import ConfigError, DataConfig
from vlmray.config.data import SyntheticConfig, ViewsConfig
from vlmray.data import schema
from vlmray.data.decode import DecodeSpec, prepare_rows
from vlmray.data.ingest import REGION_COLUMNS, DecodeStage, decode_spec, train_columns
from vlmray.data.mixup import mix_rows
from vlmray.data.regions import map_box, plural
from vlmray.data.synthetic import make_sample
from vlmray.data.tokenize import HashTokenizer
from vlmray.data.views import ViewStage

TOK = HashTokenizer(vocab_size=1024, context_length=24)
SYN = SyntheticConfig(num_train=32, image_size=48, shard_size=32)
KINDS = ["", "mismatch", "junk", "", "near_dup", "corrupt", "overlong", "", "", ""]


def _samples() -> list[dict]:
    return [make_sample(SYN, "train", i, kind, 0 if kind == "near_dup" else None)
            for i, kind in enumerate(KINDS)]


def _prepare(samples: list[dict], k: int = 3, size: int = 32) -> dict[str, np.ndarray]:
    return prepare_rows([s[schema.KEY] for s in samples], [s[schema.IMAGE] for s in samples],
                        [s[schema.TEXT] for s in samples], [s[schema.META] for s in samples],
                        DecodeSpec(image_size=size, regions=k), TOK)


def expected_span(text: str, phrase: str) -> np.ndarray | None:
    """Positions (after BOS) of the caption words equal to a phrase word or its plural."""
    words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())[: TOK.context_length - 2]
    span = np.zeros(TOK.context_length, dtype=np.int64)
    for w in phrase.split():
        hits = [i + 1 for i, x in enumerate(words) if x in (w, plural(w))]
        if not hits:
            return None
        span[hits] = 1
    return span


def test_prepare_rows_region_columns() -> None:
    samples = _samples()
    out = _prepare(samples)
    boxes, spans, mask = (out[c] for c in REGION_COLUMNS)
    assert boxes.shape == (10, 3, 4) and boxes.dtype == np.float32
    assert spans.shape == (10, 3, TOK.context_length) and spans.dtype == np.int64
    assert mask.shape == (10, 3) and mask.dtype == np.int64
    for i, (s, kind) in enumerate(zip(samples, KINDS)):
        meta = json.loads(s[schema.META])
        n_box = len(meta[schema.BOXES])
        if kind in ("corrupt", "overlong"):              # rejected rows: all zeros
            assert out[schema.REJECT_REASON][i] != ""
            assert not boxes[i].any() and not spans[i].any() and not mask[i].any()
            continue
        np.testing.assert_allclose(boxes[i, :n_box], meta[schema.BOXES], atol=1e-6)
        assert not boxes[i, n_box:].any()                 # zero padding
        want = expected_span(s[schema.TEXT], meta[schema.PHRASES][0])
        if kind in ("mismatch", "junk"):
            assert want is None and not mask[i].any() and not spans[i].any(), s[schema.TEXT]
            continue
        assert want is not None and want.sum() == 2, s[schema.TEXT]
        np.testing.assert_array_equal(mask[i], [1] * n_box + [0] * (3 - n_box))
        for k in range(n_box):                            # every box of the row shares the span
            np.testing.assert_array_equal(spans[i, k], want)
        ids = out[schema.TOKENS][i][spans[i, 0] == 1]
        assert len(set(ids.tolist())) == 2                # the colour word and the shape word


def test_plural_and_truncation_and_off() -> None:
    meta = json.dumps({schema.BOXES: [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]],
                       schema.PHRASES: ["green cross", "green cross"], schema.LABEL: 18})
    img = _png(np.full((32, 32, 3), 200, np.uint8))
    texts = ["Two tiny green crosses at the top.", "a green circle", "crosses green"]
    out = prepare_rows(["a", "b", "c"], [img] * 3, texts, [meta] * 3,
                       DecodeSpec(image_size=16, regions=1), TOK)
    assert out[schema.REGION_BOXES].shape == (3, 1, 4)        # K = 1 keeps the first box
    np.testing.assert_array_equal(out[schema.REGION_MASK][:, 0], [1, 0, 1])
    np.testing.assert_array_equal(np.flatnonzero(out[schema.REGION_SPANS][0, 0]), [3, 4])
    np.testing.assert_array_equal(np.flatnonzero(out[schema.REGION_SPANS][2, 0]), [1, 2])
    plain = prepare_rows(["a"], [img], texts[:1], [meta], DecodeSpec(image_size=16), TOK)
    assert not set(REGION_COLUMNS) & set(plain)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_boxes_follow_the_centre_crop() -> None:
    """64 x 32 image at size 16: resized to 32 x 16, the kept window is x in [0.25, 0.75]."""
    meta = json.dumps({schema.BOXES: [[0.5, 0.0, 1.0, 1.0], [0.0, 0.2, 0.2, 0.6],
                                      [0.3, 0.25, 0.7, 0.5]],
                       schema.PHRASES: ["red square"] * 3})
    out = prepare_rows(["k"], [_png(np.zeros((32, 64, 3), np.uint8))], ["a red square"],
                       [meta], DecodeSpec(image_size=16, regions=3), TOK)
    np.testing.assert_allclose(out[schema.REGION_BOXES][0],
                               [[0.5, 0.0, 1.0, 1.0], [0, 0, 0, 0], [0.1, 0.25, 0.9, 0.5]],
                               atol=1e-6)
    np.testing.assert_array_equal(out[schema.REGION_MASK][0], [1, 0, 1])   # cropped away: off
    assert map_box([0.1, 0.1, "x", 0.2], (0, 0, 1, 1)) is None
    assert map_box([0.5, 0.1, 0.4, 0.2], (0, 0, 1, 1)) is None


def test_ingest_selects_region_columns_and_decode_stage_emits_them() -> None:
    with pytest.raises(ConfigError, match="data.regions"):
        DataConfig(regions=-1)
    on, off = DataConfig(regions=3, image_size=32), DataConfig()
    assert set(REGION_COLUMNS) <= set(train_columns(on))
    assert not set(REGION_COLUMNS) & set(train_columns(off))
    assert decode_spec(on).regions == 3 and decode_spec(off).regions == 0
    samples = _samples()
    raw = {c: np.asarray([s[c] for s in samples], dtype=object)
           for c in (schema.KEY, schema.IMAGE, schema.TEXT, schema.META)}
    decoded = DecodeStage(on)(raw)
    live = decoded[schema.REJECT_REASON] == ""
    train = {c: decoded[c][live] for c in train_columns(on)}   # what the split stage keeps
    assert train[schema.REGION_BOXES].shape == (8, 3, 4)
    assert train[schema.REGION_SPANS].shape == (8, 3, 32)
    assert train[schema.REGION_MASK].sum() > 0


def test_views_and_mixup_pass_region_columns_through() -> None:
    cfg = DataConfig(regions=3, image_size=32,
                     views=ViewsConfig(image=["global"], mlm_prob=0.15))
    out = _prepare([make_sample(SYN, "eval", i) for i in range(6)], size=32)
    batch = {c: out[c] for c in train_columns(cfg)}
    viewed = ViewStage(cfg)(batch)
    for c in REGION_COLUMNS:
        np.testing.assert_array_equal(viewed[c], batch[c])
    mixed = mix_rows(batch, np.ones(6, dtype=bool), np.full(6, 0.7))
    spans = batch[schema.REGION_SPANS][:, 0] == 1
    for c in REGION_COLUMNS:
        np.testing.assert_array_equal(mixed[c], batch[c])
    # row i's own caption leads the mixed one, so its spans still name the same tokens
    np.testing.assert_array_equal(mixed[schema.TOKENS][spans], batch[schema.TOKENS][spans])
