"""Coin-flip image-text mixup as a Ray Data batch stage (after ZeroVL; Cui et al., 2022,
"Contrastive Vision-Language Pre-training with Limited Resources", ECCV).

Rows are paired inside the Ray Data batch as ZeroVL pairs them inside its training batch:
row i with row j = n - 1 - i (the batch reversed). For each row a coin with P(heads) =
``data.mixup.prob`` decides whether it is mixed; a mixed row gets

    x~_i = lam_i * x_i + (1 - lam_i) * x_j,    lam_i = max(l, 1 - l),  l ~ Beta(alpha, alpha)
    t~_i = [t_i without its EOS] ++ [t_j without its BOS and EOS], truncated to L - 1, ++ [EOS]

on PIXELS (uint8, rounded) and TOKENS / TOKEN_MASK. Taking ``max(l, 1 - l)`` keeps row i the
dominant image, so its own caption (which comes first and survives truncation) leads the
concatenation; Beta(alpha, alpha) is symmetric, so the mixing weights are distributed as in the
paper. A mixed row whose partner has another class gets LABEL -1 (caption-only: no class
positive for image-text-label objectives); self-pairs (the middle row of an odd batch) are left
as they are.

Deviation from the paper, and why: ZeroVL's coin chooses per batch between mixing raw images
and mixing text embeddings, keeps the other modality as it is, and mixes the contrastive
targets (lam * CE(logits, i) + (1 - lam) * CE(logits, flip(i))). A data stage cannot mix
embeddings or change the loss's targets, so the image side is mixed in pixels and the text
side carries both captions (MixGen's label-preserving concatenation): the pair (x~_i, t~_i)
stays a positive of the ordinary diagonal target and every objective works unchanged.
"""

from __future__ import annotations

import numpy as np

from vlmray.config.data import MixupConfig
from vlmray.data import schema
from vlmray.data.augment import rows_rng


def partners(n: int) -> np.ndarray:
    """Row i's partner: n - 1 - i (ZeroVL's ``flip(0)``)."""
    return np.arange(n - 1, -1, -1)


def concat_tokens(tokens_i: np.ndarray, mask_i: np.ndarray, tokens_j: np.ndarray,
                  mask_j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row's concatenated caption: (L,) tokens and mask. Real tokens are where the mask is
    1, laid out ``[BOS] w_1 .. w_k [EOS]`` then padding; the padding id is kept from row i
    (or row j, or 0 when neither is padded)."""
    length = len(tokens_i)
    n_i, n_j = int(mask_i.sum()), int(mask_j.sum())
    pads = np.concatenate([tokens_i[mask_i == 0], tokens_j[mask_j == 0], [0]])
    eos = tokens_i[n_i - 1]
    body = np.concatenate([tokens_i[:n_i - 1], tokens_j[1:n_j - 1]])[:length - 1]
    out = np.full(length, pads[0], dtype=tokens_i.dtype)
    out[:len(body)], out[len(body)] = body, eos
    mask = np.zeros(length, dtype=mask_i.dtype)
    mask[:len(body) + 1] = 1
    return out, mask


def mix_rows(batch: dict[str, np.ndarray], mixed: np.ndarray,
             lam: np.ndarray) -> dict[str, np.ndarray]:
    """``batch`` with the rows where ``mixed`` (n,) is True mixed with their partners at
    weights ``lam`` (n,) (row i's own weight). Pure: the input arrays are not changed."""
    n = len(batch[schema.PIXELS])
    j = partners(n)
    mixed = np.asarray(mixed, dtype=bool) & (j != np.arange(n))
    tok, msk = batch[schema.TOKENS], batch[schema.TOKEN_MASK]
    mixed &= (msk.sum(1) >= 2) & (msk[j].sum(1) >= 2)       # each has at least BOS and EOS
    out = dict(batch)
    if not mixed.any():
        return out
    rows = np.flatnonzero(mixed)
    x = batch[schema.PIXELS].astype(np.float32)              # (n, 3, H, W)
    w = np.asarray(lam, dtype=np.float32)[rows].reshape(-1, *([1] * (x.ndim - 1)))
    pixels = batch[schema.PIXELS].copy()
    pixels[rows] = np.clip(np.rint(w * x[rows] + (1.0 - w) * x[j[rows]]), 0, 255)
    tokens, mask = tok.copy(), msk.copy()
    for i in rows:
        tokens[i], mask[i] = concat_tokens(tok[i], msk[i], tok[j[i]], msk[j[i]])
    out.update({schema.PIXELS: pixels, schema.TOKENS: tokens, schema.TOKEN_MASK: mask})
    if schema.LABEL in batch:
        label = batch[schema.LABEL].copy()
        label[rows] = np.where(label[rows] == label[j[rows]], label[rows], -1)
        out[schema.LABEL] = label
    return out


class MixupStage:
    """Ray Data batch function (numpy format) applying coin-flip mixup; light and picklable.
    With ``epoch`` and a batch holding ``schema.ROW_ID``, the draws are seeded from (``seed``
    or 0, the epoch, the batch's row ids) (``vlmray.data.augment.rows_rng``): the same rows in
    the same epoch mix the same way in any process, and each epoch differently. Otherwise
    ``seed`` (tests) fixes the draws, and without it each call draws fresh randomness, so
    every epoch mixes differently. ROW_ID passes through unchanged (a mixed row keeps its
    own)."""

    def __init__(self, cfg: MixupConfig, seed: int | None = None,
                 epoch: int | None = None) -> None:
        self.prob, self.alpha, self.seed, self.epoch = cfg.prob, cfg.alpha, seed, epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[schema.PIXELS])
        if self.prob <= 0 or n < 2:
            return batch
        if self.epoch is not None and schema.ROW_ID in batch:
            rng = rows_rng(self.seed or 0, self.epoch, batch[schema.ROW_ID])
        else:
            rng = np.random.default_rng(self.seed)
        mixed = rng.random(n) < self.prob
        lam = rng.beta(self.alpha, self.alpha, size=n)
        return mix_rows(batch, mixed, np.maximum(lam, 1.0 - lam))


__all__ = ["MixupStage", "concat_tokens", "mix_rows", "partners"]
