"""Augmented views of each training row, made in Ray Data (DeCLIP, PyramidCLIP, CLIPPO).

``data.views`` lists what to add; a stage runs lazily over the materialised training rows, so
every epoch draws new views. The model never re-reads raw bytes: it encodes the extra columns
when an objective asks for them (``vlmray.models.outputs``).

    image views  -> schema.PIXELS_VIEWS     (V, 3, S, S)   "global" / "local" random crops
    text views   -> schema.TOKENS_VIEWS     (V_t, L)       "eda" / "summary" / "attributes"
    mlm_prob > 0 -> schema.MLM_TOKENS, schema.MLM_LABELS (L,)
    render_text  -> schema.TEXT_PIXELS      (3, S, S)      the caption drawn as an image
    caption_sampling="uniform" -> schema.TOKENS / TOKEN_MASK replaced by a uniform draw among
                    the row's non-empty TOKENS_AUG slots (La-CLIP), which are then dropped

    ds = ds.map_batches(ViewStage(cfg.data), batch_format="numpy")   # vlmray.data.augment

Randomness: given the epoch (``ViewStage(cfg, epoch=e)``, from ``augment_train``) and a batch
with ``schema.ROW_ID``, the batch draws from a generator seeded with (``views.seed``, the epoch,
a hash of the batch's row ids) (``vlmray.data.augment.rows_rng``): the same rows in the same
epoch get the same views in any process and after a resume, and each epoch gets new ones.
Otherwise each call draws from a fresh ``numpy.random.Generator`` seeded with
``(views.seed, this instance's call counter, this process's call counter, os.getpid())``. Ray
Data unpickles a fresh copy of the stage per task, so the instance counter alone would restart
at 0 in every task; the process-wide counter and the pid make every batch of every epoch, on
every worker, draw differently. Those views are not reproducible run to run (the pid and Ray's
scheduling enter); ``views.seed`` only shifts the whole stream.
"""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING

import numpy as np

from vlmray.data import schema
from vlmray.data.augment import rows_rng
from vlmray.data.ingest import cached_tokenizer
from vlmray.data.render import render_texts
from vlmray.data.view_ops import (
    TEXT_VIEWS,
    colour_jitter,
    eda,
    mlm_mask,
    random_flips,
    random_resized_crops,
)

if TYPE_CHECKING:
    from vlmray.config import DataConfig
    from vlmray.data.tokenize import Tokenizer

_PROCESS_CALLS = itertools.count()


class ViewStage:
    """Ray Data batch function (numpy batches) adding the ``data.views`` columns.

    In: PIXELS (B, 3, S, S) uint8, TOKENS / TOKEN_MASK (B, L) int64, LABEL, any other
    columns, and TEXT (str) when ``views.needs_text``. Out: every input column but TEXT
    (torch batches cannot hold strings), plus PIXELS_VIEWS (B, V, 3, S, S) uint8,
    TOKENS_VIEWS / TOKEN_MASK_VIEWS (B, V_t, L) int64, MLM_TOKENS / MLM_LABELS (B, L) int64
    and TEXT_PIXELS (B, 3, S, S) uint8, as configured. With ``caption_sampling="uniform"``
    TOKENS / TOKEN_MASK are first redrawn from TOKENS_AUG / TOKEN_MASK_AUG (B, T, L), which are
    then dropped (no objective reads them); a batch without them keeps its captions (as rows
    whose ``texts_aug`` is missing). ROW_ID, when present, passes through unchanged and, with
    ``epoch``, seeds the batch's draws (module docstring). Holds only light, picklable
    settings; the tokenizer is built once per worker process (``cached_tokenizer``).
    """

    def __init__(self, cfg: DataConfig, epoch: int | None = None) -> None:
        self.views, self.epoch = cfg.views, epoch
        self.tokenizer_args = (cfg.tokenizer, cfg.vocab_size, cfg.context_length)
        self._calls = 0
        if self.views.mlm_prob > 0:
            self._tokenizer().mask_id          # fail now, not in a worker, if there is no [MASK]

    def _tokenizer(self) -> Tokenizer:
        return cached_tokenizer(*self.tokenizer_args)

    def _rng(self, batch: dict[str, np.ndarray]) -> np.random.Generator:
        if self.epoch is not None and schema.ROW_ID in batch:
            return rows_rng(self.views.seed, self.epoch, batch[schema.ROW_ID])
        self._calls += 1
        return np.random.default_rng([self.views.seed % 2**63, self._calls, next(_PROCESS_CALLS),
                                      os.getpid()])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        v, rng = self.views, self._rng(batch)
        out = {k: col for k, col in batch.items() if k != schema.TEXT}
        if v.caption_sampling == "uniform" and schema.TOKENS_AUG in batch:
            out[schema.TOKENS], out[schema.TOKEN_MASK] = sample_captions(
                np.asarray(batch[schema.TOKENS]), np.asarray(batch[schema.TOKEN_MASK]),
                np.asarray(batch[schema.TOKENS_AUG]), np.asarray(batch[schema.TOKEN_MASK_AUG]),
                rng)
            del out[schema.TOKENS_AUG], out[schema.TOKEN_MASK_AUG]
            batch = {**batch, schema.TOKENS: out[schema.TOKENS],
                     schema.TOKEN_MASK: out[schema.TOKEN_MASK]}     # MLM masks the drawn one
        texts: list[str] = []
        if v.needs_text:
            if schema.TEXT not in batch:
                raise KeyError(f"data.views needs the caption column {schema.TEXT!r} "
                               f"(text views or render_text); columns: {sorted(batch)}")
            texts = [str(t) for t in batch[schema.TEXT]]
        if v.image:
            out[schema.PIXELS_VIEWS] = self.image_views(np.asarray(batch[schema.PIXELS]), rng)
        if v.text:
            out[schema.TOKENS_VIEWS], out[schema.TOKEN_MASK_VIEWS] = self.text_views(texts, rng)
        if v.mlm_prob > 0:
            tok = self._tokenizer()
            out[schema.MLM_TOKENS], out[schema.MLM_LABELS] = mlm_mask(
                np.asarray(batch[schema.TOKENS]), np.asarray(batch[schema.TOKEN_MASK]),
                v.mlm_prob, rng, mask_id=tok.mask_id, special_ids=tok.special_ids,
                vocab_size=tok.vocab_size)
        if v.render_text:
            size = batch[schema.PIXELS].shape[-1]
            out[schema.TEXT_PIXELS] = render_texts(texts, size)                # (B, 3, S, S)
        return out

    def image_views(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(B, 3, S, S) uint8 -> (B, V, 3, S, S) uint8, one slot per ``views.image`` entry."""
        v = self.views
        out = np.empty((len(pixels), len(v.image), *pixels.shape[1:]), dtype=np.uint8)
        for slot, kind in enumerate(v.image):
            if kind == "global":
                view = random_resized_crops(pixels, rng, (v.global_min_scale, 1.0))
                view = colour_jitter(random_flips(view, rng), rng)
            else:   # "local"
                view = random_resized_crops(pixels, rng, (v.local_min_scale, v.local_max_scale))
                view = random_flips(view, rng)
            out[:, slot] = view
        return out

    def text_views(self, texts: list[str],
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """B captions -> (ids, mask) int64 (B, V_t, L), one slot per ``views.text`` entry."""
        tok, ids, masks = self._tokenizer(), [], []
        for kind in self.views.text:
            if kind == "eda":
                derived = [eda(t, self.views.eda_prob, rng) for t in texts]
            else:
                derived = [TEXT_VIEWS[kind](t) for t in texts]
            i, m = tok(derived)                                                # (B, L) each
            ids.append(i)
            masks.append(m)
        return np.stack(ids, axis=1), np.stack(masks, axis=1)


def sample_captions(tokens: np.ndarray, mask: np.ndarray, tokens_aug: np.ndarray,
                    mask_aug: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """La-CLIP's text augmentation: each row's caption drawn uniformly among its non-empty
    slots. tokens, mask (B, L); tokens_aug, mask_aug (B, T, L), a slot is empty when its mask
    row is all zero -> (tokens, mask) (B, L). Rows without a non-empty slot keep their own."""
    live = mask_aug.sum(-1) > 0                                           # (B, T)
    n = live.sum(-1)                                                      # (B,)
    pick = np.minimum((rng.random(len(n)) * n).astype(np.int64), np.maximum(n - 1, 0))
    slot = (np.cumsum(live, -1) > pick[:, None]).argmax(-1)               # pick-th live slot
    rows = np.arange(len(n))
    has = n > 0
    out_t, out_m = tokens.copy(), mask.copy()
    out_t[has], out_m[has] = tokens_aug[rows, slot][has], mask_aug[rows, slot][has]
    return out_t, out_m


__all__ = ["ViewStage", "sample_captions"]
