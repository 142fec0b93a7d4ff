"""Ingest on Ray Data: read webdataset shards -> decode + validate + tokenise -> train rows.

Every row is accounted for: ``rows_in == rows_accepted + rows_rejected``; rejected rows are
written to ``rejects/`` (key, text, reason) and counted by reason.

    ds = build_ingest(cfg.data, "s3://bucket/ds/train")     # lazy Ray Data plan
    result = run_ingest(cfg.data, "runs/x/data/train", rejects_uri="runs/x/rejects")
    result.train      # materialised Dataset of PIXELS, TOKENS, TOKEN_MASK, LABEL
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vlmray.data import schema
from vlmray.data.decode import DecodeSpec, prepare_rows
from vlmray.data.shards import list_shards
from vlmray.data.storage import arrow_filesystem
from vlmray.data.tokenize import Tokenizer, build_tokenizer

if TYPE_CHECKING:
    import ray.data

    from vlmray.config import DataConfig

_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
TRAIN_COLUMNS = [schema.PIXELS, schema.TOKENS, schema.TOKEN_MASK, schema.LABEL]


@functools.lru_cache(maxsize=4)
def cached_tokenizer(name: str, vocab_size: int, context_length: int) -> Tokenizer:
    """One tokenizer per worker process (the stage's setup), reused across batches."""
    return build_tokenizer(name, vocab_size=vocab_size, context_length=context_length)


def tokenizer_for(cfg: DataConfig) -> Tokenizer:
    return cached_tokenizer(cfg.tokenizer, cfg.vocab_size, cfg.context_length)


def decode_spec(cfg: DataConfig) -> DecodeSpec:
    return DecodeSpec(image_size=cfg.image_size, min_image_side=cfg.min_image_side,
                      max_text_chars=cfg.max_text_chars)


class DecodeStage:
    """Ray Data batch function: webdataset columns -> decoded, tokenised, with reject reasons.

    Holds only light, picklable settings (no torch), so Ray Data workers start fast.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.spec = decode_spec(cfg)
        self.tokenizer_args = (cfg.tokenizer, cfg.vocab_size, cfg.context_length)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = batch["__key__"]
        n = len(keys)
        image_col = next((c for c in _IMAGE_SUFFIXES if c in batch), None)
        images = batch[image_col] if image_col else [None] * n
        texts = batch["txt"] if "txt" in batch else [None] * n
        metas = batch["json"] if "json" in batch else [None] * n
        return prepare_rows(keys, images, texts, metas, self.spec,
                            cached_tokenizer(*self.tokenizer_args))


def read_shards(uri: str) -> ray.data.Dataset:
    """Raw webdataset rows (undecoded bytes) from a shard directory or file, local or s3://."""
    import ray.data

    paths = list_shards(uri)
    if not paths:
        raise FileNotFoundError(f"no .tar shards under {uri!r}")
    fs, _ = arrow_filesystem(uri)
    return ray.data.read_webdataset(paths, filesystem=fs, decoder=None)


def build_ingest(cfg: DataConfig, uri: str) -> ray.data.Dataset:
    """Lazy plan: read -> decode/validate/tokenise. Rows carry REJECT_REASON ("" = kept)."""
    stage = DecodeStage(cfg)
    return read_shards(uri).map_batches(stage, batch_format="numpy", batch_size=256)


def _select(batch: dict[str, np.ndarray], *, rejected: bool) -> dict[str, np.ndarray]:
    keep = (batch[schema.REJECT_REASON] != "") if rejected else (batch[schema.REJECT_REASON] == "")
    return {k: v[keep] for k, v in batch.items()}


def _count_reasons(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-batch reject counts (a cheap map, not a 200-partition hash shuffle)."""
    reasons, counts = np.unique(batch[schema.REJECT_REASON].astype(str), return_counts=True)
    keep = reasons != ""
    return {schema.REJECT_REASON: reasons[keep].astype(object), "n": counts[keep]}


@dataclass
class IngestResult:
    train: ray.data.Dataset
    rows_in: int
    rows_accepted: int
    rows_rejected: int
    reject_reasons: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {"rows_in": self.rows_in, "rows_accepted": self.rows_accepted,
                "rows_rejected": self.rows_rejected, "reject_reasons": dict(self.reject_reasons)}


def run_ingest(cfg: DataConfig, uri: str, *, rejects_uri: str | None = None) -> IngestResult:
    """Executes the ingest plan once, writes rejects, and returns the accepted train rows."""
    full = build_ingest(cfg, uri).materialize()
    rows_in = full.count()
    reasons: dict[str, int] = {}
    for row in full.map_batches(_count_reasons, batch_format="numpy").take_all():
        reasons[row[schema.REJECT_REASON]] = reasons.get(row[schema.REJECT_REASON], 0) + int(row["n"])
    rejected = sum(reasons.values())
    if rejects_uri and rejected:
        fs, path = arrow_filesystem(rejects_uri)
        (full.map_batches(functools.partial(_select, rejected=True), batch_format="numpy")
             .select_columns([schema.KEY, schema.TEXT, schema.REJECT_REASON])
             .write_parquet(path, filesystem=fs))
    train = (full.map_batches(functools.partial(_select, rejected=False), batch_format="numpy")
                 .select_columns(TRAIN_COLUMNS).materialize())
    accepted = train.count()
    if accepted + rejected != rows_in:
        raise RuntimeError(f"row accounting broke: {accepted} + {rejected} != {rows_in}")
    return IngestResult(train, rows_in, accepted, rejected, reasons)


__all__ = ["DecodeStage", "IngestResult", "TRAIN_COLUMNS", "build_ingest", "decode_spec",
           "read_shards", "run_ingest", "tokenizer_for"]
