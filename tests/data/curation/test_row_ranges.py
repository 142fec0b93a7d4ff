"""Row ranges on real files: index_file counts the rows read_file returns (tars from headers
only, with offsets to every unit's first row), read_rows returns exactly read_file's values for
any selection, reads nothing before an offset, skips unselected tar members' data, and reads
only the parquet row groups (and image files) of selected rows."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmray.config.inputs import ReadConfig
from vlmray.data import schema
from vlmray.data.curation.readers import COLUMNS, read_file
from vlmray.data.curation.row_ranges import FileIndex, index_file, read_rows

UNIT = 4
CFG = ReadConfig(max_bytes=2000)


def _tar(members: list[tuple[str, bytes | None]]) -> bytes:
    """A GNU tar; a member with data None is a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members() -> list[tuple[str, bytes | None]]:
    """26 rows: missing captions or sidecars, a re-appearing and a repeated group, an
    over-size image, directories and ignored members, a key-less group, long names."""
    out: list[tuple[str, bytes | None]] = [("d/", None)]
    for i in range(20):
        out.append((f"s{i:03d}.jpg", bytes([i]) * (300 + 37 * i)))
        if i % 3:
            out.append((f"s{i:03d}.txt", f"caption {i}".encode()))
        if i % 4 == 0:
            out.append((f"s{i:03d}.json", json.dumps({"i": i}).encode()))
        if i == 5:
            out += [("s005.cls", b"7"), ("s004.txt", b"s004 again"), ("s006.jpg", b"x"),
                    ("s006.jpg", b"y"), ("sub/", None)]
        if i == 9:
            out += [("s009.png", b"Z" * 2500), ("s009.txt", b"too big")]   # over max_bytes
        if i == 12:
            out += [(".jpg", b"keyless"), ("README", b"r"), ("x" * 120 + ".jpg", b"long")]
    return out


def _same(got: dict, whole: dict, select) -> None:
    select = np.asarray(select, dtype=np.int64)
    assert sorted(got) == sorted(COLUMNS)
    for c in COLUMNS:
        assert list(got[c]) == list(whole[c][select]), c
    assert got[schema.ROW_ID].dtype == np.int64


def _selects(n: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [list(range(n)), list(range(n))[::-1], [0], [n - 1], [],
            *(rng.permutation(n)[:k].tolist() for k in (2, 5, n // 2))]


def _shard(tmp_path: Path, data: bytes, name: str = "00000.tar") -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


def test_tar_index_and_selected_rows_match_read_file(tmp_path) -> None:
    uri = _shard(tmp_path, _tar(_members()))
    whole = read_file(uri, 7, "webdataset", CFG)
    n = len(whole[schema.KEY])
    assert n == 26 and "file_too_large" in set(whole[schema.REJECT_REASON])
    assert "00007000017" in set(whole[schema.KEY])         # the key-less group's default key
    idx = index_file(uri, "webdataset", UNIT, CFG)
    assert idx.rows == n and len(idx.offsets) == -(-n // UNIT)
    assert list(idx.offsets) == sorted(set(idx.offsets)) and idx.offsets[0] > 0   # after d/
    for select in _selects(n):
        _same(read_rows(uri, 7, "webdataset", np.array(select), cfg=CFG), whole, select)
    for j, offset in enumerate(idx.offsets):
        start = j * UNIT
        for select in (range(start, n), [n - 1, start], [start + 1] if start + 1 < n else []):
            got = read_rows(uri, 7, "webdataset", np.array(select, dtype=np.int64), cfg=CFG,
                            offset=offset, start=start)
            _same(got, whole, list(select))


def test_offset_read_touches_nothing_before_the_offset(tmp_path) -> None:
    uri = _shard(tmp_path, _tar(_members()))
    whole = read_file(uri, 1, "webdataset", CFG)
    idx = index_file(uri, "webdataset", UNIT, CFG)
    j = 3
    with open(uri, "r+b") as f:                      # zero everything before unit 3's offset
        f.write(bytes(idx.offsets[j]))
    assert len(read_file(uri, 1, "webdataset", CFG)[schema.KEY]) == 0   # a full read fails
    select = [len(whole[schema.KEY]) - 1, j * UNIT + 2, j * UNIT]
    got = read_rows(uri, 1, "webdataset", np.array(select), cfg=CFG, offset=idx.offsets[j],
                    start=j * UNIT)
    _same(got, whole, select)
    with pytest.raises(ValueError, match="before start"):
        read_rows(uri, 1, "webdataset", np.array([0]), offset=idx.offsets[j], start=j * UNIT)


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_unselected_tar_members_are_not_read(tmp_path) -> None:
    big = 2_000_000
    uri = _shard(tmp_path, _tar([(f"k{i}.{s}", bytes([i]) * big if s == "jpg" else b"t")
                                 for i in range(8) for s in ("jpg", "txt")]))
    cfg = ReadConfig(max_bytes=4 * big)
    whole = read_file(uri, 0, "webdataset", cfg)
    read_rows(uri, 0, "webdataset", np.array([0]), cfg=cfg)          # warm up imports
    before = _bytes_read()
    idx = index_file(uri, "webdataset", 2, cfg)
    indexed = _bytes_read()
    got = read_rows(uri, 0, "webdataset", np.array([5, 2]), cfg=cfg)
    after = _bytes_read()
    read_file(uri, 0, "webdataset", cfg)
    full = _bytes_read() - after
    _same(got, whole, [5, 2])
    assert idx.rows == 8 and full > 8 * big
    assert indexed - before < big // 4                  # headers only
    assert after - indexed < 2 * big + big // 4         # the two selected images, not eight


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_tar_read_stops_after_the_last_selected_row(tmp_path) -> None:
    uri = _shard(tmp_path, _tar([(f"k{i:04d}.txt", b"t") for i in range(3000)]))
    read_rows(uri, 0, "webdataset", np.array([0]))             # warm up imports
    before = _bytes_read()
    got = read_rows(uri, 0, "webdataset", np.array([2, 1]))
    after = _bytes_read()
    assert index_file(uri, "webdataset", 100).rows == 3000
    scanned = _bytes_read() - after                  # every header: 3000 x 1 KiB
    assert list(got[schema.KEY]) == ["k0002", "k0001"]
    assert scanned > 1_000_000 and after - before < 100_000


@pytest.mark.parametrize("cut", ["mid_member", "mid_header", "no_end_marker"])
def test_truncated_tar_rows_match_read_file(tmp_path, cut: str) -> None:
    data = _tar(_members())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    info = next(m for m in infos if m.name == "s011.jpg")
    end = infos[-1].offset_data + -(-infos[-1].size // 512) * 512     # no zero blocks after
    at = {"mid_member": info.offset_data + 100, "mid_header": info.offset + 200,
          "no_end_marker": end}[cut]
    uri = _shard(tmp_path, data[:at])
    whole = read_file(uri, 2, "webdataset", CFG)
    n = len(whole[schema.KEY])
    assert 10 < n < 26 or cut == "no_end_marker"
    idx = index_file(uri, "webdataset", UNIT, CFG)
    assert idx.rows == n and len(idx.offsets) == -(-n // UNIT)
    for select in _selects(n):
        _same(read_rows(uri, 2, "webdataset", np.array(select), cfg=CFG), whole, select)
    j = len(idx.offsets) - 1
    got = read_rows(uri, 2, "webdataset", np.arange(j * UNIT, n), cfg=CFG,
                    offset=idx.offsets[j], start=j * UNIT)
    _same(got, whole, list(range(j * UNIT, n)))
    with pytest.raises(IndexError):
        read_rows(uri, 2, "webdataset", np.array([n]), cfg=CFG)


def test_tar_gz_rows_match_read_file(tmp_path) -> None:
    uri = _shard(tmp_path, gzip.compress(_tar(_members())), "00000.tar.gz")
    whole = read_file(uri, 3, "webdataset", CFG)
    assert index_file(uri, "webdataset", UNIT, CFG) == FileIndex(rows=26)   # no offsets
    for select in _selects(26):
        _same(read_rows(uri, 3, "webdataset", np.array(select), cfg=CFG), whole, select)
    with pytest.raises(ValueError, match="offset"):
        read_rows(uri, 3, "webdataset", np.array([1]), offset=512)
    with pytest.raises(ValueError, match="repeated"):
        read_rows(uri, 3, "webdataset", np.array([1, 1]))


def _table(n: int) -> dict:
    return {"key": [f"k{i}" if i % 7 else ("a.b" if i == 7 else None) for i in range(n)],
            "image": [bytes([i]) * (10 + i) if i % 5 else None for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "json": [json.dumps({"i": i}) if i % 2 else None for i in range(n)],
            "url": [f" http://x/{i}.jpg " for i in range(n)]}


@pytest.mark.parametrize("fmt", ["parquet", "urls"])
def test_parquet_row_groups_match_read_file(tmp_path, fmt: str) -> None:
    columns = _table(23)
    if fmt == "urls":
        del columns["image"]
    pq.write_table(pa.table(columns), tmp_path / "t.parquet", row_group_size=5)
    uri = str(tmp_path / "t.parquet")
    whole = read_file(uri, 4, fmt)
    assert "invalid_key" in set(whole[schema.REJECT_REASON])
    assert index_file(uri, fmt, UNIT) == FileIndex(rows=23)
    for select in _selects(23):
        _same(read_rows(uri, 4, fmt, np.array(select)), whole, select)
    with pytest.raises(IndexError):
        read_rows(uri, 4, fmt, np.array([3, 23]))


def _chunk_span(md: pq.FileMetaData, group: int) -> tuple[int, int]:
    """Byte range of a row group's column chunks (dictionary and data pages)."""
    spans = []
    for c in range(md.num_columns):
        col = md.row_group(group).column(c)
        first = min(o for o in (col.dictionary_page_offset, col.data_page_offset) if o)
        spans.append((first, first + col.total_compressed_size))
    return min(s for s, _ in spans), max(e for _, e in spans)


def test_unselected_parquet_row_groups_are_not_read(tmp_path) -> None:
    pq.write_table(pa.table(_table(12)), tmp_path / "t.parquet", row_group_size=4)
    uri = str(tmp_path / "t.parquet")
    whole = read_file(uri, 0, "parquet")
    lo, hi = _chunk_span(pq.read_metadata(uri), 1)
    with open(uri, "r+b") as f:                      # row group 1's pages become garbage
        f.seek(lo)
        f.write(b"\xab" * (hi - lo))
    with pytest.raises(OSError, match="page header"):
        read_file(uri, 0, "parquet")
    select = [11, 0, 3, 8]                            # row groups 2 and 0 only
    _same(read_rows(uri, 0, "parquet", np.array(select)), whole, select)
    with pytest.raises(OSError, match="page header"):
        read_rows(uri, 0, "parquet", np.array([0, 5]))


def test_parquet_image_paths_of_selected_rows_only(tmp_path) -> None:
    (tmp_path / "img").mkdir()
    n = 14
    for i in range(n):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(bytes([i]) * (100 if i != 6 else 3000))
    paths = [f"img/{i}.jpg" for i in range(n)]
    paths[3], paths[4], paths[9] = "../outside.jpg", "img/missing.jpg", None
    pq.write_table(pa.table({"image_path": paths, "caption": [f"c{i}" for i in range(n)]}),
                   tmp_path / "t.parquet", row_group_size=3)
    uri = str(tmp_path / "t.parquet")
    whole = read_file(uri, 9, "parquet", CFG)
    assert {"image_path_outside_input", "file_too_large"} <= set(whole[schema.REJECT_REASON])
    assert whole[schema.KEY][12] == "00009000012"     # no key column: file and row index
    assert index_file(uri, "parquet", UNIT, CFG).rows == n
    for select in _selects(n):
        _same(read_rows(uri, 9, "parquet", np.array(select), cfg=CFG), whole, select)
    loop = tmp_path / "img" / "10.jpg"                # opening it fails: a symlink to itself
    loop.unlink()
    loop.symlink_to(loop)
    with pytest.raises(OSError):
        read_file(uri, 9, "parquet", CFG)
    select = [13, 9, 11, 1]                           # row 10 is in row group 3, unselected
    _same(read_rows(uri, 9, "parquet", np.array(select), cfg=CFG), whole, select)


def test_url_lists_read_whole_then_select(tmp_path) -> None:
    (tmp_path / "u.csv").write_text("url,caption\n" + "".join(
        f"http://x/{i}.jpg,c{i}\n" for i in range(9)))
    uri = str(tmp_path / "u.csv")
    whole = read_file(uri, 5, "urls")
    assert index_file(uri, "urls", UNIT) == FileIndex(rows=9)
    for select in _selects(9):
        _same(read_rows(uri, 5, "urls", np.array(select)), whole, select)
    with pytest.raises(IndexError):
        read_rows(uri, 5, "urls", np.array([9]))
    with pytest.raises(ValueError, match="format"):
        read_rows(uri, 5, "csv", np.array([0]))
