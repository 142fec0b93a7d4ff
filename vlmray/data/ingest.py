"""Ingest on Ray Data: one lazy plan from shards (webdataset or parquet, local or s3://) to
training rows, streamed: read -> [curation stages] -> [rewrite] -> [retrieval] -> decode +
validate + tokenise -> split (count, write rejects, keep the accepted rows' training columns).

Nothing holds the rows: training (or the writer) consumes the plan as a stream, every epoch,
and memory is bounded by Ray Data's settings (block size, prefetch, operator concurrency, the
object-store budget of ``data.placement``), never by the number of rows. ``data.curate``'s
whole-dataset decisions (dedup, keep-top-fraction) run in two passes over compact columns
(:mod:`vlmray.data.curation.twopass`); their pass 1 is cached under ``cache_root``.

Every row is accounted for: rows in = accepted + rejected, by reason, each input row counted
once however many epochs read it (:class:`vlmray.data.stream.StreamTally`); rejected rows are
written to ``rejects/`` once.

    train, tally = stream_ingest(cfg.data, "s3://bucket/ds/train", rejects_uri="runs/x/rejects",
                                 cache_root="runs/x/curation")       # lazy; training iterates
    result = run_ingest(cfg.data, uri)   # the in-memory cache (data.cache): small data only
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vlmray.data import schema
from vlmray.data.curation.plan import apply_row_stages, global_stages, row_stages
from vlmray.data.curation.readers import ReadConfig, list_inputs, read_inputs
from vlmray.data.curation.stage import Stage
from vlmray.data.curation.download import DownloadStage
from vlmray.data.curation.twopass import (
    decision_stages,
    fingerprint,
    global_decisions,
    inputs_fingerprint,
    read_staged,
    stage_once,
)
from vlmray.data.decode import DecodeSpec, prepare_rows
from vlmray.data.placement import PlacementConfig, remote_args
from vlmray.data.storage import join
from vlmray.data.stream import (
    FALLBACK_COLUMNS,
    SplitStage,
    StreamTally,
    count_fallbacks,
    stream_summary,
)
from vlmray.data.tokenize import Tokenizer, build_tokenizer

if TYPE_CHECKING:
    import ray.data

    from vlmray.config import DataConfig

TRAIN_COLUMNS = [schema.PIXELS, schema.TOKENS, schema.TOKEN_MASK, schema.LABEL]
REFERENCE_COLUMNS = [schema.REF_IMAGE_EMBEDS, schema.REF_TEXT_EMBEDS, schema.REF_MASK]
NN_COLUMNS = [schema.NN_TOKENS, schema.NN_TOKEN_MASK]
REGION_COLUMNS = [schema.REGION_BOXES, schema.REGION_SPANS, schema.REGION_MASK]
EXTRA_TEXT_COLUMNS = {"texts_aug": [schema.TOKENS_AUG, schema.TOKEN_MASK_AUG],
                      "synthetic_caption": [schema.SYNTHETIC_TOKENS, schema.SYNTHETIC_TOKEN_MASK]}
"""``data.extra_texts`` entry -> the token columns the decode stage adds for it."""
def train_columns(cfg: DataConfig) -> list[str]:
    """The columns training rows carry: TRAIN_COLUMNS plus what ``data.retrieval`` attaches,
    the region columns when ``data.regions > 0``, the token columns of ``data.extra_texts``,
    and the caption string when ``data.views`` derives texts or renders it."""
    extra = {"references": REFERENCE_COLUMNS, "neighbour_text": NN_COLUMNS}
    text = [schema.TEXT] if cfg.views.needs_text else []   # the views stage reads, then drops it
    regions = REGION_COLUMNS if cfg.regions > 0 else []
    texts = [c for name in cfg.extra_texts for c in EXTRA_TEXT_COLUMNS[name]]
    return TRAIN_COLUMNS + extra.get(cfg.retrieval.attach, []) + regions + texts + text


@functools.lru_cache(maxsize=4)
def cached_tokenizer(name: str, vocab_size: int, context_length: int) -> Tokenizer:
    """One tokenizer per worker process (the stage's setup), reused across batches."""
    return build_tokenizer(name, vocab_size=vocab_size, context_length=context_length)


def tokenizer_for(cfg: DataConfig) -> Tokenizer:
    return cached_tokenizer(cfg.tokenizer, cfg.vocab_size, cfg.context_length)


def decode_spec(cfg: DataConfig) -> DecodeSpec:
    return DecodeSpec(image_size=cfg.image_size, min_image_side=cfg.min_image_side,
                      max_text_chars=cfg.max_text_chars, regions=cfg.regions,
                      texts_aug=cfg.max_texts_aug if "texts_aug" in cfg.extra_texts else 0,
                      synthetic_caption="synthetic_caption" in cfg.extra_texts)


DECODE_STAGE = "decode"
DECODE_CPUS, SPLIT_CPUS = 0.5, 0.25
"""Per task. Data tasks run beside the training workers (0.5 CPU each on a CPU node) and the
actors of retrieval stages, which hold their CPUs for the whole run: whole-core tasks could
never be scheduled on a 2-core node then, and the stream would wait forever."""
_PASS_THROUGH = (schema.ROW_ID, schema.SHA256, schema.PHASH, schema.TEXT_SIG, schema.CLIP_SCORE,
                 schema.DUPLICATE_OF, *REFERENCE_COLUMNS, *FALLBACK_COLUMNS)


class DecodeStage:
    """Ray Data batch function: raw rows (KEY, IMAGE, TEXT, META) -> decoded, tokenised, with
    reject reasons. Rows an earlier curation stage rejected keep their reason and stage.
    ``data.extra_texts`` are tokenised from the rewrite prefix's TEXTS_AUG / SYNTHETIC_CAPTION
    columns when the rows have them, else from the sidecars; the prefix's fallback columns
    pass through for :func:`run_ingest`'s counts.

    Holds only light, picklable settings (no torch), so Ray Data workers start fast.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.spec = decode_spec(cfg)
        self.tokenizer_args = (cfg.tokenizer, cfg.vocab_size, cfg.context_length)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = batch[schema.KEY]
        none = [None] * len(keys)
        out = prepare_rows(keys, batch.get(schema.IMAGE, none), batch.get(schema.TEXT, none),
                           batch.get(schema.META, none), self.spec,
                           cached_tokenizer(*self.tokenizer_args),
                           texts_aug=batch.get(schema.TEXTS_AUG),
                           synthetic=batch.get(schema.SYNTHETIC_CAPTION))
        reason = out[schema.REJECT_REASON]
        stage = np.where(reason != "", DECODE_STAGE, "").astype(object)
        prior = batch.get(schema.REJECT_REASON)
        if prior is not None:
            earlier = prior != ""
            reason[earlier] = prior[earlier]
            stage[earlier] = batch[schema.REJECT_STAGE][earlier]
        out[schema.REJECT_STAGE] = stage
        out.update({c: batch[c] for c in _PASS_THROUGH if c in batch})
        if schema.REWRITE_FALLBACKS in batch:   # Python lists: Arrow list<string>, not pickles
            out[schema.REWRITE_FALLBACKS] = _str_lists(batch[schema.REWRITE_FALLBACKS])
        if schema.NN_TEXT in batch:   # DeCLIP NNS: the neighbour's caption, tokenised alike
            nn_text = [t if isinstance(t, str) else "" for t in batch[schema.NN_TEXT]]
            tok = cached_tokenizer(*self.tokenizer_args)
            out[schema.NN_TOKENS], out[schema.NN_TOKEN_MASK] = tok(nn_text)
        return out


def _str_lists(column: np.ndarray) -> np.ndarray:
    """An object column of per-row sequences (NumPy arrays after an Arrow round trip) -> an
    object array of Python lists of str, which Ray Data stores as Arrow ``list<string>``."""
    out = np.empty(len(column), dtype=object)
    for i, value in enumerate(column):
        out[i] = [] if value is None else [str(v) for v in value]
    return out


def read_shards(uri: str, placement: PlacementConfig | None = None) -> ray.data.Dataset:
    """Raw rows (undecoded bytes, with ``ROW_ID``) from shard files, local or s3://."""
    return read_inputs(uri, ReadConfig(), placement)


def source_plan(cfg: DataConfig, uri: str, cache_root: str) -> tuple[Any, list[Stage]]:
    """(a function building the lazy plan of source rows, the stages that follow it) for the
    rows of ``uri``, running what must run once first:

    - a URL list (img2dataset-style csv/tsv/jsonl/parquet) is downloaded once: pass 1 streams
      read -> download -> [curation row stages] to parquet under ``<cache_root>/staged`` and
      every epoch reads that back, never fetching an image twice;
    - ``data.curate``'s whole-dataset decisions (dedup, keep-top-fraction) run in two passes
      over compact columns (:func:`vlmray.data.curation.twopass.global_decisions`), cached in
      ``cache_root`` by a fingerprint of the inputs and settings, so a re-run skips pass 1.
    """
    files = list_inputs(uri, ReadConfig())
    urls = any(fmt == "urls" for _, fmt in files)
    cur, where = cfg.curation, cfg.placement
    globals_ = global_stages(cur) if cfg.curate else []
    rows = (row_stages(cur, download=cur.download if urls else None) if cfg.curate
            else [DownloadStage(cur.download)] if urls else [])
    fp = fingerprint(cur if cfg.curate else cur.download, cfg.curate,
                     inputs_fingerprint(files))
    if urls:
        staged = stage_once(lambda: apply_row_stages(read_shards(uri, where), rows, where),
                            join(cache_root, "staged"), fingerprint=fp)
        read, rows = (lambda: read_staged(staged)), []
    else:
        staged, read = "", (lambda: read_shards(uri, where))
    if not globals_:
        return read, rows
    summary = global_decisions(lambda: apply_row_stages(read(), rows, where), globals_,
                               cache_root, fingerprint=fp, staged=staged,
                               remote_args=remote_args(where, 1.0))
    return read, [*rows, *decision_stages(summary["decisions"], globals_)]


def build_ingest(cfg: DataConfig, uri: str, *, retrieval: list | None = None,
                 source: tuple[Any, list[Stage]] | None = None) -> ray.data.Dataset:
    """Lazy plan: read -> [curation stages and their decisions: ``source``, from
    :func:`source_plan`] -> [rewrite / caption stages] -> [retrieval stages] ->
    decode/validate/tokenise. Rows carry REJECT_REASON ("" = kept) and REJECT_STAGE.
    ``retrieval`` is the list of stages :func:`vlmray.retrieval.feed.prepare` returns for
    ``data.retrieval``; ``data.rewrite`` adds TEXTS_AUG, REWRITE_FALLBACKS, SYNTHETIC_CAPTION and
    CAPTION_FALLBACK to every row (:func:`vlmray.rewrite.stage.rewrite_plan`)."""
    where = cfg.placement
    read, stages = source or ((lambda: read_shards(uri, where)), [])
    rows = apply_row_stages(read(), stages, where)
    if cfg.rewrite.enabled:
        from vlmray.rewrite.stage import rewrite_plan   # rewrite sits above data (DESIGN.md)

        rows = rewrite_plan(rows, cfg.rewrite)
    if retrieval:
        rows = apply_row_stages(rows, retrieval, where)
    return rows.map_batches(DecodeStage(cfg), batch_format="numpy", batch_size=256,
                            **remote_args(where, DECODE_CPUS))


def stream_ingest(cfg: DataConfig, uri: str, *, rejects_uri: str | None = None,
                  retrieval: list | None = None,
                  cache_root: str | None = None) -> tuple[ray.data.Dataset, Any]:
    """(lazy training dataset of ``train_columns(cfg)``, the tally actor). Only
    what must run once runs now (:func:`source_plan`: a URL list's download, ``data.curate``'s
    pass 1, unless cached in ``cache_root``, default ``<rejects_uri>/../curation``); the rows
    flow when training iterates."""
    import ray

    source = source_plan(cfg, uri, cache_root or _default_cache(rejects_uri))
    tally = ray.remote(num_cpus=0)(StreamTally).remote()
    split = SplitStage(tally, rejects_uri, train_columns(cfg))
    train = build_ingest(cfg, uri, retrieval=retrieval, source=source).map_batches(
        split, batch_format="numpy", batch_size=256, **remote_args(cfg.placement, SPLIT_CPUS))
    return train, tally


def _default_cache(rejects_uri: str | None) -> str:
    if rejects_uri:
        return join(rejects_uri.rstrip("/").rsplit("/", 1)[0], "curation")
    import tempfile

    return tempfile.mkdtemp(prefix="vlmray-curation-")


@dataclass
class IngestResult:
    train: ray.data.Dataset
    rows_in: int
    rows_accepted: int
    rows_rejected: int
    reject_reasons: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, dict[str, int]] = field(default_factory=dict)
    """``rewrite_fallbacks`` / ``caption_fallbacks`` (reason -> count, ``kept`` included) when
    ``data.rewrite`` ran as a prefix (:class:`vlmray.data.stream.StreamTally`)."""

    def summary(self) -> dict[str, object]:
        return {"rows_in": self.rows_in, "rows_accepted": self.rows_accepted,
                "rows_rejected": self.rows_rejected, "reject_reasons": dict(self.reject_reasons),
                **{k: dict(v) for k, v in self.fallbacks.items()}}


def run_ingest(cfg: DataConfig, uri: str, *, rejects_uri: str | None = None,
               retrieval: list | None = None, cache_root: str | None = None) -> IngestResult:
    """The in-memory cache (``data.cache``): streams the plan once and holds the accepted
    training rows in Ray's object store, so later epochs read them from memory. Only for data
    small enough to hold; the counts are complete on return."""
    train, tally = stream_ingest(cfg, uri, rejects_uri=rejects_uri, retrieval=retrieval,
                                 cache_root=cache_root)
    train = train.materialize()
    s = stream_summary(tally)
    if train.count() != s["rows_accepted"]:
        raise RuntimeError(f"ingest: {train.count()} rows held != {s['rows_accepted']} accepted")
    fallbacks = {k: s[k] for k in FALLBACK_COLUMNS.values() if k in s}
    return IngestResult(train, s["rows_in"], s["rows_accepted"], s["rows_rejected"],
                        s["reject_reasons"], fallbacks)


__all__ = ["DecodeStage", "EXTRA_TEXT_COLUMNS", "FALLBACK_COLUMNS", "IngestResult",
           "REGION_COLUMNS", "TRAIN_COLUMNS", "build_ingest", "count_fallbacks",
           "source_plan", "decode_spec", "read_shards", "run_ingest",
           "stream_ingest", "tokenizer_for", "train_columns"]
