"""The bad-input corpus through TextStage then ImageStage, as Ray Data would run them (plain
Python on a NumPy batch): every row gets exactly its expected reason and repair."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.data.curation.corpus import EXPECT_REASON, EXPECT_REPAIR, bad_rows
from vlmray.data import schema
from vlmray.data.curation import images, text
from vlmray.data.curation.hashing import sha256_hex
from vlmray.data.curation.images import ImageStage
from vlmray.data.curation.text import TextStage

COLUMNS = (schema.KEY, schema.IMAGE, schema.TEXT, schema.META)


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows -> a Ray "numpy" batch: object arrays per column, plus a ROW_ID."""
    batch = {}
    for col in COLUMNS:
        batch[col] = np.empty(len(rows), dtype=object)
        batch[col][:] = [r[col] for r in rows]
    batch[schema.ROW_ID] = np.arange(len(rows), dtype=np.int64) + (7 << 32)
    return batch


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return bad_rows()


@pytest.fixture(scope="module")
def curated(rows: list[dict]) -> dict[str, np.ndarray]:
    return ImageStage()(TextStage()(_batch(rows)))


def test_corpus_is_well_formed(rows: list[dict]) -> None:
    keys = [r[schema.KEY] for r in rows]
    assert len(rows) >= 18 and len(set(keys)) == len(keys)
    assert all(k and "." not in k and "/" not in k for k in keys)      # webdataset-safe keys
    for r in rows:
        assert set(r) == {*COLUMNS, EXPECT_REASON, EXPECT_REPAIR}
        assert r[schema.IMAGE] is None or isinstance(r[schema.IMAGE], bytes)
        assert r[schema.TEXT] is None or isinstance(r[schema.TEXT], bytes)
        assert r[EXPECT_REASON] in ("", *text.REASONS, *images.REASONS), r[schema.KEY]
        assert r[EXPECT_REPAIR] in ("", *text.REPAIRS, *images.REPAIRS), r[schema.KEY]
        assert not (r[EXPECT_REASON] and r[EXPECT_REPAIR])
    assert rows[-1][EXPECT_REASON] == "" and rows[-1][EXPECT_REPAIR] == ""
    assert bad_rows() == rows and bad_rows() is not rows                   # deterministic


def test_every_row_gets_its_expected_reason_and_repair(rows, curated) -> None:
    stage_of = {**{r: "text" for r in text.REASONS}, **{r: "image" for r in images.REASONS}}
    for i, r in enumerate(rows):
        key = r[schema.KEY]
        assert curated[schema.KEY][i] == key
        assert curated[schema.REJECT_REASON][i] == r[EXPECT_REASON], key
        assert curated[schema.REPAIRS][i] == r[EXPECT_REPAIR], key
        assert curated[schema.REJECT_STAGE][i] == stage_of.get(r[EXPECT_REASON], ""), key


def test_kinds_and_counts(rows, curated) -> None:
    expected = {r[k] for r in rows for k in (EXPECT_REASON, EXPECT_REPAIR)} - {""}
    seen = (set(curated[schema.REJECT_REASON]) | set(curated[schema.REPAIRS])) - {""}
    assert len(expected) >= 15 and seen == expected
    rejected = int((curated[schema.REJECT_REASON] != "").sum())
    kept = int((curated[schema.REJECT_REASON] == "").sum())
    assert kept + rejected == len(rows)
    assert kept == sum(not r[EXPECT_REASON] for r in rows) and kept >= 5
    names, counts = np.unique(curated[schema.REJECT_REASON].astype(str), return_counts=True)
    assert sum(counts[names != ""]) == rejected


def test_kept_rows_are_clean_and_rejected_rows_lose_their_image(rows, curated) -> None:
    for i, r in enumerate(rows):
        out_image = curated[schema.IMAGE][i]
        if curated[schema.REJECT_REASON][i]:
            assert out_image == b""
            assert (curated[schema.TEXT_SIG][i] == "") == (r[EXPECT_REASON] in text.REASONS)
            continue
        with Image.open(io.BytesIO(out_image)) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB") and min(im.size) >= 16
        assert curated[schema.WIDTH][i] > 0 and curated[schema.HEIGHT][i] > 0
        assert curated[schema.SHA256][i] == sha256_hex(r[schema.IMAGE])
        assert isinstance(curated[schema.TEXT][i], str) and curated[schema.TEXT_SIG][i]
    assert len(set(curated[schema.PHASH][curated[schema.REJECT_REASON] == ""])) == \
        int((curated[schema.REJECT_REASON] == "").sum())


def test_exif_row_swaps_width_and_height(rows, curated) -> None:
    (i,) = [i for i, r in enumerate(rows) if r[EXPECT_REPAIR] == images.EXIF_ROTATED]
    with Image.open(io.BytesIO(rows[i][schema.IMAGE])) as stored:
        assert stored.width > stored.height
    assert (curated[schema.WIDTH][i], curated[schema.HEIGHT][i]) == (stored.height, stored.width)


def test_pass_through_columns_and_determinism(rows, curated) -> None:
    batch = _batch(rows)
    np.testing.assert_array_equal(curated[schema.ROW_ID], batch[schema.ROW_ID])
    assert list(curated[schema.META]) == list(batch[schema.META])
    again = ImageStage()(TextStage()(_batch(bad_rows())))
    for col in (schema.IMAGE, schema.TEXT, schema.TEXT_SIG, schema.SHA256, schema.REPAIRS,
                schema.REJECT_REASON):
        assert list(again[col]) == list(curated[col]), col
    np.testing.assert_array_equal(again[schema.PHASH], curated[schema.PHASH])
