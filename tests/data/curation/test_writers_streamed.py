"""The streamed shard writer: the same shard bytes as encoding the kept rows in one process,
whatever the batches look like (files mixed, blocks out of order, overlapping id ranges);
duplicates fail before a shard is written; resume skips shards on storage; S3 through moto.

    pytest tests/data/curation/test_writers_streamed.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from vlmray.config.curation import WriteConfig
from vlmray.data import schema
from vlmray.data.curation import piece_writer
from vlmray.data.curation.piece_writer import (
    PIECES,
    PieceIndex,
    assemble_shard,
    plan_shards,
    segments,
    write_piece,
    write_shards_streamed,
)
from vlmray.data.curation.writers import encode_rows
from vlmray.data.storage import exists, filesystem, join, remove, write_bytes_atomic

FILES, PER_FILE = 3, 23           # 69 rows; every 4th rejected -> 52 kept
REJECT_COLUMNS = (schema.KEY, schema.ROW_ID, schema.REJECT_REASON)


# The session's S3 endpoint starts before this module's Ray, so Ray's workers inherit its env.
pytestmark = pytest.mark.usefixtures("s3_server")


def _rows() -> pa.Table:
    """Rows as curation leaves them: three input files, some rejected, rewrite columns on."""
    rng = np.random.default_rng(0)
    ids = [(f << 32) | i for f in range(FILES) for i in range(PER_FILE)]
    n = len(ids)
    return pa.table({
        schema.KEY: [f"{i >> 32}-{i & 0xFFFF:04d}" for i in ids],
        schema.IMAGE: [rng.bytes(int(rng.integers(50, 400))) for _ in ids],
        schema.TEXT: [f"caption {j} ü".encode() for j in range(n)],
        schema.META: [json.dumps({"label": j % 5}) for j in range(n)],
        schema.PHASH: pa.array(rng.integers(-2**63, 2**63 - 1, n), pa.int64()),
        schema.CLIP_SCORE: rng.random(n),
        schema.TEXTS_AUG: [[f"caption {j}", f"a caption {j}"] for j in range(n)],
        schema.ROW_ID: pa.array(ids, pa.int64()),
        schema.REJECT_REASON: ["duplicate" if j % 4 == 1 else "" for j in range(n)],
    })


def _blocks(table: pa.Table) -> list[pa.Table]:
    """The rows as a stream would deliver them: file 2 first, a batch mixing file 0's tail with
    file 2's head... and two batches whose id ranges interleave (even / odd rows of file 1)."""
    f0, f1, f2 = (table.slice(f * PER_FILE, PER_FILE) for f in range(FILES))
    take = lambda t, rows: t.take(pa.array(rows))                     # noqa: E731
    odd, even = list(range(1, PER_FILE, 2)), list(range(0, PER_FILE, 2))
    return [f2.slice(10), pa.concat_tables([f0.slice(15), f2.slice(0, 10)]), take(f1, even),
            f0.slice(0, 15), take(f1, odd[::-1])]


def _expected(table: pa.Table, cfg: WriteConfig) -> dict[str, bytes]:
    """Shard name -> bytes: the kept rows in ROW_ID order, encoded in this process."""
    kept = table.filter(pc.equal(table[schema.REJECT_REASON], "")).sort_by(schema.ROW_ID)
    out = {}
    for i, start in enumerate(range(0, kept.num_rows, cfg.shard_size)):
        part = kept.slice(start, cfg.shard_size)
        batch = {c: part[c].to_numpy(zero_copy_only=False) for c in part.column_names}
        out[cfg.shard_name(i)] = encode_rows(batch, cfg, "jpg")
    return out


def _shards(uri: str) -> dict[str, bytes]:
    fs, path = filesystem(uri)
    files = sorted(i["name"] for i in fs.ls(path, detail=True) if i["type"] == "file")
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in files}


def _local_write(blocks: list[pa.Table], uri: str, cfg: WriteConfig) -> PieceIndex:
    """Pass A and assemble in this process, batch by batch (the writer's own functions)."""
    pieces = join(uri, PIECES)
    rows = [write_piece(b, pieces_uri=pieces).to_pylist()[0] for b in blocks]
    index = PieceIndex.from_summaries(iter(rows), None)
    for shard, n, parts in plan_shards(index, cfg.shard_size):
        assemble_shard(shard, n, parts, pieces, uri, cfg, "jpg")
    remove(pieces)
    return index


def test_runs_split_where_ids_are_not_consecutive() -> None:
    ids = np.array([5, 3, 4, 10, 11, 20, 21], dtype=np.int64)
    kept = np.array([1, 0, 1, 0, 0, 1, 1], dtype=bool)
    lo, hi, n = segments(ids, kept)
    assert lo.tolist() == [3, 20] and hi.tolist() == [5, 21] and n.tolist() == [2, 2]


def test_scattered_ids_are_merged_into_at_most_max_runs() -> None:
    ids = np.arange(0, 4000, 2, dtype=np.int64)[::-1]            # 2000 runs of one id
    kept = ids % 3 != 0
    lo, hi, n = segments(ids, kept)
    assert len(lo) <= piece_writer.MAX_RUNS and n.sum() == kept.sum() and (lo[1:] > hi[:-1]).all()
    run = np.searchsorted(lo, ids[kept], side="right") - 1       # each kept id's run
    assert (ids[kept] <= hi[run]).all()


def test_merged_runs_that_overlap_other_pieces_still_give_the_same_shards(
        tmp_path, monkeypatch) -> None:
    table, cfg = _rows(), WriteConfig(shard_size=5)
    monkeypatch.setattr(piece_writer, "MAX_RUNS", 2)                    # coarse runs overlap
    rows = np.arange(table.num_rows)
    blocks = [table.take(pa.array(rows[rows % 3 == r])) for r in range(3)]
    index = _local_write(blocks, str(tmp_path), cfg)
    assert len(piece_writer._clusters(index)[0]) < len(index.lo)       # runs were merged
    assert _shards(str(tmp_path)) == _expected(table, cfg)


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_overlapping_pieces_give_the_shards_of_one_process(tmp_path, fmt) -> None:
    table, cfg = _rows(), WriteConfig(format=fmt, shard_size=7)
    blocks = _blocks(table)
    index = _local_write(blocks, str(tmp_path), cfg)
    ranges = sorted((b[schema.ROW_ID].to_numpy().min(), b[schema.ROW_ID].to_numpy().max())
                    for b in blocks)
    assert any(a[1] >= b[0] for a, b in zip(ranges, ranges[1:]))     # pieces do overlap
    assert len(index.names) == len(blocks) and index.rows == table.num_rows
    assert _shards(str(tmp_path)) == _expected(table, cfg)


def test_a_duplicated_row_id_fails_before_its_shard_is_written(tmp_path) -> None:
    table, cfg = _rows(), WriteConfig(shard_size=7)
    dup = table.slice(2 * PER_FILE + 8, 1)                            # file 2's row 8, again
    kept = table.filter(pc.equal(table[schema.REJECT_REASON], ""))[schema.ROW_ID].to_pylist()
    shard = kept.index(dup[schema.ROW_ID][0].as_py()) // cfg.shard_size
    with pytest.raises(RuntimeError, match="duplicate or missing row ids"):
        _local_write(_blocks(table) + [dup], str(tmp_path), cfg)
    assert not (tmp_path / cfg.shard_name(shard)).exists()
    expected = _expected(table, cfg)
    assert all(_shards(str(tmp_path))[cfg.shard_name(i)] == expected[cfg.shard_name(i)]
               for i in range(shard))


def _summary(t: pa.Table) -> dict:
    return {"rejected": int(pc.sum(pc.not_equal(
        t[schema.REJECT_REASON], "")).as_py())}


def _run(uri: str, cfg: WriteConfig, rejects: str | None = None) -> tuple[dict, int]:
    import ray.data

    seen: list[int] = []
    out = write_shards_streamed(ray.data.from_arrow(_blocks(_rows())), uri, cfg, "jpg",
                                summarize=_summary, on_summary=lambda d: seen.append(
                                    d["rejected"]), rejects_uri=rejects,
                                reject_columns=REJECT_COLUMNS)
    return out, sum(seen)


def test_on_ray_the_same_shards_rejects_and_counts(ray_local, tmp_path) -> None:
    table, cfg = _rows(), WriteConfig(shard_size=7, piece_rows=8)
    uri, rejects = str(tmp_path / "shards"), str(tmp_path / "rejects")
    out, rejected = _run(uri, cfg, rejects)
    expected = _expected(table, cfg)
    assert _shards(uri) == expected and not exists(join(uri, PIECES))
    kept = len(table) - rejected
    assert (out["rows"], out["rows_out"], out["rows_rejected"]) == (len(table), kept, rejected)
    assert out["rows_written"] == out["distinct_row_ids"] == kept == 52
    assert out["shards"] == out["shards_written"] == len(expected) and out["pieces"] >= 7
    got = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "rejects").iterdir())])
    want = table.filter(pc.not_equal(table[schema.REJECT_REASON], ""))
    assert sorted(got[schema.ROW_ID].to_pylist()) == want[schema.ROW_ID].to_pylist()
    assert got.column_names == list(REJECT_COLUMNS)


def test_resume_skips_the_shards_on_storage(ray_local, tmp_path) -> None:
    cfg = WriteConfig(shard_size=7, piece_rows=8)
    uri = str(tmp_path / "shards")
    write_bytes_atomic(join(uri, cfg.shard_name(1)), b"written by an earlier run")
    write_bytes_atomic(join(uri, PIECES, "stale.parquet"), b"an interrupted run's piece")
    out, _ = _run(uri, cfg)
    expected = _expected(_rows(), cfg)
    assert out["shards_skipped"] == 1 and out["shards_written"] == len(expected) - 1
    assert out["rows_written"] == 52 - 7
    assert _shards(uri) == {**expected, cfg.shard_name(1): b"written by an earlier run"}


def test_s3_shards_match_local(ray_local, s3_bucket) -> None:
    cfg = WriteConfig(format="parquet", shard_size=10, piece_rows=16)
    uri = f"{s3_bucket}/curated/shards"
    out, _ = _run(uri, cfg, rejects=f"{s3_bucket}/curated/rejects")
    assert out["rows_written"] == 52 and out["shards"] == 6
    assert _shards(uri) == _expected(_rows(), cfg)
    assert not exists(join(uri, PIECES)) and exists(f"{s3_bucket}/curated/rejects")
