"""Several training sources, and ZeroVL's debiased (single-source) batch sampling.

A run trains on ``data.source`` plus ``data.extra_sources``. Each extra entry is resolved like
``data.source``: a dataset root or shard directory (local path or ``s3://`` URI), or a second
built-in dataset written as ``builtin:<seed>`` with optional generator overrides in query form,
e.g. ``builtin:7?mismatch_frac=0.3&num_train=2000`` (fields of ``SyntheticConfig``; the rest
come from ``data.synthetic``).

With ``data.sampling="single_source"`` every global batch comes from one source, chosen per
step with probability proportional to its size (Cui et al., 2022, "Contrastive
Vision-Language Pre-training with Limited Resources", ECCV: debiased sampling). The choice is
a pure function of ``(train.seed, step)``, so every worker draws the same source with no
communication, and a resumed run repeats the choices of the run it continues.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def source_probabilities(sizes: Sequence[int]) -> np.ndarray:
    """p_k = n_k / sum_j n_j over the sources' (accepted) row counts."""
    n = np.asarray(sizes, dtype=np.float64)
    if n.ndim != 1 or len(n) == 0 or (n < 0).any() or n.sum() <= 0:
        raise ValueError(f"source sizes must be non-negative with a positive sum, got {sizes}")
    return n / n.sum()


def choose_source(seed: int, step: int, sizes: Sequence[int]) -> int:
    """The source every worker draws step ``step``'s global batch from: k ~ Categorical(p),
    p_k proportional to ``sizes[k]``, from a generator seeded by ``(seed, step)`` alone."""
    p = source_probabilities(sizes)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), 0x5EED])
    return int(rng.choice(len(p), p=p))


__all__ = [ "choose_source",
           "source_probabilities"]
