"""Attaching what a row's neighbours carry: :class:`AttachNeighbours` reads each row's
``NEIGHBOURS`` (from :class:`~vlmray.retrieval.search.SearchStage`) and adds RA-CLIP's
reference embeddings (``REF_IMAGE_EMBEDS`` / ``REF_TEXT_EMBEDS`` / ``REF_MASK``) or DeCLIP's
neighbour caption (``NN_TEXT``) from the embedding table the index was built from.

    ds = apply_stage(ds, AttachNeighbours(AttachConfig(table="s3://bucket/embeds", k=8)))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmray.data import schema
from vlmray.data.curation.stage import Batch, Resources, StageOutput, as_str_column, num_rows
from vlmray.data.storage import filesystem
from vlmray.retrieval.search import (
    QUERY_COLUMNS,
    ShipsLight,
    as_list,
    check_counts,
    object_column,
    typed_lists,
)

_REFS = {schema.IMAGE_EMBED: schema.REF_IMAGE_EMBEDS, schema.TEXT_EMBED: schema.REF_TEXT_EMBEDS}


@dataclass(kw_only=True)
class AttachConfig:
    """What :class:`AttachNeighbours` adds to each row from its ``NEIGHBOURS``."""

    table: str
    """Embedding shards: a directory of ``part-*.parquet`` (or one parquet file), local or
    s3://, with ``key``, ``text`` and ``image_embed`` and/or ``text_embed``."""
    k: int = 8
    """Reference slots per row: ``REF_*`` have ``k`` rows, padded with zeros (mask 0)."""
    references: bool = True
    """Write ``REF_IMAGE_EMBEDS`` / ``REF_TEXT_EMBEDS`` (those the table has) and ``REF_MASK``."""
    neighbour_text: bool = False
    """Write ``NN_TEXT``: the first neighbour's caption, else the row's own ``TEXT``."""
    batch_size: int = 256
    """Rows per batch."""
    actors: int = 1
    """Actors in the pool; each loads the table once."""
    num_cpus: float = 1.0
    """CPUs reserved per actor."""

    def __post_init__(self) -> None:
        if not self.table:
            raise ValueError("AttachConfig.table must name the embedding shards")
        if not (self.references or self.neighbour_text):
            raise ValueError("AttachConfig: nothing to attach (references and neighbour_text "
                             "are both False)")
        check_counts(self)


@dataclass
class EmbeddingTable:
    """Embedding shards in memory: row of each key, embeddings (N, D) float32, captions."""

    rows: dict[str, int]
    embeds: dict[str, np.ndarray]
    texts: np.ndarray


def load_embedding_table(uri: str) -> EmbeddingTable:
    """Reads ``part-*.parquet`` under ``uri`` (sorted), or the one file ``uri`` names."""
    fs, path = filesystem(uri)
    files = [path] if path.endswith(".parquet") else sorted(fs.glob(f"{path}/part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no part-*.parquet under {uri}")
    table = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])
    keys = table.column(schema.KEY).to_pylist()
    embeds = {col: _matrix(table.column(col)) for col in QUERY_COLUMNS
              if col in table.column_names}
    texts = table.column(schema.TEXT).to_pylist()
    return EmbeddingTable(rows={k: i for i, k in enumerate(keys)}, embeds=embeds,
                          texts=np.array(["" if t is None else t for t in texts], dtype=object))


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """(N, D) float32 from a (fixed-size) list<float> column."""
    arr = column.combine_chunks()
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(arr), -1 if len(arr) else 0)


class AttachNeighbours(ShipsLight):
    """Maps each row's ``NEIGHBOURS`` to fixed-shape reference tensors and/or ``NN_TEXT``.

    Per row: ``REF_IMAGE_EMBEDS`` / ``REF_TEXT_EMBEDS`` float32 (k, D) and ``REF_MASK``
    float32 (k,), real neighbours first (keys missing from the table are skipped), zeros with
    mask 0 after them. Rows rejected earlier get all-zero references and an empty ``NN_TEXT``.
    Each actor holds the whole embedding table in memory.
    """

    name: ClassVar[str] = "attach_neighbours"
    _heavy: ClassVar[str] = "_table"

    def __init__(self, cfg: AttachConfig) -> None:
        self.cfg = cfg
        self.resources = Resources(num_cpus=cfg.num_cpus, actors=cfg.actors,
                                   batch_size=cfg.batch_size)
        self._table: EmbeddingTable | None = None

    def setup(self) -> None:
        self._table = load_embedding_table(self.cfg.table)
        if self.cfg.references and not self._table.embeds:
            raise ValueError(f"AttachConfig.references: {self.cfg.table} has neither "
                             f"{schema.IMAGE_EMBED} nor {schema.TEXT_EMBED}")

    def __call__(self, batch: Batch) -> Batch:
        if not self._ready:
            self.setup()
            self._ready = True
        batch, n = dict(batch), num_rows(batch)
        for col, shape in self._shapes().items():                  # fixed shapes on every row
            if col not in batch:
                batch[col] = np.zeros((n, *shape), dtype=np.float32)
        if self.cfg.neighbour_text and schema.NN_TEXT not in batch:
            batch[schema.NN_TEXT] = np.full(n, "", dtype=object)
        return typed_lists(super().__call__(batch))

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        if not self.cfg.references or self._table is None:
            return {}
        shapes = {_REFS[c]: (self.cfg.k, m.shape[1]) for c, m in self._table.embeds.items()}
        return {**shapes, schema.REF_MASK: (self.cfg.k,)}

    def process(self, batch: Batch) -> StageOutput:
        assert self._table is not None
        table, k = self._table, self.cfg.k
        idx = np.full((num_rows(batch), k), -1, dtype=np.int64)            # (B, k)
        for i, keys in enumerate(batch[schema.NEIGHBOURS]):
            found = [table.rows[x] for x in as_list(keys) if x in table.rows]
            idx[i, :min(len(found), k)] = found[:k]
        real = idx >= 0
        columns: dict[str, np.ndarray] = {}
        if self.cfg.references:
            for col, matrix in table.embeds.items():
                refs = matrix[np.maximum(idx, 0)] * real[..., None]         # (B, k, D)
                columns[_REFS[col]] = refs.astype(np.float32)
            columns[schema.REF_MASK] = real.astype(np.float32)               # (B, k)
        if self.cfg.neighbour_text:
            own = as_str_column(batch.get(schema.TEXT, np.full(len(idx), "", dtype=object)))
            columns[schema.NN_TEXT] = object_column(
                [table.texts[r[0]] if r[0] >= 0 else t or "" for r, t in zip(idx, own)])
        return StageOutput(columns=columns)


__all__ = ["AttachConfig", "AttachNeighbours", "EmbeddingTable", "load_embedding_table"]
