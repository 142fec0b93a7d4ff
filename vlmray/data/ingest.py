"""Ingest on Ray Data: read shards (webdataset or parquet, local or s3://) -> [curation stages]
-> decode + validate + tokenise -> train rows.

Every row is accounted for: ``rows_in == rows_accepted + rows_rejected``; rejected rows are
written to ``rejects/`` (key, text, stage, reason) and counted by reason. With
``data.curate`` on, the curation job's stages (text, image, [score], dedup) run as a streaming
prefix of training: the same stages, no curated copy written. With ``data.rewrite`` on, the
caption rewriting / captioning stages (La-CLIP, ALIP; ``vlmray.rewrite.stage``) follow them in
the same plan, and their fallbacks are counted by reason in the summary.

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
from vlmray.data.curation.accounting import ROWS, check_identity, reason_totals, tally
from vlmray.data.decode import DecodeSpec, prepare_rows
from vlmray.data.storage import arrow_filesystem
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
FALLBACK_COLUMNS = {schema.REWRITE_FALLBACKS: "rewrite_fallbacks",
                    schema.CAPTION_FALLBACK: "caption_fallbacks"}
"""Fallback column of the rewrite prefix -> its summary key (reason -> count)."""


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


def read_shards(uri: str) -> ray.data.Dataset:
    """Raw rows (undecoded bytes, with ``ROW_ID``) from shard files, local or s3://."""
    from vlmray.data.curation.readers import ReadConfig, read_inputs

    return read_inputs(uri, ReadConfig())


def build_ingest(cfg: DataConfig, uri: str, *, retrieval: list | None = None) -> ray.data.Dataset:
    """Lazy plan: read -> [curation stages] -> [rewrite / caption stages] -> [retrieval stages]
    -> decode/validate/tokenise. Rows carry REJECT_REASON ("" = kept) and REJECT_STAGE.
    ``retrieval`` is the list of stages :func:`vlmray.retrieval.feed.feed_stages` returns for
    ``data.retrieval``; ``data.rewrite`` adds TEXTS_AUG, REWRITE_FALLBACKS, SYNTHETIC_CAPTION and
    CAPTION_FALLBACK to every row (:func:`vlmray.rewrite.stage.rewrite_plan`)."""
    from vlmray.data.curation.plan import apply_row_stages

    rows = read_shards(uri)
    if cfg.curate:
        from vlmray.data.curation.plan import row_stages

        rows = apply_row_stages(rows, row_stages(cfg.curation))
    if cfg.rewrite.enabled:
        from vlmray.rewrite.stage import rewrite_plan

        rows = rewrite_plan(rows, cfg.rewrite)
    if retrieval:
        rows = apply_row_stages(rows, retrieval)
    return rows.map_batches(DecodeStage(cfg), batch_format="numpy", batch_size=256)


def _select(batch: dict[str, np.ndarray], *, rejected: bool) -> dict[str, np.ndarray]:
    keep = (batch[schema.REJECT_REASON] != "") if rejected else (batch[schema.REJECT_REASON] == "")
    return {k: v[keep] for k, v in batch.items()}


def count_fallbacks(batch: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Rewrite-prefix outcomes of a batch: ``{"rewrite_fallbacks": {reason: n},
    "caption_fallbacks": {reason: n}}`` for the fallback columns it has; ``kept`` counts the
    rewrites (captions) the LLM's output was used for, every other key a fallback reason."""
    out: dict[str, dict[str, int]] = {}
    for column, key in FALLBACK_COLUMNS.items():
        if column not in batch:
            continue
        counts = out.setdefault(key, {})
        for value in batch[column]:
            values = [value] if isinstance(value, (str, bytes)) or value is None else value
            for reason in values:
                name = str(reason or "") or "kept"
                counts[name] = counts.get(name, 0) + 1
    return out


def _fallback_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One batch -> (summary key, reason, n) rows, for a small ``take_all``."""
    rows = [(k, r, n) for k, c in count_fallbacks(batch).items() for r, n in c.items()]
    return {"key": np.asarray([r[0] for r in rows], dtype=object),
            "reason": np.asarray([r[1] for r in rows], dtype=object),
            "n": np.asarray([r[2] for r in rows], dtype=np.int64)}


def fallback_totals(ds: ray.data.Dataset) -> dict[str, dict[str, int]]:
    """:func:`count_fallbacks` over a whole dataset (all rows, rejected ones included: the
    rewrite stages ran on them); {} when it has no fallback columns."""
    cols = [c for c in FALLBACK_COLUMNS if c in ds.columns()]
    if not cols:
        return {}
    out: dict[str, dict[str, int]] = {FALLBACK_COLUMNS[c]: {} for c in cols}
    small = ds.select_columns(cols).map_batches(_fallback_rows, batch_format="numpy",
                                                batch_size=4096)
    for row in small.take_all():
        counts = out[str(row["key"])]
        counts[str(row["reason"])] = counts.get(str(row["reason"]), 0) + int(row["n"])
    return {k: dict(sorted(v.items())) for k, v in out.items()}


@dataclass
class IngestResult:
    train: ray.data.Dataset
    rows_in: int
    rows_accepted: int
    rows_rejected: int
    reject_reasons: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, dict[str, int]] = field(default_factory=dict)
    """``rewrite_fallbacks`` / ``caption_fallbacks`` (reason -> count, ``kept`` included) when
    ``data.rewrite`` ran as a prefix (:func:`fallback_totals`)."""

    def summary(self) -> dict[str, object]:
        return {"rows_in": self.rows_in, "rows_accepted": self.rows_accepted,
                "rows_rejected": self.rows_rejected, "reject_reasons": dict(self.reject_reasons),
                **{k: dict(v) for k, v in self.fallbacks.items()}}


def run_ingest(cfg: DataConfig, uri: str, *, rejects_uri: str | None = None,
               retrieval: list | None = None) -> IngestResult:
    """Executes the ingest plan once, writes rejects, and returns the accepted train rows."""
    full = build_ingest(cfg, uri, retrieval=retrieval).materialize()
    if cfg.curate:
        from vlmray.data.curation.plan import apply_global, global_stages

        full = apply_global(full, global_stages(cfg.curation)).materialize()
    counts = tally(full)                   # the curation job's accounting: one cheap map
    fallbacks = fallback_totals(full)      # the rewrite prefix's, when it ran
    rows_in = counts[(ROWS, "", "")]
    reasons = reason_totals(counts)
    rejected = sum(reasons.values())
    if rejects_uri and rejected:
        fs, path = arrow_filesystem(rejects_uri)
        (full.select_columns([schema.KEY, schema.TEXT, schema.REJECT_STAGE, schema.REJECT_REASON])
             .map_batches(functools.partial(_select, rejected=True), batch_format="numpy")
             .write_parquet(path, filesystem=fs))
    columns = train_columns(cfg)           # selected first: only these cross the filter
    train = (full.select_columns([*columns, schema.REJECT_REASON])
                 .map_batches(functools.partial(_select, rejected=False), batch_format="numpy")
                 .select_columns(columns).materialize())
    accepted = train.count()
    check_identity(rows_in, rows_out=accepted, rows_rejected=rejected, where="ingest")
    return IngestResult(train, rows_in, accepted, rejected, reasons, fallbacks)


__all__ = ["DecodeStage", "EXTRA_TEXT_COLUMNS", "FALLBACK_COLUMNS", "IngestResult",
           "REGION_COLUMNS", "TRAIN_COLUMNS", "build_ingest", "count_fallbacks", "decode_spec",
           "fallback_totals", "read_shards", "run_ingest", "tokenizer_for", "train_columns"]
