"""Scatter files: compact rows routed to P partitions through parquet, so no task holds more
than one partition (the storage side of :mod:`vlmray.data.curation.dedup_partitioned`).

A task writes ONE file per step with its rows grouped by destination partition, one row group
per partition (tagged in the footer); the task of partition q reads only q's row groups of
each file. A step of T tasks writes T files, not T x P. Also the runners that execute a list of
calls in this process or as Ray tasks, and readers of the compact table.

    uri = scatter(out, [(table, partition_of(values, parts, row_ids))])
    rows = gather(uris, q, columns)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlmray.data import schema
from vlmray.data.curation.stage import Batch
from vlmray.data.storage import filesystem, open_write, to_uri

PART = "_part"
VALUE, SRC, DST, SRC_KEY, DST_VALUE, UP_ROW, UP_KEY = (
    "value", "src_row", "dst_row", "src_key", "dst_value", "up_row", "up_key")
_INTS = {schema.ROW_ID, schema.PHASH, VALUE, SRC, DST, DST_VALUE, UP_ROW}

Runner = Callable[[Callable[..., Any], Sequence[tuple[Any, ...]]], list[Any]]
"""Runs ``fn(*args)`` for each args tuple, returns the results in order (locally or as tasks)."""


def run_local(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]]) -> list[Any]:
    """A :data:`Runner` in this process (tests, and the shape of what the Ray runner does)."""
    return [fn(*args) for args in calls]


def ray_runner(remote_args: dict[str, Any] | None = None) -> Runner:
    """A :data:`Runner` of Ray tasks placed by ``remote_args`` (one CPU each by default)."""
    def run(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        import ray

        task = ray.remote(fn).options(**{"num_cpus": 1, **(remote_args or {})})
        return ray.get([task.remote(*args) for args in calls])
    return run


# --- partitions and scatter files ------------------------------------------------------------


def partition_of(values: np.ndarray, parts: int, row_ids: np.ndarray) -> np.ndarray:
    """Per row, its partition in [0, parts): a stable hash of its value (every row of one
    value lands together, in any process); rows without a value ("" or None, which no rule
    matches) spread by ``ROW_ID`` instead of piling into one partition."""
    from pandas.util import hash_array

    values = np.asarray(values)
    if values.dtype.kind in "iu":
        h = hash_array(values.astype(np.int64).view(np.uint64))
    else:
        empty = (values == "") | np.equal(values, None)
        text = values.astype(object)                     # str objects, not fixed-width copies
        text[empty] = ""
        h = hash_array(text)
        h[empty] = hash_array(np.asarray(row_ids, np.int64)[empty].view(np.uint64))
    return (h % np.uint64(parts)).astype(np.int32)


def _type(column: str) -> pa.DataType:
    return pa.int64() if column in _INTS else pa.int32() if column == PART else pa.string()


def to_table(batch: Batch) -> pa.Table:
    """Numpy columns -> an Arrow table of this module's fixed types (strings, int64)."""
    return pa.table({c: pa.array(np.asarray(v).tolist() if _type(c) == pa.string() else v,
                                 _type(c)) for c, v in batch.items()})


def to_batch(table: pa.Table, *, by_row: str | None = schema.ROW_ID) -> Batch:
    """An Arrow table -> numpy columns (strings as objects), sorted by ``by_row`` if given."""
    if by_row is not None and table.num_rows:
        table = table.sort_by(by_row)
    return {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}


def scatter(uri: str, chunks: Iterable[tuple[pa.Table, np.ndarray]]) -> str | None:
    """Writes the rows of ``chunks`` (table, partition per row; each chunk's partitions above
    the last one's) to one parquet file, one row group per partition: :func:`gather` reads
    one partition's rows from it. Returns ``uri``, or None when there were no rows."""
    writer, fh = None, None
    try:
        for table, part in chunks:
            if not table.num_rows:
                continue
            order = np.argsort(part, kind="stable")
            part = np.asarray(part, np.int32)[order]
            table = table.take(pa.array(order)).append_column(PART, pa.array(part, pa.int32()))
            if writer is None:
                fh = open_write(uri, "wb")
                writer = pq.ParquetWriter(fh, table.schema, write_statistics=[PART])
            starts = np.flatnonzero(np.r_[True, part[1:] != part[:-1]])
            for a, b in zip(starts.tolist(), np.r_[starts[1:], len(part)].tolist()):
                writer.write_table(table.slice(a, b - a))       # its own row group(s)
    finally:
        if writer is not None:
            writer.close()
        if fh is not None:
            fh.close()
    return uri if writer is not None else None


class Scattered:
    """The scatter files of one step, their footers read once: which row groups hold which
    partition (their ``_part`` statistics), so a task reading several partitions of the same
    files (a band task: one per route) parses each footer once."""

    def __init__(self, uris: Sequence[str]) -> None:
        self.files: list[tuple[str, pq.FileMetaData, dict[int, list[int]]]] = []
        for uri in uris:
            fs, path = filesystem(uri)
            with fs.open(path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
            col = meta.schema.to_arrow_schema().get_field_index(PART)
            groups: dict[int, list[int]] = {}
            for i in range(meta.num_row_groups):
                groups.setdefault(_group_part(meta.row_group(i), col), []).append(i)
            self.files.append((uri, meta, groups))

    def read(self, part: int | None, columns: Sequence[str]) -> pa.Table:
        """The rows of partition ``part`` (None: all rows), reading only its row groups."""
        tables = []
        for uri, meta, groups in self.files:
            wanted = list(range(meta.num_row_groups)) if part is None else groups.get(part, [])
            if wanted:
                fs, path = filesystem(uri)
                with fs.open(path, "rb") as fh:
                    pf = pq.ParquetFile(fh, metadata=meta)
                    tables.append(pf.read_row_groups(wanted, columns=list(columns),
                                                     use_threads=False))   # small reads
        if not tables:
            return pa.table({c: pa.array([], _type(c)) for c in columns})
        return pa.concat_tables(tables)


def gather(uris: Sequence[str], part: int | None, columns: Sequence[str]) -> pa.Table:
    """The rows of partition ``part`` (None: all rows) of the scatter files ``uris``."""
    return Scattered(uris).read(part, columns)


def _group_part(group: pq.RowGroupMetaData, col: int) -> int:
    stats = group.column(col).statistics
    if stats is None or not stats.has_min_max or stats.min != stats.max:
        raise ValueError(f"row group without one {PART} value: not written by scatter()")
    return int(stats.min)


# --- the compact table -----------------------------------------------------------------------


def compact_files(uri: str) -> list[tuple[str, int]]:
    """(URI, rows) of each parquet file under ``uri`` (pass 1's signatures or staged rows),
    from the footers alone; names starting with ``_`` or ``.`` are not data, as in Arrow."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    found = [path] if fs.isfile(path) else sorted(fs.find(path))
    out = []
    for p in found:
        rel = p[len(path):].split("/")
        if not p.endswith(".parquet") or any(s.startswith(("_", ".")) for s in rel if s):
            continue
        with fs.open(p, "rb") as fh:
            out.append((to_uri(fs, p), pq.ParquetFile(fh).metadata.num_rows))
    return out


def read_live(uri: str, columns: Sequence[str]) -> pa.Table:
    """``columns`` of the live rows of one compact file (``REJECT_REASON == ""`` where the
    file has that column: staged rows), cast to this module's types (a null column to str)."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        staged = schema.REJECT_REASON in pf.schema_arrow.names
        table = pf.read(columns=[*columns, *([schema.REJECT_REASON] if staged else [])])
    if staged:
        table = table.filter(pc.equal(table[schema.REJECT_REASON], "")).drop_columns(
            [schema.REJECT_REASON])
    return pa.table({c: table[c].cast(_type(c)) for c in columns})


def file_groups(files: list[tuple[str, int]], target: int) -> list[list[str]]:
    """Consecutive files in groups of about ``target`` rows (a larger file alone)."""
    groups: list[list[str]] = []
    rows = 0
    for uri, n in files:
        if not groups or (rows and rows + n > target):
            groups.append([])
            rows = 0
        groups[-1].append(uri)
        rows += n
    return groups


def split_task(uris: list[str], columns: list[str], by: str, parts: int,
                out: str) -> tuple[str | None, int]:
    """The live rows of some compact files, scattered by ``by``'s value (the first rule's)."""
    table = pa.concat_tables([read_live(u, columns) for u in uris])
    rows = to_batch(table, by_row=None)
    return scatter(out, [(table, partition_of(rows[by], parts, rows[schema.ROW_ID]))]), \
        table.num_rows


__all__ = ["DST", "DST_VALUE", "PART", "Runner", "SRC", "SRC_KEY", "Scattered", "UP_KEY",
           "UP_ROW", "VALUE", "compact_files", "file_groups", "gather", "partition_of",
           "ray_runner", "read_live", "run_local", "scatter", "split_task", "to_batch",
           "to_table"]
