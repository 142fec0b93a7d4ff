"""Random per-epoch stages over the materialised training rows (lazy Ray Data maps, so each
epoch draws afresh): augmented views (``data.views``), then coin-flip mixup (``data.mixup``;
rows are paired within each Ray Data batch).

Given the epoch, a stage seeds each batch from (its seed, the epoch, the batch's
``schema.ROW_ID`` values) (:func:`rows_rng`): the same rows in the same epoch draw the same
augmentation in any process and after a resume; another epoch draws differently."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from vlmray.data.placement import remote_args

if TYPE_CHECKING:
    import ray.data

    from vlmray.config import DataConfig


def rows_rng(seed: int, epoch: int, row_ids: np.ndarray) -> np.random.Generator:
    """A generator that depends only on ``seed``, ``epoch`` and the row ids (their values and
    order): ``SeedSequence([seed, epoch, *words])`` with ``words`` the eight 32-bit words of the
    BLAKE2b-256 digest of the ids as little-endian int64 (negative seeds and epochs are taken
    modulo 2**64)."""
    ids = np.ascontiguousarray(np.asarray(row_ids).astype(np.int64), dtype="<i8")
    words = np.frombuffer(hashlib.blake2b(ids.tobytes(), digest_size=32).digest(), dtype="<u4")
    entropy = [int(seed) % 2**64, int(epoch) % 2**64, *(int(w) for w in words)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def augment_train(cfg: DataConfig, ds: ray.data.Dataset,
                  epoch: int | None = None) -> ray.data.Dataset:
    """``ds`` with the configured random stages appended (unchanged when none is on), placed
    like the other data stages (``data.placement``). ``epoch``: seed each batch from the
    epoch and its rows (:func:`rows_rng`; batches without ``schema.ROW_ID`` and ``epoch=None``
    draw fresh randomness)."""
    where = remote_args(cfg.placement, 1.0)
    if cfg.views.enabled:
        from vlmray.data.views import ViewStage

        ds = ds.map_batches(ViewStage(cfg, epoch=epoch), batch_format="numpy", batch_size=256,
                            **where)
    if cfg.mixup.prob > 0:
        from vlmray.data.mixup import MixupStage

        ds = ds.map_batches(MixupStage(cfg.mixup, epoch=epoch), batch_format="numpy",
                            batch_size=256, **where)
    return ds


__all__ = ["augment_train", "rows_rng"]
