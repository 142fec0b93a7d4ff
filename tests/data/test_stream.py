"""StreamTally: each input row counted once however often the stream re-reads it (no Ray).

    pytest tests/data/test_stream.py -q
"""

from __future__ import annotations

import numpy as np

from vlmray.data.stream import StreamTally


def _ids(file: int, rows: list[int]) -> np.ndarray:
    return (np.int64(file) << 32) | np.asarray(rows, dtype=np.int64)


def test_rows_are_counted_once_across_passes_and_batchings() -> None:
    tally = StreamTally()
    reasons = np.array(["", "decode_error", "", "text_too_long"], dtype=object)
    new = tally.add(_ids(0, [0, 1, 2, 3]), reasons)
    assert new.tolist() == [True] * 4
    # a second pass, batched differently, mixed with rows of another file
    again = tally.add(np.concatenate([_ids(0, [3, 1]), _ids(7, [5])]),
                      np.array(["text_too_long", "decode_error", "decode_error"], dtype=object))
    assert again.tolist() == [False, False, True]
    assert tally.totals() == {"rows_in": 5, "rows_accepted": 2, "rows_rejected": 3,
                              "reject_reasons": {"decode_error": 2, "text_too_long": 1}}


def test_bitmaps_grow_for_large_row_indices() -> None:
    tally = StreamTally()
    tally.add(_ids(1, [2]), np.array([""], dtype=object))
    new = tally.add(_ids(1, [100_000, 2]), np.array(["", ""], dtype=object))
    assert new.tolist() == [True, False]
    assert tally.totals()["rows_in"] == 2


def test_training_rejects_have_curations_columns(tmp_path, monkeypatch) -> None:
    """SplitStage writes the curation job's reject columns (key, text, url, source, row_id,
    stage, reason, duplicate_of, repairs), "" where the stream has no value (plain Python: the
    tally's actor call is run in place)."""
    import io

    import pyarrow.parquet as pq
    import ray
    from PIL import Image

    from vlmray.config.run import DataConfig
    from vlmray.data import schema
    from vlmray.data.curation.accounting import REJECT_COLUMNS
    from vlmray.data.curation.readers import read_file
    from vlmray.data.ingest import DecodeStage, train_columns
    from vlmray.data.shards import encode_shard
    from vlmray.data.stream import SplitStage

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "JPEG")
    samples = [{schema.KEY: "ok", schema.IMAGE: buf.getvalue(), schema.TEXT: "a red square"},
               {schema.KEY: "bad", schema.IMAGE: b"not an image", schema.TEXT: "garbage"},
               {schema.KEY: "notext", schema.IMAGE: buf.getvalue()}]
    uri = str(tmp_path / "00000.tar")
    (tmp_path / "00000.tar").write_bytes(encode_shard(samples)[0])
    cfg = DataConfig()
    decoded = DecodeStage(cfg)(read_file(uri, 3, "webdataset"))
    assert decoded[schema.SOURCE].tolist() == [uri] * 3          # passed through for rejects

    class Tally:                                                   # StreamTally, called in place
        def __init__(self) -> None:
            self.add = type("Remote", (), {"remote": staticmethod(StreamTally().add)})()

    monkeypatch.setattr(ray, "get", lambda value: value)
    split = SplitStage(Tally(), str(tmp_path / "rejects"), train_columns(cfg))
    kept = split(decoded)
    assert len(kept[schema.TOKENS]) == 1                          # "ok" trains
    table = pq.read_table(next((tmp_path / "rejects").glob("*.parquet")))
    assert table.column_names == list(REJECT_COLUMNS)
    rows = table.to_pylist()
    assert [r[schema.KEY] for r in rows] == ["bad", "notext"]
    assert [r[schema.REJECT_REASON] for r in rows] == ["decode_error", "missing_text"]
    assert {r[schema.SOURCE] for r in rows} == {uri} and rows[0][schema.TEXT] == "garbage"
    assert [r[schema.ROW_ID] for r in rows] == [(3 << 32) | 1, (3 << 32) | 2]
    assert {r[schema.DUPLICATE_OF] for r in rows} == {""} == {r[schema.URL] for r in rows}
    assert str(table.schema.field(schema.ROW_ID).type) == "int64"
