"""Writers of curated rows: fixed-size webdataset or parquet shards, deterministic, resumable.

Row ``i`` of the kept rows, in input order (``ROW_ID``), goes to shard ``i // shard_size`` at
position ``i % shard_size``, so the same input and settings give byte-identical shards. A shard
is written whole or not at all (temp name + rename, or one object PUT); a shard that already
exists is skipped, which is how an interrupted job resumes.

The JSON sidecar of each sample keeps the input's own fields (e.g. ``label``) and adds the
curation signals: ``url``, ``width``, ``height``, ``sha256``, ``phash``, ``clip_score``,
``repairs``, ``source``.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmray.data import schema
from vlmray.data.curation.stage import Batch, num_rows
from vlmray.data.shards import encode_shard
from vlmray.data.storage import filesystem, join, write_bytes_atomic

if TYPE_CHECKING:
    import ray.data

SHARD = "shard"                         # the output shard index a kept row goes to
_SIGNALS = (schema.URL, schema.WIDTH, schema.HEIGHT, schema.SHA256, schema.PHASH,
            schema.CLIP_SCORE, schema.REPAIRS, schema.SOURCE)


@dataclass(kw_only=True)
class WriteConfig:
    format: Literal["webdataset", "parquet"] = "webdataset"
    """Output shards: ``webdataset`` (``.tar`` of ``{key}.jpg/.txt/.json``, as img2dataset
    writes) or ``parquet`` (columns key, image, text, meta)."""
    shard_size: int = 1000
    """Rows per output shard (the last one may hold fewer)."""
    prefix: str = "part"
    """Shard file names: ``<prefix>-00000.tar``."""

    def __post_init__(self) -> None:
        if self.format not in ("webdataset", "parquet"):
            raise ValueError(f"write.format {self.format!r}: valid: 'webdataset', 'parquet'")
        if self.shard_size <= 0:
            raise ValueError(f"write.shard_size must be > 0, got {self.shard_size}")
        if not self.prefix or "/" in self.prefix:
            raise ValueError(f"write.prefix {self.prefix!r} must be non-empty, without '/'")

    def shard_name(self, index: int) -> str:
        ext = "tar" if self.format == "webdataset" else "parquet"
        return f"{self.prefix}-{index:05d}.{ext}"


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else round(float(value), 6)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def sidecar(batch: Batch, i: int) -> str:
    """The output JSON sidecar of row ``i``: the input's fields plus the curation signals."""
    raw = batch[schema.META][i] if schema.META in batch else None
    try:
        doc = json.loads(raw) if raw else {}
        doc = doc if isinstance(doc, dict) else {"meta": doc}
    except (TypeError, ValueError):
        doc = {"meta": _plain(raw)}
    for col in _SIGNALS:
        if col in batch:
            value = _plain(batch[col][i])
            if col == schema.PHASH and value is not None:
                value = f"{int(value) & (2**64 - 1):016x}"
            if value not in (None, ""):
                doc[col] = value
    doc.update({col: _rewrite_value(batch[col][i]) for col in _REWRITES if col in batch})
    return json.dumps(doc, sort_keys=True, ensure_ascii=False)


# Rewritten / synthetic captions (vlmray.rewrite.stage): in the sidecar, and parquet columns.
_REWRITES = {schema.TEXTS_AUG: pa.list_(pa.string()),
             schema.REWRITE_FALLBACKS: pa.list_(pa.string()),
             schema.SYNTHETIC_CAPTION: pa.string(), schema.CAPTION_FALLBACK: pa.string()}


def _rewrite_value(value: Any) -> Any:
    """A str, or a list of str (from a list, tuple or NumPy array), as JSON wants it."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_text(v) for v in value]
    return "" if value is None else _text(value)


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def encode_rows(batch: Batch, cfg: WriteConfig, image_suffix: str) -> bytes:
    """One shard's bytes from rows already in output order."""
    n = num_rows(batch)
    metas = [sidecar(batch, i) for i in range(n)]
    if cfg.format == "webdataset":
        samples = ({schema.KEY: batch[schema.KEY][i], schema.IMAGE: batch[schema.IMAGE][i],
                    schema.TEXT: _text(batch[schema.TEXT][i]), schema.META: metas[i]}
                   for i in range(n))
        return encode_shard(samples, image_suffix=image_suffix)[0]
    table = pa.table({
        schema.KEY: pa.array([str(k) for k in batch[schema.KEY]], pa.string()),
        schema.IMAGE: pa.array(list(batch[schema.IMAGE]), pa.binary()),
        schema.TEXT: pa.array([_text(t) for t in batch[schema.TEXT]], pa.string()),
        schema.META: pa.array(metas, pa.string()),
        **{col: pa.array([_rewrite_value(v) for v in batch[col]], kind)
           for col, kind in _REWRITES.items() if col in batch},
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_shard_group(group: Batch, shards_uri: str, cfg: WriteConfig,
                      image_suffix: str) -> Batch:
    """``map_groups`` function: all rows of one output shard -> that shard on storage (skipped
    when it already exists)."""
    order = np.argsort(np.asarray(group[schema.ROW_ID], dtype=np.int64), kind="stable")
    group = {k: np.asarray(v)[order] for k, v in group.items()}
    index = int(group[SHARD][0])
    uri = join(shards_uri, cfg.shard_name(index))
    fs, path = filesystem(uri)
    written = not fs.exists(path)
    if written:
        write_bytes_atomic(uri, encode_rows(group, cfg, image_suffix))
    return {SHARD: np.array([index]), "rows": np.array([num_rows(group)]),
            "written": np.array([written])}


def _row_range(table: pa.Table) -> tuple[int, int]:
    """(min, max) ``ROW_ID`` of a block; (1, 0) when empty."""
    if table.num_rows == 0:
        return 1, 0
    ids = table[schema.ROW_ID].to_numpy()
    return int(ids.min()), int(ids.max())


def _shard_from_blocks(shard: int, lo: int, hi: int, shards_uri: str, cfg: WriteConfig,
                       image_suffix: str, *blocks: pa.Table) -> Batch:
    """The kept rows with ``lo <= ROW_ID <= hi`` from the blocks that hold them -> one shard."""
    table = pa.concat_tables([b for b in blocks if b.num_rows], promote_options="permissive")
    ids = table[schema.ROW_ID].to_numpy()
    keep = ((table[schema.REJECT_REASON].to_numpy(zero_copy_only=False) == "")
            & (ids >= lo) & (ids <= hi))
    table = table.filter(pa.array(keep))
    group = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    group[SHARD] = np.full(table.num_rows, shard, dtype=np.int64)
    if not table.num_rows:
        raise RuntimeError(f"shard {shard}: no kept rows with ROW_ID in [{lo}, {hi}]")
    return {k: v[0].item() for k, v in write_shard_group(group, shards_uri, cfg,
                                                          image_suffix).items()}


def _rejected_rows(columns: list[str], table: pa.Table) -> pa.Table:
    rejected = pa.array(table[schema.REJECT_REASON].to_numpy(zero_copy_only=False) != "")
    return table.filter(rejected).select(columns)


def collect_rejects(ds: ray.data.Dataset, columns: list[str]) -> pa.Table:
    """The rejected rows' ``columns`` of a materialised dataset (one small task per block, no
    images move), sorted by ``ROW_ID``."""
    import ray

    task = ray.remote(_rejected_rows).options(num_cpus=0.25)
    tables = [t for t in ray.get([task.remote(columns, r) for r in ds.to_arrow_refs()])
              if t.num_rows]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables, promote_options="permissive").sort_by(schema.ROW_ID)


def write_shards(ds: ray.data.Dataset, kept_row_ids: np.ndarray, todo: list[int],
                 shards_uri: str, cfg: WriteConfig, image_suffix: str) -> list[Batch]:
    """Writes shards ``todo`` of a materialised dataset without a shuffle: shard ``i`` holds
    kept rows ``i * shard_size ...`` in ``ROW_ID`` order, so one task per shard reads only the
    blocks whose ``ROW_ID`` range overlaps the shard's."""
    import ray

    kept = np.sort(np.asarray(kept_row_ids, dtype=np.int64))
    refs = ds.to_arrow_refs()
    ranges = ray.get([ray.remote(_row_range).options(num_cpus=0.1).remote(r) for r in refs])
    task = ray.remote(_shard_from_blocks).options(num_cpus=1)
    pending = []
    for shard in todo:
        lo = int(kept[shard * cfg.shard_size])
        hi = int(kept[min(len(kept), (shard + 1) * cfg.shard_size) - 1])
        blocks = [ref for ref, (a, b) in zip(refs, ranges) if a <= hi and b >= lo]
        pending.append(task.remote(shard, lo, hi, shards_uri, cfg, image_suffix, *blocks))
    return ray.get(pending)


def existing_shards(shards_uri: str) -> list[str]:
    fs, path = filesystem(shards_uri)
    if not fs.exists(path):
        return []
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


__all__ = ["SHARD", "WriteConfig", "encode_rows",
           "collect_rejects", "existing_shards", "sidecar", "write_shard_group", "write_shards"]
