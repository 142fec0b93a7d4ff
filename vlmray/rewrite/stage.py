"""Caption rewriting (La-CLIP) and synthetic captioning (ALIP) as one lazy Ray Data plan.

    rows (KEY, TEXT, IMAGE, META, ...)
      -> prepare: TEXT decoded to str (bytes: utf-8 with replacement); rows already rejected
         upstream (non-empty REJECT_REASON) get an empty caption and are not sent to a model
      -> backend.apply     (cfg.k > 0):             + _rewrite_<j>, _rewrite_<j>_tokens
      -> captioner.apply   (cfg.captioner != none): + _caption, _caption_tokens
      -> validate: TEXTS_AUG (original then k rewrites; a failed rewrite is the original),
         REWRITE_FALLBACKS (k reasons, "" = kept), [SYNTHETIC_CAPTION, CAPTION_FALLBACK],
         REWRITE_TOKENS / CAPTION_TOKENS_OUT (int64); TEXT restored; raw columns dropped

No row is added or lost (a backend may reorder them). Used by ``jobs/rewrite_captions.py`` and
as a streaming prefix of training ingest.

    check_rewrite(cfg)                 # before Ray starts: bad backend / missing model fail now
    ds = rewrite_plan(ds, cfg)
    fallback_tallies(totals)           # {"rewrites": {...}, "captions": {...}} from counts
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from vlmray.config.rewrite import RewriteConfig, ValidateConfig
from vlmray.data import schema
from vlmray.rewrite.base import (
    CAPTION_TOKENS,
    RAW_CAPTION,
    captioner,
    raw_column,
    rewrite_backend,
    tokens_column,
)
from vlmray.rewrite.prompts import LaClipPrompts
from vlmray.rewrite.validate import (
    SKIPPED_REJECTED,
    Agreement,
    validate_caption,
    validate_rewrites,
)

if TYPE_CHECKING:
    import ray.data

REWRITE_TOKENS = "rewrite_tokens"
"""Column (int64): tokens generated for the row's k rewrites together."""
CAPTION_TOKENS_OUT = "caption_tokens"
"""Column (int64): tokens generated for the row's synthetic caption."""
LIGHT_CPUS = 0.25
"""CPUs the light steps (prepare, validate) reserve. With a whole CPU each, a 2-CPU node whose
model replica holds one CPU could not schedule them, and the plan would wait forever."""
_ORIGINAL = "_text_original"       # TEXT as it came in, restored after validation


def _str(value: Any) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _rejected(batch: dict[str, np.ndarray], n: int) -> np.ndarray:
    if schema.REJECT_REASON not in batch:
        return np.zeros(n, dtype=bool)
    return np.array([bool(_str(r)) for r in batch[schema.REJECT_REASON]], dtype=bool)


def prepare_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """TEXT as str for the backends ("" for rejected rows); the original kept aside."""
    texts = batch[schema.TEXT]
    rejected = _rejected(batch, len(texts))
    batch[_ORIGINAL] = texts
    batch[schema.TEXT] = np.array(["" if r else _str(t) for t, r in zip(texts, rejected)],
                                  dtype=object)
    return batch


def _rewrite_columns(table: pa.Table, k: int, originals: list[str], rejected: np.ndarray,
                     vcfg: ValidateConfig, prompt_texts: set[str],
                     agreement: Agreement | None) -> dict[str, pa.Array]:
    aug = [[o] for o in originals]
    why: list[list[str]] = [[] for _ in originals]
    tokens = np.zeros(len(originals), dtype=np.int64)
    for j in range(k):
        raws = [_str(x) for x in table.column(raw_column(j)).to_pylist()]
        tokens += np.asarray(table.column(tokens_column(j)).to_numpy(zero_copy_only=False),
                             dtype=np.int64)
        done = validate_rewrites(originals, raws, vcfg, prompt_texts, agreement)
        for i, (text, reason) in enumerate(done):
            aug[i].append(originals[i] if rejected[i] else text)
            why[i].append(SKIPPED_REJECTED if rejected[i] else reason)
    return {schema.TEXTS_AUG: pa.array(aug, pa.list_(pa.string())),
            schema.REWRITE_FALLBACKS: pa.array(why, pa.list_(pa.string())),
            REWRITE_TOKENS: pa.array(tokens, pa.int64())}


def _caption_columns(table: pa.Table, originals: list[str], rejected: np.ndarray,
                     vcfg: ValidateConfig) -> dict[str, pa.Array]:
    raws = [_str(x) for x in table.column(RAW_CAPTION).to_pylist()]
    done = [(o, SKIPPED_REJECTED) if r else validate_caption(o, raw, vcfg)
            for o, raw, r in zip(originals, raws, rejected)]
    tokens = np.asarray(table.column(CAPTION_TOKENS).to_numpy(zero_copy_only=False),
                        dtype=np.int64)
    return {schema.SYNTHETIC_CAPTION: pa.array([t for t, _ in done], pa.string()),
            schema.CAPTION_FALLBACK: pa.array([w for _, w in done], pa.string()),
            CAPTION_TOKENS_OUT: pa.array(tokens, pa.int64())}


def validate_batch(table: pa.Table, *, k: int, captions: bool, vcfg: ValidateConfig,
                   prompt_texts: set[str], agreement: Agreement | None = None) -> pa.Table:
    """Raw model outputs -> the validated columns; TEXT restored, raw columns dropped."""
    original = table.column(_ORIGINAL)
    originals = [_str(x) for x in original.to_pylist()]
    rejected = _rejected({c: table.column(c).to_pylist() for c in table.column_names
                          if c == schema.REJECT_REASON}, table.num_rows)
    new = _rewrite_columns(table, k, originals, rejected, vcfg, prompt_texts, agreement)
    if captions:
        new.update(_caption_columns(table, originals, rejected, vcfg))
    raw = {_ORIGINAL, schema.TEXT, RAW_CAPTION, CAPTION_TOKENS}
    raw |= {c for j in range(k) for c in (raw_column(j), tokens_column(j))}
    keep = [c for c in table.column_names if c not in raw and c not in new]
    out = table.select(keep).append_column(schema.TEXT, original)
    for name, col in new.items():
        out = out.append_column(name, col)
    return out


class _AgreementValidator:
    """``validate_batch`` in an actor that loads the sentence encoder once (off_topic on)."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs, self.agreement = kwargs, Agreement()

    def __call__(self, table: pa.Table) -> pa.Table:
        return validate_batch(table, agreement=self.agreement, **self.kwargs)


def check_rewrite(cfg: RewriteConfig) -> None:
    """Builds the prompts, backend and captioner and calls their ``check()``: a bad backend,
    a missing model or examples file fails here, before any work."""
    LaClipPrompts(cfg)
    if cfg.k > 0:
        rewrite_backend(cfg).check()
    if cfg.captioner != "none":
        captioner(cfg).check()


def rewrite_plan(ds: ray.data.Dataset, cfg: RewriteConfig) -> ray.data.Dataset:
    """``ds`` plus the validated rewrite (and caption) columns; lazy, no row added or lost."""
    prompts = LaClipPrompts(cfg)
    ds = ds.map_batches(prepare_batch, batch_format="numpy", batch_size=cfg.batch_size * 4,
                        num_cpus=LIGHT_CPUS)
    if cfg.k > 0:
        ds = rewrite_backend(cfg).apply(ds, prompts)
    if cfg.captioner != "none":
        ds = captioner(cfg).apply(ds)
    kwargs = {"k": cfg.k, "captions": cfg.captioner != "none", "vcfg": cfg.validate,
              "prompt_texts": prompts.example_texts()}
    if cfg.validate.min_agreement > 0 and cfg.k > 0:
        from ray.data import ActorPoolStrategy

        return ds.map_batches(_AgreementValidator, fn_constructor_kwargs=kwargs,
                              batch_format="pyarrow", batch_size=256,
                              compute=ActorPoolStrategy(size=cfg.concurrency))
    return ds.map_batches(validate_batch, fn_kwargs=kwargs, batch_format="pyarrow",
                          batch_size=256, num_cpus=LIGHT_CPUS)


def _tally(counts: dict[str, int]) -> dict[str, Any]:
    """reason -> count (``kept`` included) -> total, kept, fell_back, skipped_rejected,
    by_reason."""
    by = {r: n for r, n in sorted(counts.items()) if r != "kept"}
    skipped = by.get(SKIPPED_REJECTED, 0)
    return {"total": sum(counts.values()), "kept": counts.get("kept", 0),
            "fell_back": sum(by.values()) - skipped, "skipped_rejected": skipped,
            "by_reason": by}


def fallback_tallies(totals: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """``{"rewrites": tally, "captions": tally}`` (a tally: total, kept, fell_back,
    skipped_rejected, by_reason) from reason counts keyed as
    :func:`vlmray.data.stream.count_fallbacks` gives them (summed over any batches)."""
    return {"rewrites": _tally(totals.get("rewrite_fallbacks", {})),
            "captions": _tally(totals.get("caption_fallbacks", {}))}


__all__ = ["CAPTION_TOKENS_OUT", "REWRITE_TOKENS", "check_rewrite",
           "fallback_tallies", "prepare_batch", "rewrite_plan", "validate_batch"]
