"""The streamed shard writer: a lazy plan's kept rows become the same fixed-size shards as
:mod:`vlmray.data.curation.writers` writes, without ever holding the rows.

Pass A, in the stream: each batch's kept rows become one sorted parquet "piece" under
``<shards>/_pieces``, and the driver receives one small summary row per batch (the piece,
its runs of consecutive row ids, counts, and whatever the caller's ``summarize`` adds).
Assemble: from that index alone, kept rows get their global positions, and one task per
shard reads only the pieces its rows lie in. Image bytes go from the stream to the pieces to
the shards through storage, never through the object store or the driver; memory is a
function of the batch, piece and shard sizes, never of the number of rows.

    out = write_shards_streamed(ds, "s3://curated/v1/shards", WriteConfig(shard_size=10_000),
                                "jpg", summarize=per_batch_counts, on_summary=totals.add)
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlmray.config.curation import WriteConfig
from vlmray.data import schema
from vlmray.data.curation.writers import (
    REWRITE_COLUMNS,
    SHARD,
    SIGNAL_COLUMNS,
    existing_shards,
    write_shard_group,
)
from vlmray.data.storage import (
    arrow_filesystem,
    exists,
    join,
    remove,
    write_bytes_atomic,
)

if TYPE_CHECKING:
    import ray.data

PIECES = "_pieces"
"""Sub-directory of the shards URI holding the stream's pieces until the shards are written
(``_``-prefixed, so readers listing the shards never see it)."""
PIECE_COLUMNS = (schema.KEY, schema.IMAGE, schema.TEXT, schema.META, schema.ROW_ID,
                 *SIGNAL_COLUMNS, *REWRITE_COLUMNS)
"""What a piece keeps of a row: what :func:`encode_rows` writes, and the ``ROW_ID``."""
SUMMARY_EXTRA = "extra"
"""Summary column: the caller's ``summarize(batch)`` as JSON ("" without one)."""

MAX_RUNS = 64
"""Most id runs one piece reports (the driver's index grows by 32 bytes a run)."""
PIECE_ROW_GROUP = 256
"""Rows per parquet row group of a piece: a shard task reading part of a piece skips the
row groups outside its ``ROW_ID`` range (pieces are sorted by it)."""

Keep = Callable[[pa.Table], np.ndarray]
Summarize = Callable[[pa.Table], dict[str, Any]]


def kept_rows(table: pa.Table) -> np.ndarray:
    """The default ``keep``: rows whose ``REJECT_REASON`` is "" (all rows without the column)."""
    if schema.REJECT_REASON not in table.column_names:
        return np.ones(table.num_rows, dtype=bool)
    reasons = pc.fill_null(table[schema.REJECT_REASON].cast(pa.string()), "")
    return pc.equal(reasons, "").to_numpy(zero_copy_only=False)


def segments(row_ids: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, ...]:
    """A batch's row ids as runs of consecutive ids: ``(lo, hi, kept rows)`` per run that holds
    a kept row. While every row id reaches the writer once, runs of different batches never
    overlap (a run holds every id in its range), so the pieces partition the id space finely
    even when a batch mixes input files or blocks out of order. Rows in near-random order
    (a shuffle upstream) would give a run per row: past ``MAX_RUNS`` runs, neighbouring runs
    are merged (their ranges may then overlap other pieces', which the assemble step handles
    at the cost of reading more pieces per shard), so the index stays small."""
    order = np.argsort(row_ids, kind="stable")
    ids, keep = np.asarray(row_ids, dtype=np.int64)[order], np.asarray(kept, dtype=np.int64)[order]
    if not len(ids):
        return (np.zeros(0, dtype=np.int64),) * 3
    starts = np.r_[0, np.flatnonzero(np.diff(ids) != 1) + 1]
    if len(starts) > MAX_RUNS:                  # scattered ids: split only at the widest gaps
        gaps = ids[starts[1:]] - ids[starts[1:] - 1]
        starts = np.r_[0, np.sort(starts[1:][np.argpartition(gaps, -(MAX_RUNS - 1))
                                            [-(MAX_RUNS - 1):]])]
    ends = np.r_[starts[1:], len(ids)]
    n_kept = np.add.reduceat(keep, starts)
    has = n_kept > 0
    return ids[starts][has], ids[ends - 1][has], n_kept[has]


def _digest(row_ids: np.ndarray) -> str:
    """A file name from the sorted row ids: a retried task rewrites the same file."""
    ids = np.sort(np.asarray(row_ids, dtype=np.int64))
    return f"{int(ids[0]):016x}-{hashlib.sha1(ids.tobytes()).hexdigest()[:16]}.parquet"


def _put_parquet(uri: str, table: pa.Table, row_group_size: int | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    write_bytes_atomic(uri, buf.getvalue())


def write_piece(table: pa.Table, *, pieces_uri: str, keep: Keep | None = None,
                summarize: Summarize | None = None, rejects_uri: str | None = None,
                reject_columns: tuple[str, ...] = ()) -> pa.Table:
    """Pass A, one Ray Data batch: its kept rows, sorted by ``ROW_ID``, become one piece file
    (:data:`PIECE_COLUMNS`); with ``rejects_uri`` its rejected rows' ``reject_columns`` become
    one rejects file there. Returns ONE summary row: piece name ("" when nothing was kept),
    rows, kept, the id runs (``seg_lo``, ``seg_hi``, ``seg_kept``) and the caller's summary."""
    ids = table[schema.ROW_ID].to_numpy().astype(np.int64)
    mask = np.asarray((keep or kept_rows)(table), dtype=bool)
    lo, hi, n_kept = segments(ids, mask)
    name = ""
    if mask.any():
        cols = [c for c in PIECE_COLUMNS if c in table.column_names]
        piece = table.filter(pa.array(mask)).select(cols).sort_by(schema.ROW_ID)
        name = _digest(ids[mask])
        _put_parquet(join(pieces_uri, name), piece, PIECE_ROW_GROUP)
    if rejects_uri and not mask.all():
        cols = [c for c in reject_columns if c in table.column_names]
        rejected = table.filter(pa.array(~mask)).sort_by(schema.ROW_ID).select(cols)
        for c in reject_columns:                 # every rejects file has every column
            if c not in cols:                    # (duplicate_of without dedup...): ""
                rejected = rejected.append_column(c, pa.array([""] * rejected.num_rows,
                                                              pa.string()))
        rejected = rejected.select(list(reject_columns))
        _put_parquet(join(rejects_uri, f"rejects-{_digest(ids[~mask])}"), rejected)
    extra = json.dumps(summarize(table)) if summarize else ""
    ints = pa.list_(pa.int64())
    return pa.table({"piece": pa.array([name], pa.string()),
                     "rows": pa.array([len(ids)], pa.int64()),
                     "kept": pa.array([int(mask.sum())], pa.int64()),
                     **{col: pa.array([v.tolist()], ints)
                        for col, v in (("seg_lo", lo), ("seg_hi", hi), ("seg_kept", n_kept))},
                     SUMMARY_EXTRA: pa.array([extra], pa.string())})


@dataclass
class PieceIndex:
    """The driver's whole view of pass A: the piece names and one entry per id run (its
    ``ROW_ID`` range, kept rows and piece). Memory: per piece and run, never per row."""

    names: list[str]
    lo: np.ndarray
    hi: np.ndarray
    kept: np.ndarray
    piece: np.ndarray
    """Index into ``names`` of each run's piece."""
    rows: int = 0
    """Rows that reached the writer, kept or not."""

    @classmethod
    def from_summaries(cls, summaries: Iterator[dict[str, Any]],
                       on_summary: Callable[[dict[str, Any]], None] | None) -> PieceIndex:
        """Builds the index from :func:`write_piece`'s summary rows as they stream in, handing
        each caller summary to ``on_summary``."""
        names: list[str] = []
        chunks: list[np.ndarray] = [np.zeros((4, 0), dtype=np.int64)]
        runs: list[list[int]] = [[], [], [], []]
        rows = 0
        for row in summaries:
            rows += int(row["rows"])
            if row[SUMMARY_EXTRA] and on_summary is not None:
                on_summary(json.loads(row[SUMMARY_EXTRA]))
            if row["piece"]:
                for column, values in zip(runs, (row["seg_lo"], row["seg_hi"], row["seg_kept"],
                                                 [len(names)] * len(row["seg_lo"]))):
                    column.extend(values)
                names.append(row["piece"])
            if len(runs[0]) >= 1 << 16:         # packed as int64 arrays, not Python ints
                chunks.append(np.array(runs, dtype=np.int64))
                runs = [[], [], [], []]
        lo, hi, kept, piece = np.concatenate([*chunks, np.array(runs, dtype=np.int64)
                                              .reshape(4, -1)], axis=1)
        return cls(names, lo, hi, kept, piece, rows)


@dataclass(frozen=True)
class Part:
    """The kept rows at positions ``[start, stop)`` (in ``ROW_ID`` order) of a cluster of id
    runs: ``size`` kept rows with ids in ``[lo, hi]``, held by ``pieces``."""

    lo: int
    hi: int
    start: int
    stop: int
    size: int
    pieces: tuple[str, ...]


def _clusters(index: PieceIndex) -> tuple[np.ndarray, ...]:
    """Runs sorted by ``lo`` and merged where their id ranges overlap: (first run of each
    cluster, lo, hi, kept, piece of each sorted run). Disjoint runs are clusters of one."""
    order = np.lexsort((index.hi, index.lo))
    lo, hi, kept, piece = index.lo[order], index.hi[order], index.kept[order], index.piece[order]
    reach = np.maximum.accumulate(hi)
    starts = np.flatnonzero(np.r_[True, lo[1:] > reach[:-1]])
    return (starts, lo[starts], np.maximum.reduceat(hi, starts),
            np.add.reduceat(kept, starts), piece)


def plan_shards(index: PieceIndex, shard_size: int) -> Iterator[tuple[int, int, list[Part]]]:
    """``(shard, rows, parts)`` for every output shard: kept row ``i`` in ``ROW_ID`` order goes
    to shard ``i // shard_size``, and the parts say which pieces hold it."""
    if not len(index.lo):
        return
    starts, c_lo, c_hi, c_kept, piece = _clusters(index)
    ends = np.r_[starts[1:], len(piece)]
    names = np.asarray(index.names, dtype=object)
    c_end = np.cumsum(c_kept)
    c_begin = c_end - c_kept
    total = int(c_end[-1])
    for shard in range(-(-total // shard_size)):
        a, b = shard * shard_size, min(total, (shard + 1) * shard_size)
        first = int(np.searchsorted(c_end, a, side="right"))
        last = int(np.searchsorted(c_begin, b, side="left"))
        parts = [Part(int(c_lo[j]), int(c_hi[j]), max(a - int(c_begin[j]), 0),
                      min(b, int(c_end[j])) - int(c_begin[j]), int(c_kept[j]),
                      tuple(dict.fromkeys(names[piece[starts[j]:ends[j]]])))
                 for j in range(first, last)]
        yield shard, b - a, parts


def _read_piece(fs: Any, root: str, name: str, columns: list[str] | None,
                ranges: list[tuple[int, int]]) -> pa.Table:
    """The rows of one piece whose ``ROW_ID`` lies in any of ``ranges`` (inclusive)."""
    filters = [[(schema.ROW_ID, ">=", lo), (schema.ROW_ID, "<=", hi)] for lo, hi in ranges]
    return pq.read_table(f"{root.rstrip('/')}/{name}", filesystem=fs, columns=columns,
                         filters=filters)


def _id_range(part: Part, fs: Any, root: str) -> tuple[int, int]:
    """The ``ROW_ID`` range of a part's rows: the cluster's own when the part is all of it,
    else found from the ids alone (8 bytes a row of the cluster, no images read)."""
    if part.start == 0 and part.stop == part.size:
        return part.lo, part.hi
    ids = np.sort(np.concatenate([
        _read_piece(fs, root, name, [schema.ROW_ID], [(part.lo, part.hi)])[schema.ROW_ID]
        .to_numpy() for name in part.pieces]))
    if len(ids) != part.size:
        raise RuntimeError(f"pieces {part.pieces} hold {len(ids)} kept rows with ROW_ID in "
                           f"[{part.lo}, {part.hi}], the index says {part.size}")
    return int(ids[part.start]), int(ids[part.stop - 1])


def assemble_shard(shard: int, rows: int, parts: list[Part], pieces_uri: str, shards_uri: str,
                   cfg: WriteConfig, image_suffix: str) -> dict[str, int]:
    """Assemble, one Ray task per shard: reads only the pieces that hold the shard's rows, keeps
    those rows, and writes the shard (skipped when it exists). Fails before writing when the
    rows are not exactly ``rows`` distinct row ids."""
    if exists(join(shards_uri, cfg.shard_name(shard))):
        return {"shard": shard, "rows": 0, "written": 0, "distinct": 0}
    fs, root = arrow_filesystem(pieces_uri)
    ranges = [_id_range(part, fs, root) for part in parts]
    names = dict.fromkeys(name for part in parts for name in part.pieces)
    tables = [t for t in (_read_piece(fs, root, n, None, ranges) for n in names) if t.num_rows]
    table = pa.concat_tables(tables, promote_options="permissive").sort_by(schema.ROW_ID)
    ids = table[schema.ROW_ID].to_numpy()
    distinct = len(np.unique(ids))
    if table.num_rows != rows or distinct != rows:
        raise RuntimeError(f"shard {shard}: {table.num_rows} rows ({distinct} distinct ROW_IDs) "
                           f"where {rows} were expected: duplicate or missing row ids")
    group = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    group[SHARD] = np.full(rows, shard, dtype=np.int64)
    out = write_shard_group(group, shards_uri, cfg, image_suffix)
    written = bool(out["written"][0])
    return {"shard": shard, "rows": rows if written else 0, "written": int(written),
            "distinct": distinct if written else 0}


def _stream_pieces(ds: ray.data.Dataset, pieces_uri: str, cfg: WriteConfig,
                   args: dict[str, Any], on_summary: Callable[[dict[str, Any]], None] | None,
                   piece_kwargs: dict[str, Any]) -> PieceIndex:
    """Pass A: runs the plan with :func:`write_piece` as its last stage; the driver reads only
    the one-row summaries."""
    summaries = ds.map_batches(write_piece, fn_kwargs={"pieces_uri": pieces_uri, **piece_kwargs},
                               batch_format="pyarrow", batch_size=cfg.piece_rows,
                               zero_copy_batch=True, **args)
    rows = (row for batch in summaries.iter_batches(batch_format="pyarrow", batch_size=None)
            for row in batch.to_pylist())
    return PieceIndex.from_summaries(rows, on_summary)


def _assemble(index: PieceIndex, pieces_uri: str, shards_uri: str, cfg: WriteConfig,
              image_suffix: str, args: dict[str, Any]) -> tuple[int, list[dict[str, int]]]:
    """One task per missing shard, a bounded number in flight; (shards, task results)."""
    import ray

    have = set(existing_shards(shards_uri))
    task = ray.remote(assemble_shard).options(**args)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    results: list[dict[str, int]] = []
    n_shards = 0
    for shard, rows, parts in plan_shards(index, cfg.shard_size):
        n_shards += 1
        if cfg.shard_name(shard) in have:
            continue
        if len(pending) >= window:
            done, pending = ray.wait(pending, num_returns=1)
            results += ray.get(done)
        pending.append(task.remote(shard, rows, parts, pieces_uri, shards_uri, cfg,
                                   image_suffix))
    return n_shards, results + ray.get(pending)


def write_shards_streamed(ds: ray.data.Dataset, shards_uri: str, cfg: WriteConfig,
                          image_suffix: str, *, keep: Keep | None = None,
                          summarize: Summarize | None = None,
                          on_summary: Callable[[dict[str, Any]], None] | None = None,
                          rejects_uri: str | None = None, reject_columns: tuple[str, ...] = (),
                          resources: dict[str, float] | None = None) -> dict[str, Any]:
    """Runs the lazy plan ``ds`` and writes its kept rows as shards, holding no rows.

    Shard ``i`` holds kept rows ``i * shard_size ...`` in ``ROW_ID`` order, byte-identical to
    :func:`encode_rows` over the same rows in one process. Pass A (in the stream): each batch
    of ``cfg.piece_rows`` rows writes its kept rows (``keep(table)`` -> bool mask; default
    ``REJECT_REASON == ""``) as a sorted piece under ``<shards_uri>/_pieces`` and sends the
    driver one summary row. Assemble: one task per shard reads only the pieces holding its rows
    (pieces may overlap in ``ROW_ID`` range) and writes it; shards already on storage are
    skipped (resume: the caller makes sure they came from the same input and settings). The
    pieces are removed at the end. Nothing passes through the object store but the batches of
    the stream itself and the summaries.

    ``summarize(table)`` runs in pass A on every batch (kept and rejected rows; a
    ``pyarrow.Table``) and returns a small JSON-able dict (counts, sums, a few examples); the
    driver hands each to ``on_summary`` as they arrive. ``rejects_uri``: the rejected rows'
    ``reject_columns`` of each batch, sorted by ``ROW_ID``, become one parquet file there
    (``rejects-<first row id>-<digest>.parquet``; a retried batch rewrites its own file).
    ``resources``: custom Ray resources of the writer's tasks (e.g. ``{"data": 0.001}``).

    Returns ``rows`` (rows that reached the writer), ``rows_out`` (kept), ``rows_rejected``,
    ``rows_written`` and ``distinct_row_ids`` (of the shards written now), ``shards``,
    ``shards_written``, ``shards_skipped``, ``pieces``, ``runs`` and ``clusters`` (id runs
    and their overlap-merged groups), ``stream_s`` (pass A) and ``assemble_s``.
    """
    pieces_uri = join(shards_uri, PIECES)
    remove(pieces_uri)                           # an interrupted run's pieces are not indexed
    extra = {"resources": resources} if resources else {}
    t0 = time.perf_counter()
    index = _stream_pieces(ds, pieces_uri, cfg, {"num_cpus": 0.25, **extra}, on_summary,
                           {"keep": keep, "summarize": summarize, "rejects_uri": rejects_uri,
                            "reject_columns": tuple(reject_columns)})
    t1 = time.perf_counter()
    n_shards, results = _assemble(index, pieces_uri, shards_uri, cfg, image_suffix,
                                  {"num_cpus": 0.5, **extra})
    remove(pieces_uri)
    kept = int(index.kept.sum())
    written = [r for r in results if r["written"]]
    return {"rows": index.rows, "rows_out": kept, "rows_rejected": index.rows - kept,
            "rows_written": sum(r["rows"] for r in written),
            "distinct_row_ids": sum(r["distinct"] for r in written), "shards": n_shards,
            "shards_written": len(written), "shards_skipped": n_shards - len(written),
            "pieces": len(index.names), "runs": len(index.lo),
            "clusters": len(_clusters(index)[0]) if len(index.lo) else 0,
            "stream_s": round(t1 - t0, 2), "assemble_s": round(time.perf_counter() - t1, 2)}




__all__ = ["PIECES", "PIECE_COLUMNS", "Part", "PieceIndex", "assemble_shard", "kept_rows",
           "plan_shards", "segments", "write_piece", "write_shards_streamed"]
