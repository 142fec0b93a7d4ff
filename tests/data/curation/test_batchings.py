"""Odd shard sets never crash curation (issue 21): rows with and without ``.json`` sidecars (and
captions, images) mixed in many shard sizes and batchings, through the curation stages, the
decisions and training's decode, as Ray Data batches them, in plain Python: every block a
stage emits goes through Arrow (Ray's own conversions), blocks are concatenated into the next
stage's batches like Ray Data's batcher does, so a column with two Arrow types fails here as
it does in a job (``Unable to merge: Field meta has incompatible types: string vs float``).

    python -m pytest -q tests/data/curation/test_batchings.py
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmray.config.curation import CurationConfig
from vlmray.config.run import DataConfig
from vlmray.data import schema
from vlmray.data.curation.plan import global_stages, row_stages
from vlmray.data.curation.readers import list_inputs
from vlmray.data.curation.source import read_arrow
from vlmray.data.curation.stage import Stage
from vlmray.data.curation.twopass import (
    _LiveCompact,
    compact_columns,
    decide_all,
    decision_stages,
    write_decisions,
)
from vlmray.data.ingest import DecodeStage
from vlmray.data.shards import encode_shard

Blocks = list[pa.Table]


def _jpeg(i: int) -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(buf, "JPEG")
    return buf.getvalue()


def _sample(i: int, *, sidecar: bool, caption: bool = True, image: bool = True) -> dict:
    return {schema.KEY: f"r{i:05d}", schema.IMAGE: _jpeg(i) if image else None,
            schema.TEXT: f"{i} red circles number {i % 7}" if caption else None,
            schema.META: json.dumps({"label": i % 3}) if sidecar else None}


def _shard_set(root: Path, sizes: list[int], sidecar: Callable[[int, int], bool], *,
               caption: Callable[[int, int], bool] = lambda s, i: True) -> str:
    """Shards of ``sizes`` rows; ``sidecar(shard, row)`` / ``caption(...)``: who has one."""
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    for s, size in enumerate(sizes):
        rows = [_sample(n + i, sidecar=sidecar(s, i), caption=caption(s, i),
                        image=(n + i) % 17 != 5) for i in range(size)]
        (root / f"{s:05d}.tar").write_bytes(encode_shard(rows)[0])
        n += size
    return str(root)


SETS: dict[str, tuple[list[int], Callable[[int, int], bool]]] = {
    "one_sidecar_in_all": ([9, 30, 4, 17], lambda s, i: s == 1 and i == 3),
    "sidecars_in_first_shard_only": ([12, 12, 12], lambda s, i: s == 0),
    "sidecars_in_last_shard_only": ([5, 40, 8], lambda s, i: s == 2),
    "runs_with_and_without": ([50, 23], lambda s, i: (i // 7) % 2 == 0),
    "no_sidecars": ([11, 6], lambda s, i: False),
    "every_sidecar": ([7, 7], lambda s, i: True),
}


def _batches(blocks: Blocks, batch_size: int | None) -> Iterator[pa.Table]:
    """Ray Data's batcher: whole blocks (``None``), or ``batch_size`` rows taken from the
    blocks in order, a batch within one block being a slice of it (its own types) and one
    across blocks the concatenation of their slices (which fails on string vs float)."""
    if batch_size is None:
        yield from blocks
        return
    parts: Blocks = []
    have = 0
    for block in blocks:
        start = 0
        while start < block.num_rows:
            take = min(batch_size - have, block.num_rows - start)
            parts.append(block.slice(start, take))
            have, start = have + take, start + take
            if have == batch_size:
                yield _concat(parts)
                parts, have = [], 0
    if parts:
        yield _concat(parts)


def _concat(parts: Blocks) -> pa.Table:
    return parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="default")


def _numpy_udf(fn: Callable[[dict], dict]) -> Callable[[pa.Table], pa.Table]:
    """A ``batch_format="numpy"`` map_batches UDF as Ray Data runs it: Ray's NumPy view of
    the block in, Ray's block of the returned batch out."""
    from ray.data.block import BlockAccessor

    def run(table: pa.Table) -> pa.Table:
        batch = BlockAccessor.for_block(table).to_batch_format("numpy")
        return BlockAccessor.batch_to_block(fn(batch))
    return run


def _run(blocks: Blocks, fn: Callable[[pa.Table], pa.Table],
         batch_size: int | None) -> Blocks:
    return [fn(b) for b in _batches(blocks, batch_size)]


def _curate(uri: str, tmp: Path, block_rows: int, *, numpy_stages: bool = False) -> Blocks:
    """read -> text -> image -> [staging as parquet] -> dedup decisions -> FileDecisions."""
    files = list_inputs(uri)
    blocks = [t for i, (u, fmt) in enumerate(files)
              for t in read_arrow(u, i, fmt, None, block_rows=block_rows)]
    cur = CurationConfig()

    def stage_fn(stage: Stage) -> Callable[[pa.Table], pa.Table]:
        return _numpy_udf(stage) if numpy_stages else stage.on_block

    for stage in row_stages(cur):
        blocks = _run(blocks, stage_fn(stage), stage.resources.batch_size)
    staged = tmp / "staged"                    # stage_rows: one parquet file per block
    staged.mkdir()
    for i, b in enumerate(blocks):
        pq.write_table(b, staged / f"{i:05d}.parquet")
    blocks = [pq.read_table(f) for f in sorted(staged.glob("*.parquet"))]
    globals_ = global_stages(cur)
    compact = _run(blocks, _numpy_udf(_LiveCompact(compact_columns(globals_))), 4096)
    table = _concat(compact)
    table = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    for name, decisions in decide_all(table, globals_):
        write_decisions(str(tmp / "decisions"), name, decisions)
    for stage in decision_stages(str(tmp / "decisions"), globals_):
        blocks = _run(blocks, stage_fn(stage), stage.resources.batch_size)
    return blocks


def _one_type_per_column(blocks: Blocks) -> pa.Table:
    types: dict[str, set[str]] = {}
    for b in blocks:
        for f in b.schema:
            types.setdefault(f.name, set()).add(str(f.type))
    mixed = {c: t for c, t in types.items() if len(t - {"null"}) > 1 or "float" in str(t)
             and c in (schema.META, schema.TEXT, schema.IMAGE, schema.KEY)}
    assert not mixed, mixed
    return _concat(blocks)


@pytest.mark.parametrize("block_rows", [1, 3, 8, 256])
@pytest.mark.parametrize("name", sorted(SETS))
def test_mixed_sidecars_through_curation_and_training_decode(tmp_path: Path, name: str,
                                                             block_rows: int) -> None:
    sizes, sidecar = SETS[name]
    uri = _shard_set(tmp_path / "in", sizes, sidecar,
                     caption=lambda s, i: not (s == 0 and i < 4))   # a run without captions
    blocks = _curate(uri, tmp_path, block_rows)
    out = _one_type_per_column(blocks)
    assert out.num_rows == sum(sizes)                               # every row, once
    assert sorted(out[schema.ROW_ID].to_pylist()) == sorted(set(out[schema.ROW_ID].to_pylist()))
    assert out.schema.field(schema.META).type == pa.string()
    reasons = out[schema.REJECT_REASON].to_pylist()
    assert reasons.count("missing_text") == min(4, sizes[0])
    assert "missing_image" in reasons and reasons.count("") > sum(sizes) // 2, reasons
    meta = out[schema.META].to_pylist()
    assert all(m is None or json.loads(m)["label"] in (0, 1, 2) for m in meta)
    assert sum(m is not None for m in meta) == sum(
        sidecar(s, i) for s, size in enumerate(sizes) for i in range(size))
    # training's decode (a numpy map_batches) over the curated blocks, 256 rows a batch
    decoded = _run(blocks, _numpy_udf(DecodeStage(DataConfig())), 256)
    final = _one_type_per_column(decoded)
    assert final.num_rows == out.num_rows
    assert final[schema.REJECT_REASON].to_pylist() == reasons


def test_the_numpy_path_reproduces_the_clash(tmp_path: Path) -> None:
    """The harness is faithful: stages on Ray's NumPy batches (as before issue 21) hit the
    job's error on a shard set where one block has no sidecar at all."""
    sizes, sidecar = SETS["sidecars_in_first_shard_only"]
    uri = _shard_set(tmp_path / "in", sizes, sidecar)
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError), match="meta"):
        _one_type_per_column(_curate(uri, tmp_path, 8, numpy_stages=True))


@pytest.mark.parametrize("block_rows", [1, 5, 256])
def test_mixed_sidecars_through_training_ingest_without_curation(tmp_path: Path,
                                                                 block_rows: int) -> None:
    sizes, sidecar = SETS["one_sidecar_in_all"]
    uri = _shard_set(tmp_path / "in", sizes, sidecar, caption=lambda s, i: i % 9 != 2)
    blocks = [t for i, (u, fmt) in enumerate(list_inputs(uri))
              for t in read_arrow(u, i, fmt, None, block_rows=block_rows)]
    assert {str(b.schema.field(schema.META).type) for b in blocks} == {"string"}
    decoded = _one_type_per_column(_run(blocks, _numpy_udf(DecodeStage(DataConfig())), 256))
    assert decoded.num_rows == sum(sizes)
    labels = decoded[schema.LABEL].to_pylist()
    assert sum(label >= 0 for label in labels) == 1                  # the one sidecar
