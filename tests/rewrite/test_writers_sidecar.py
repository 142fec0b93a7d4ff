"""The curation writers carry the rewrite columns: in the JSON sidecar and as parquet columns.

    pytest tests/rewrite/test_writers_sidecar.py -q
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq

from vlmray.config.curation import WriteConfig
from vlmray.data import schema
from vlmray.data.curation.writers import encode_rows, sidecar
from vlmray.data.shards import iter_shard


def _batch(with_rewrites: bool) -> dict[str, np.ndarray]:
    batch = {schema.KEY: np.array(["a", "b"], dtype=object),
             schema.IMAGE: np.array([b"\xff\xd8x", b"\xff\xd8y"], dtype=object),
             schema.TEXT: np.array([b"a red circle", b"two squares"], dtype=object),
             schema.META: np.array(['{"label": 3}', ""], dtype=object)}
    if with_rewrites:
        aug = np.empty(2, dtype=object)
        aug[0] = np.array(["a red circle", "a circle that is red"], dtype=object)  # from Arrow
        aug[1] = ["two squares", "two squares"]
        batch[schema.TEXTS_AUG] = aug
        batch[schema.REWRITE_FALLBACKS] = np.array([[""], ["echo"]], dtype=object)
        batch[schema.SYNTHETIC_CAPTION] = np.array(["one red circle", "two squares"], dtype=object)
        batch[schema.CAPTION_FALLBACK] = np.array(["", "refusal"], dtype=object)
    return batch


def test_sidecar_carries_rewrites_as_json_lists() -> None:
    doc = json.loads(sidecar(_batch(True), 0))
    assert doc == {"label": 3, schema.TEXTS_AUG: ["a red circle", "a circle that is red"],
                   schema.REWRITE_FALLBACKS: [""], schema.SYNTHETIC_CAPTION: "one red circle",
                   schema.CAPTION_FALLBACK: ""}
    assert json.loads(sidecar(_batch(True), 1))[schema.CAPTION_FALLBACK] == "refusal"
    assert json.loads(sidecar(_batch(False), 0)) == {"label": 3}       # nothing added


def test_webdataset_and_parquet_shards(tmp_path) -> None:
    tar = tmp_path / "s.tar"
    tar.write_bytes(encode_rows(_batch(True), WriteConfig(), "jpg"))
    rows = list(iter_shard(str(tar)))
    assert json.loads(rows[1][schema.META])[schema.TEXTS_AUG] == ["two squares", "two squares"]
    table = pq.read_table(io.BytesIO(encode_rows(_batch(True), WriteConfig(format="parquet"),
                                                 "jpg")))
    assert table.column(schema.TEXTS_AUG).to_pylist()[0] == ["a red circle",
                                                              "a circle that is red"]
    assert table.column(schema.REWRITE_FALLBACKS).to_pylist() == [[""], ["echo"]]
    assert table.column(schema.CAPTION_FALLBACK).to_pylist() == ["", "refusal"]
    plain = pq.read_table(io.BytesIO(encode_rows(_batch(False), WriteConfig(format="parquet"),
                                                 "jpg")))
    assert plain.column_names == [schema.KEY, schema.IMAGE, schema.TEXT, schema.META]
