"""Reading a lane item (vlmray.data.lanes.read_item) in plain Python: a unit's rows in the
epoch's permuted order from a cursor inside it — inside a tar's member list (entered at the
unit's byte offset), inside a parquet row group, inside staged rows — with the values
``read_file`` gives and ``LANE_POS`` naming each row's place in the lane."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmray.config.data import SyntheticConfig
from vlmray.data import schema
from vlmray.data.curation.readers import COLUMNS, list_inputs, read_file
from vlmray.data.lanes import STAGED, index_one, read_item
from vlmray.data.order import POS_BITS, Item, plan_units, unit_rows_order
from vlmray.data.synthetic import write_synthetic


def _rows(tables: list[pa.Table]) -> dict[str, list]:
    table = pa.concat_tables(tables)
    return {c: table.column(c).to_pylist() for c in table.column_names}


def _check_item(files, units, lane_index: int, item: Item, *, seed=3, epoch=1) -> dict:
    got = _rows(list(read_item(files, units, lane_index, item, seed=seed, epoch=epoch,
                               block_rows=7)))
    u = units[item.unit]
    order = unit_rows_order(u, item.unit, seed, epoch)[item.skip:]
    assert got[schema.LANE_POS] == [(lane_index << POS_BITS) | p
                                    for p in range(item.skip, u.rows)]
    assert [r & 0xFFFFFFFF for r in got[schema.ROW_ID]] == order.tolist()
    return got


def test_a_cursor_inside_a_tar_unit(tmp_path: Path) -> None:
    write_synthetic(SyntheticConfig(num_train=90, num_eval=4, shard_size=45), str(tmp_path))
    files = list_inputs(str(tmp_path / "train"))
    index = [index_one(uri, fmt, 20) for uri, fmt in files]
    assert [ix.rows for ix in index] == [45, 45] and len(index[1].offsets) == 3
    units = plan_units(index, 20)
    u = 4                                          # file 1, rows 20..40: entered at its offset
    assert (units[u].file, units[u].start, units[u].offset) == (1, 20, index[1].offsets[1])
    got = _check_item(files, units, 5, Item(u, skip=13))
    whole = read_file(files[1][0], 1, files[1][1])
    rows = [r & 0xFFFFFFFF for r in got[schema.ROW_ID]]
    for c in COLUMNS:
        assert got[c] == [whole[c][r] for r in rows], c


def test_a_unit_between_indexed_rows(tmp_path: Path) -> None:
    write_synthetic(SyntheticConfig(num_train=45, num_eval=4, shard_size=45), str(tmp_path))
    files = list_inputs(str(tmp_path / "train"))
    units = plan_units([index_one(files[0][0], files[0][1], 20)], 10, indexed_every=20)
    assert (units[3].start, units[3].at) == (30, 20) and units[3].offset is not None
    got = _check_item(files, units, 0, Item(3, skip=4))
    whole = read_file(files[0][0], 0, files[0][1])
    assert got[schema.KEY] == [whole[schema.KEY][r & 0xFFFFFFFF] for r in got[schema.ROW_ID]]


def test_a_cursor_inside_a_parquet_row_group(tmp_path: Path) -> None:
    n = 60
    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"key": [f"k{i:03d}" for i in range(n)],
                             "image": [bytes([i]) * 9 for i in range(n)],
                             "caption": [f"caption {i}" for i in range(n)]}),
                   path, row_group_size=20)
    files = [(str(path), "parquet")]
    units = plan_units([index_one(str(path), "parquet", 25)], 25)
    got = _check_item(files, units, 0, Item(1, skip=7))        # rows 25..50, from the 8th
    assert got[schema.KEY] == [f"k{r & 0xFFFFFFFF:03d}" for r in got[schema.ROW_ID]]
    assert got[schema.IMAGE] == [bytes([r & 0xFF]) * 9 for r in got[schema.ROW_ID]]


def test_staged_rows_keep_their_row_ids(tmp_path: Path) -> None:
    n = 30
    path = tmp_path / "staged.parquet"
    ids = [(7 << 32) | (100 + i) for i in range(n)]        # the URL list's own row ids
    pq.write_table(pa.table({schema.ROW_ID: pa.array(ids, pa.int64()),
                             schema.KEY: [f"s{i}" for i in range(n)],
                             schema.REJECT_REASON: [""] * n}), path, row_group_size=8)
    files = [(str(path), STAGED)]
    units = plan_units([index_one(str(path), STAGED, 16)], 16)
    item = Item(1, skip=5)
    got = _rows(list(read_item(files, units, 2, item, seed=0, epoch=0)))
    order = unit_rows_order(units[1], 1, 0, 0)[5:]
    assert got[schema.ROW_ID] == [ids[r] for r in order]
    assert got[schema.KEY] == [f"s{r}" for r in order]
    assert got[schema.LANE_POS] == [(2 << POS_BITS) | p for p in range(5, units[1].rows)]


def test_a_finished_unit_reads_nothing(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "image": [b"x", b"y"]}), path)
    files = [(str(path), "parquet")]
    units = plan_units([index_one(str(path), "parquet", 4)], 4)
    assert list(read_item(files, units, 0, Item(0, skip=2), seed=0, epoch=0)) == []


@pytest.mark.parametrize("epoch", [0, 1])
def test_the_order_within_a_unit_is_the_epochs(tmp_path: Path, epoch: int) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(50)],
                             "image": [b"x"] * 50}), path)
    files = [(str(path), "parquet")]
    units = plan_units([index_one(str(path), "parquet", 50)], 50)
    got = _rows(list(read_item(files, units, 0, Item(0), seed=9, epoch=epoch)))
    assert sorted(r & 0xFFFFFFFF for r in got[schema.ROW_ID]) == list(range(50))
    assert np.array_equal([r & 0xFFFFFFFF for r in got[schema.ROW_ID]],
                          unit_rows_order(units[0], 0, 9, epoch))


def test_each_lane_gets_its_share_of_the_data_budget() -> None:
    from vlmray.config.data import PlacementConfig
    from vlmray.pipelines.lanes import lane_share

    p = PlacementConfig(object_store_bytes=1 << 30, cpu_budget=6.0, target_block_bytes=8 << 20)
    share = lane_share(p, 4)
    assert (share.object_store_bytes, share.cpu_budget) == (1 << 28, 1.5)
    assert lane_share(p, 1) is p and lane_share(PlacementConfig(), 8) == PlacementConfig()
    assert lane_share(p, 1000).object_store_bytes == 2 * (8 << 20)   # two blocks at least
