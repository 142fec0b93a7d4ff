"""Reading one training worker's lane (:mod:`vlmray.data.order`) as a Ray Data plan whose rows
come out in the lane's order.

A read task per lane item: the unit's rows in the epoch's permuted order, from the item's
position on (rows before it are never read: a tar is entered at the unit's byte offset and
only the members of wanted rows are extracted; a parquet file reads only the row groups that
hold wanted rows), each row tagged ``LANE_POS = item << 32 | position``. The plan runs with
``preserve_order``, so whatever stages follow (curation, rewrite, decode), the worker receives
its rows in that order and knows, from the last row it trained on, where its lane stands.

Inputs are webdataset tars and parquet tables (:mod:`vlmray.data.curation.readers`), or the
parquet rows a URL list was staged to (``fmt="staged"``: every column kept, ``ROW_ID``
included, so curation decisions still find their rows).

    ds = read_lane(files, units, cursor.remaining(rank, units), seed=0, epoch=3)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from vlmray.config.inputs import ReadConfig
from vlmray.data import schema
from vlmray.data.curation.readers import ARROW_SCHEMA, COLUMNS, READ_CPUS
from vlmray.data.curation.row_ranges import FileIndex, index_file, parquet_rows, read_rows
from vlmray.data.curation.source import BLOCK_ROWS
from vlmray.data.order import POS_BITS, Item, Unit, unit_rows_order
from vlmray.data.placement import apply_budget, remote_args
from vlmray.data.storage import arrow_filesystem

if TYPE_CHECKING:
    import ray.data

    from vlmray.config.data import PlacementConfig

LANE_POS = schema.LANE_POS
STAGED = "staged"
"""The format of rows a URL list was staged to (parquet with every column)."""
_STAGED_SKIP = (LANE_POS,)


def index_one(uri: str, fmt: str, unit_rows: int) -> FileIndex:
    """A file's row count (and tar unit offsets); staged rows: the parquet metadata."""
    if fmt == STAGED:
        afs, path = arrow_filesystem(uri)
        return FileIndex(rows=pq.ParquetFile(afs.open_input_file(path)).metadata.num_rows)
    return index_file(uri, fmt, unit_rows, ReadConfig())


def index_inputs(files: Sequence[tuple[str, str]], unit_rows: int,
                 placement: PlacementConfig | None = None) -> list[FileIndex]:
    """Every file's :class:`FileIndex`, one Ray task per file (in parallel; tars are scanned by
    their headers only, parquet by its footer)."""
    import ray


    task = ray.remote(index_one).options(**remote_args(placement, 0.25))
    return ray.get([task.remote(uri, fmt, unit_rows) for uri, fmt in files])


def _staged_rows(uri: str, select: np.ndarray) -> pa.Table:
    """Rows ``select`` (in that order) of a staged parquet file, reading only their row
    groups."""
    afs, path = arrow_filesystem(uri)
    f = pq.ParquetFile(afs.open_input_file(path))
    table = parquet_rows(f, select)
    return table.drop_columns([c for c in _STAGED_SKIP if c in table.column_names])


def read_item(files: Sequence[tuple[str, str]], units: Sequence[Unit], index: int, item: Item,
              *, seed: int, epoch: int, cfg: ReadConfig | None = None,
              block_rows: int = BLOCK_ROWS) -> Iterator[pa.Table]:
    """Lane item ``index`` (``item``): its unit's rows from position ``item.skip`` of the
    epoch's order, as Arrow tables of at most ``block_rows`` rows with ``LANE_POS``."""
    unit = units[item.unit]
    order = unit_rows_order(unit, item.unit, seed, epoch)
    select = order[item.skip:]
    pos = (np.int64(index) << POS_BITS) | np.arange(item.skip, unit.rows, dtype=np.int64)
    uri, fmt = files[unit.file]
    if fmt == STAGED:
        table = _staged_rows(uri, select) if len(select) else None
        if table is None:
            return
        table = table.append_column(LANE_POS, pa.array(pos, type=pa.int64()))
        for start in range(0, table.num_rows, block_rows):
            yield table.slice(start, block_rows)
        return
    batch = read_rows(uri, unit.file, fmt, select, cfg=cfg, offset=unit.offset,
                      start=unit.at)
    out_schema = ARROW_SCHEMA.append(pa.field(LANE_POS, pa.int64()))
    for start in range(0, len(select), block_rows):
        cols = {c: list(batch[c][start:start + block_rows]) for c in COLUMNS}
        cols[LANE_POS] = pos[start:start + block_rows]
        yield pa.Table.from_pydict(cols, schema=out_schema)


class LaneItems(Datasource):
    """A lane's items, a read task each, in lane order."""

    def __init__(self, files: Sequence[tuple[str, str]], units: Sequence[Unit],
                 items: Sequence[tuple[int, Item]], *, seed: int, epoch: int,
                 cfg: ReadConfig | None = None) -> None:
        self.files, self.units, self.items = list(files), units, list(items)
        self.seed, self.epoch, self.cfg = seed, epoch, cfg

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: object = None) -> list[ReadTask]:
        tasks = []
        for index, item in self.items:
            unit = self.units[item.unit]
            meta = BlockMetadata(num_rows=unit.rows - item.skip, size_bytes=None,
                                 exec_stats=None, input_files=(self.files[unit.file][0],))
            tasks.append(ReadTask(
                lambda i=index, it=item: read_item(self.files, self.units, i, it,
                                                   seed=self.seed, epoch=self.epoch,
                                                   cfg=self.cfg),
                meta, per_task_row_limit=per_task_row_limit))
        return tasks


def read_lane(files: Sequence[tuple[str, str]], units: Sequence[Unit],
              items: Sequence[tuple[int, Item]], *, seed: int, epoch: int,
              placement: PlacementConfig | None = None,
              cfg: ReadConfig | None = None) -> ray.data.Dataset:
    """The lazy plan of a lane's rows, in lane order (``preserve_order`` on its context), with
    the read's placement and budget (:func:`vlmray.data.placement.apply_budget`)."""
    import ray.data


    if not items:
        raise ValueError("a lane with no items left: nothing to read")
    kwargs: dict[str, Any] = {"override_num_blocks": len(items)}
    if placement is not None:
        kwargs.update(concurrency=placement.read_concurrency or None,
                      **remote_args(placement, READ_CPUS))
    ds = ray.data.read_datasource(LaneItems(files, units, items, seed=seed, epoch=epoch,
                                            cfg=cfg), **kwargs)
    apply_budget(placement, ds.context)
    ds.context.execution_options.preserve_order = True
    return ds


__all__ = ["LANE_POS", "STAGED", "LaneItems", "index_inputs", "index_one", "read_item",
           "read_lane"]
