"""Writers of curated rows: fixed-size webdataset or parquet shards, deterministic, resumable.

Row ``i`` of the kept rows, in input order (``ROW_ID``), goes to shard ``i // shard_size`` at
position ``i % shard_size``, so the same input and settings give byte-identical shards. A shard
is written whole or not at all (temp name + rename, or one object PUT); a shard that already
exists is skipped, which is how an interrupted job resumes.

:mod:`vlmray.data.curation.piece_writer` writes such shards from a stream without holding
the rows.

The JSON sidecar of each sample keeps the input's own fields (e.g. ``label``) and adds the
curation signals: ``url``, ``width``, ``height``, ``sha256``, ``phash``, ``clip_score``,
``repairs``, ``source``.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmray.config.curation import WriteConfig
from vlmray.data import schema
from vlmray.data.curation.stage import Batch, num_rows
from vlmray.data.shards import encode_shard
from vlmray.data.storage import filesystem, join, write_bytes_atomic

SHARD = "shard"                         # the output shard index a kept row goes to
SIGNAL_COLUMNS = (schema.URL, schema.WIDTH, schema.HEIGHT, schema.SHA256, schema.PHASH,
            schema.CLIP_SCORE, schema.REPAIRS, schema.SOURCE)


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
    for col in SIGNAL_COLUMNS:
        if col in batch:
            value = _plain(batch[col][i])
            if col == schema.PHASH and value is not None:
                value = f"{int(value) & (2**64 - 1):016x}"
            if value not in (None, ""):
                doc[col] = value
    doc.update({col: _rewrite_value(batch[col][i]) for col in REWRITE_COLUMNS if col in batch})
    return json.dumps(doc, sort_keys=True, ensure_ascii=False)


# Rewritten / synthetic captions (vlmray.rewrite.stage): in the sidecar, and parquet columns.
REWRITE_COLUMNS = {schema.TEXTS_AUG: pa.list_(pa.string()),
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
           for col, kind in REWRITE_COLUMNS.items() if col in batch},
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_shard_group(group: Batch, shards_uri: str, cfg: WriteConfig,
                      image_suffix: str) -> Batch:
    """All rows of one output shard (any order; ``SHARD`` names it) -> that shard on storage,
    in ``ROW_ID`` order (skipped when it already exists)."""
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


def existing_shards(shards_uri: str) -> list[str]:
    fs, path = filesystem(shards_uri)
    if not fs.exists(path):
        return []
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


__all__ = ["REWRITE_COLUMNS", "SHARD", "SIGNAL_COLUMNS", "encode_rows", "existing_shards", "sidecar",
           "write_shard_group"]
