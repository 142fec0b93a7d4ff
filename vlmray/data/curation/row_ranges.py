"""Row ranges of input files: an index of each file and a reader of a subset of its rows.

Exact training resume cuts the stream into units (a file and a row range ``[start, stop)``); a
resumed run reads only the rows it still needs. :func:`index_file` counts a file's rows the way
:func:`~vlmray.data.curation.readers.read_file` produces them, without reading row data: the
parquet footer, or an uncompressed tar's headers only (member data is skipped by seeking), with
the byte offset where every ``unit_rows``-th row's members start. :func:`read_rows` then reads
chosen rows, with every value (key, ``ROW_ID``, reject reason, bytes) identical to
``read_file``'s: only the parquet row groups holding them (and only their image files), or a
tar's members from a row's offset on, extracting only the selected rows' members.

    idx = index_file("00000.tar", "webdataset", unit_rows=256)
    j = 3                                            # resume inside unit 3
    batch = read_rows("00000.tar", 0, "webdataset", np.arange(800, 1024),
                      offset=idx.offsets[j], start=j * 256)
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmray.config.inputs import ReadConfig
from vlmray.data import schema
from vlmray.data.curation.image_paths import FILE_TOO_LARGE
from vlmray.data.curation.readers import (
    _ROW_COLUMNS,
    _TAR_ERRORS,
    COLUMNS,
    Batch,
    _extension,
    _resolve_columns,
    _tar_member,
    _to_batch,
    read_file,
)
from vlmray.data.curation.table_rows import table_rows
from vlmray.data.curation.truncation import lacks_end_marker, mark_cut
from vlmray.data.shards import sample_key
from vlmray.data.storage import arrow_filesystem, filesystem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileIndex:
    """What a resumed reader needs to know of one input file before reading it."""

    rows: int
    """Rows of the file, exactly as ``read_file`` returns them."""
    offsets: tuple[int, ...] = ()
    """Uncompressed tars only: ``offsets[j]`` is the byte offset of the header of the first
    member of row ``j * unit_rows`` (where :func:`read_rows` can start parsing to reach it)."""


# --- tars -----------------------------------------------------------------------------------


def _open_tar(f: IO[bytes], uri: str, offset: int | None) -> tuple[tarfile.TarFile | None, bool]:
    """``(tar, seekable)``: an uncompressed ``.tar`` opened for random access at ``offset``
    (member data skipped by seeking, never read), else a stream from the start (``.tar.gz``,
    or a ``.tar`` that is compressed after all); ``(None, False)`` when it is no tar."""
    if _extension(uri) == ".tar":
        f.seek(offset or 0)
        try:
            return tarfile.open(fileobj=f, mode="r:"), True
        except _TAR_ERRORS:
            if offset:
                return None, False
    elif offset is not None:
        raise ValueError(f"{uri}: a byte offset only applies to an uncompressed .tar")
    f.seek(0)
    try:
        return tarfile.open(fileobj=f, mode="r|*"), False
    except _TAR_ERRORS:
        return None, False


def _counted(tar: tarfile.TarFile) -> Iterator[tuple[int, bool, tarfile.TarInfo, str, str]]:
    """``(row, starts_row, info, group, column)`` of each member ``read_file`` counts, rows
    numbered from 0 at the tar's first member, by its rules: a group that re-appears or
    repeats a member starts a new row."""
    row, group, seen = -1, "", set()
    for info in tar:
        member = _tar_member(info)
        if member is None:
            continue
        name, col = member
        new = row < 0 or group != name or col in seen
        if new:
            row, group, seen = row + 1, name, set()
        seen.add(col)
        yield row, new, info, name, col


def _index_tar(uri: str, unit_rows: int) -> FileIndex:
    fs, path = filesystem(uri)
    rows, offsets = 0, []
    with fs.open(path, "rb") as f:
        tar, seekable = _open_tar(f, uri, None)
        if tar is None:
            return FileIndex(0)
        try:
            for row, new, info, _, _ in _counted(tar):
                if new:
                    rows = row + 1
                    if row % unit_rows == 0:
                        offsets.append(info.offset)
        except _TAR_ERRORS as e:
            log.warning("truncated or corrupt tar %s: %d rows before the cut: %s", uri, rows, e)
    return FileIndex(rows, tuple(offsets) if seekable else ())


def _tar_rows(uri: str, wanted: set[int], cfg: ReadConfig, offset: int | None,
              start: int) -> dict[int, dict[str, Any]]:
    """Row index -> row (``read_file``'s columns) of the ``wanted`` rows found; only their
    members are extracted, parsing from ``offset`` (row ``start``) or the file's start."""
    fs, path = filesystem(uri)
    first, last = (start if offset is not None else 0), max(wanted)
    found: dict[int, dict[str, Any]] = {}
    i, reading = -1, False
    with fs.open(path, "rb") as f:
        tar, _ = _open_tar(f, uri, offset)
        if tar is None:
            return found
        try:
            for rel, new, info, name, col in _counted(tar):
                i = first + rel
                if i > last:
                    break
                if i not in wanted:
                    continue
                if new:
                    found[i] = {**dict.fromkeys(_ROW_COLUMNS), schema.KEY: sample_key(name),
                                schema.REJECT_REASON: ""}
                row = found[i]
                if info.size > cfg.max_bytes:
                    row[schema.REJECT_REASON] = row[schema.REJECT_REASON] or FILE_TOO_LARGE
                    continue
                reading = True
                data = tar.extractfile(info)
                value = data.read() if data else b""
                reading = False
                row[col] = value.decode("utf-8", "replace") if col == schema.META else value
            else:                                  # parsed to the end: is the end marker there?
                if _extension(uri) == ".tar" and lacks_end_marker(fs.size(path), tar):
                    mark_cut(found.get(i), inside_member=False)
        except _TAR_ERRORS as e:
            mark_cut(found.get(i), inside_member=reading)   # i: the last row, cut or whole
            log.warning("truncated or corrupt tar %s: kept the rows before the cut: %s", uri, e)
    return found


# --- parquet --------------------------------------------------------------------------------


def _parquet_rows(uri: str, select: np.ndarray, cfg: ReadConfig) -> dict[str, list[Any]]:
    """``read_file``'s columns of the ``select`` rows of a parquet file, in that order: only
    the row groups holding them are read, and only their image paths opened."""
    afs, path = arrow_filesystem(uri)
    with afs.open_input_file(path) as raw:
        pf = pq.ParquetFile(raw)
        roles = _resolve_columns(pf.schema_arrow.names, cfg, uri, need_image_or_url=True)
        _check_rows(uri, select, pf.metadata.num_rows)
        wanted = list(dict.fromkeys(c for c in roles.values() if c))
        table = parquet_rows(pf, select, columns=wanted)
    return table_rows(table.to_pydict(), roles, table.num_rows, uri, cfg)


# --- public ---------------------------------------------------------------------------------


def parquet_rows(pf: pq.ParquetFile, select: np.ndarray,
                 columns: list[str] | None = None) -> pa.Table:
    """Rows ``select`` (absolute, any order) of an open parquet file, in that order, reading
    only the row groups that hold them."""
    sizes = np.array([pf.metadata.row_group(g).num_rows
                      for g in range(pf.metadata.num_row_groups)], dtype=np.int64)
    ends = np.cumsum(sizes)
    groups = np.searchsorted(ends, select, side="right")
    used = np.unique(groups)
    first_in_read = np.cumsum(sizes[used]) - sizes[used]   # where each read group starts
    local = select - (ends - sizes)[groups] + first_in_read[np.searchsorted(used, groups)]
    return pf.read_row_groups(used.tolist(), columns=columns).take(
        pa.array(local, type=pa.int64()))


def _check_rows(uri: str, select: np.ndarray, rows: int) -> None:
    if len(select) and (select.min() < 0 or select.max() >= rows):
        raise IndexError(f"{uri}: rows {select[(select < 0) | (select >= rows)][:5].tolist()}"
                         f" are not among its {rows} rows")


def _batch(columns: dict[str, list[Any]], uri: str, file_index: int,
           select: np.ndarray) -> Batch:
    """``_to_batch`` of rows that are not the file's first ``n``: default keys and
    ``ROW_ID`` from their row indices in the file."""
    columns[schema.KEY] = [k if k else f"{file_index:05d}{i:06d}"
                           for k, i in zip(columns[schema.KEY], select.tolist())]
    batch = _to_batch(columns, uri, file_index)
    batch[schema.ROW_ID] = (np.int64(file_index) << 32) | select
    return batch


def index_file(uri: str, fmt: str, unit_rows: int, cfg: ReadConfig | None = None) -> FileIndex:
    """The :class:`FileIndex` of one input file: its row count as ``read_file`` would return
    it (parquet: from the footer; tar: from member headers, data skipped; a truncated or
    corrupt tar counts the rows before the cut), and for an uncompressed ``.tar`` the offset
    of every ``unit_rows``-th row's first member header. URL lists are read whole (small)."""
    if unit_rows < 1:
        raise ValueError(f"unit_rows must be >= 1, got {unit_rows}")
    cfg = cfg or ReadConfig()
    if fmt == "webdataset":
        return _index_tar(uri, unit_rows)
    if fmt in ("parquet", "urls") and _extension(uri) == ".parquet":
        afs, path = arrow_filesystem(uri)
        with afs.open_input_file(path) as raw:
            return FileIndex(pq.ParquetFile(raw).metadata.num_rows)
    return FileIndex(len(read_file(uri, 0, fmt, cfg)[schema.KEY]))


def read_rows(uri: str, file_index: int, fmt: str, select: np.ndarray, *,
              cfg: ReadConfig | None = None, offset: int | None = None,
              start: int = 0) -> Batch:
    """The rows of one input file whose indices (in the file, unique, any order) are in
    ``select``, in ``select``'s order, with exactly :data:`COLUMNS` and the values
    ``read_file(uri, file_index, fmt, cfg)`` has for them.

    Parquet reads only the row groups holding a selected row (and the image paths of selected
    rows only); a tar extracts only selected rows' members, stopping after the last one. For an
    uncompressed ``.tar``, ``offset`` (from :attr:`FileIndex.offsets`) is the byte offset of row
    ``start``'s first member: nothing before it is read, and ``select`` must be ``>= start``.
    Raises ``IndexError`` for rows the file does not have.
    """
    cfg = cfg or ReadConfig()
    select = np.asarray(select, dtype=np.int64).ravel()
    if len(np.unique(select)) != len(select):
        raise ValueError(f"{uri}: select has repeated rows")
    if fmt not in ("webdataset", "parquet", "urls"):
        raise ValueError(f"{uri}: format {fmt!r}; valid: webdataset, parquet, urls")
    if not len(select):
        return _batch({c: [] for c in (*_ROW_COLUMNS, schema.REJECT_REASON)}, uri, file_index,
                      select)
    if fmt == "webdataset":
        if offset is not None and select.min() < start:
            raise ValueError(f"{uri}: rows before start={start} cannot be read from its offset")
        found = _tar_rows(uri, set(select.tolist()), cfg, offset, start)
        missing = [i for i in select.tolist() if i not in found]
        if missing:
            raise IndexError(f"{uri}: rows {missing[:5]} are not in the file"
                             + (f" (read from offset {offset}, row {start})" if offset else ""))
        rows = [found[i] for i in select.tolist()]
        columns = {c: [r[c] for r in rows] for c in (*_ROW_COLUMNS, schema.REJECT_REASON)}
        return _batch(columns, uri, file_index, select)
    if _extension(uri) == ".parquet":
        return _batch(_parquet_rows(uri, select, cfg), uri, file_index, select)
    whole = read_file(uri, file_index, fmt, cfg)
    _check_rows(uri, select, len(whole[schema.KEY]))
    return {c: whole[c][select] for c in COLUMNS}


__all__ = ["parquet_rows", "FileIndex", "index_file", "read_rows"]
