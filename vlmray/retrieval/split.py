"""A stable split of a dataset by key: RA-CLIP's held-out reference set.

    ref = reference_mask(keys, 0.1, seed=0)     # ~10% True; the same key -> the same side

Each key's side depends only on ``(seed, key)`` through a BLAKE2b hash (not Python's salted
``hash``), so every worker, run and machine agrees, and adding rows never moves others.
:class:`SubsetStage` applies the split on Ray Data, marking rows of the other side
``outside_subset`` so they are counted, not lost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, ClassVar, Literal, get_args

import numpy as np

from vlmray.data import schema
from vlmray.data.curation.stage import Batch, Resources, Stage, StageOutput

__all__ = ["OUTSIDE_SUBSET", "Subset", "SubsetStage", "key_uniform", "reference_mask"]

OUTSIDE_SUBSET = "outside_subset"
Subset = Literal["all", "reference", "train"]


def key_uniform(keys: Iterable[Any], seed: int = 0) -> np.ndarray:
    """A float64 in [0, 1) per key: the first 8 bytes of BLAKE2b(``"<seed>:<key>"``) / 2**64."""
    out = [int.from_bytes(hashlib.blake2b(f"{seed}:{_text(k)}".encode(), digest_size=8).digest(),
                          "big") for k in keys]
    return np.asarray(out, dtype=np.uint64).astype(np.float64) / 2.0**64


def reference_mask(keys: Iterable[Any], fraction: float, seed: int = 0) -> np.ndarray:
    """Bool per key: True for the reference set (about ``fraction`` of keys; 0 -> none,
    1 -> all), stable under reordering, subsetting and appending."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"reference fraction must be in [0, 1], got {fraction}")
    keys = list(keys)
    if fraction >= 1.0:
        return np.ones(len(keys), dtype=bool)
    return key_uniform(keys, seed) < fraction


class SubsetStage(Stage):
    """Keeps one side of the reference split; the other side gets ``outside_subset``."""

    name: ClassVar[str] = "subset"
    reasons: ClassVar[tuple[str, ...]] = (OUTSIDE_SUBSET,)
    resources = Resources(num_cpus=0.25, batch_size=None)

    def __init__(self, subset: Subset, fraction: float, seed: int = 0) -> None:
        if subset not in get_args(Subset):
            raise ValueError(f"subset={subset!r}; valid choices: {list(get_args(Subset))}")
        reference_mask([], fraction)                          # validates the fraction
        self.subset, self.fraction, self.seed = subset, fraction, seed

    def process(self, batch: Batch) -> StageOutput:
        ref = reference_mask(batch[schema.KEY], self.fraction, self.seed)
        keep = {"all": np.ones_like(ref), "reference": ref, "train": ~ref}[self.subset]
        return StageOutput(reasons=np.where(keep, "", OUTSIDE_SUBSET).astype(object))


def _text(key: Any) -> str:
    if isinstance(key, (bytes, bytearray)):
        return bytes(key).decode("utf-8", "replace")
    return str(key)
