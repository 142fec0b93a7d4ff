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

import dataclasses
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from vlmray.data.synthetic import SyntheticConfig

if TYPE_CHECKING:
    from vlmray.config import DataConfig

BUILTIN = "builtin"


def is_builtin(spec: str) -> bool:
    return spec == BUILTIN or spec.startswith(BUILTIN + ":")


def builtin_config(spec: str, base: SyntheticConfig) -> SyntheticConfig:
    """The generator settings of ``builtin`` / ``builtin:<seed>[?field=value&...]``; ``base``
    supplies every field the spec does not set. Raises ``ValueError`` naming valid fields."""
    if not is_builtin(spec):
        raise ValueError(f"{spec!r} is not a builtin source spec ('builtin:<seed>[?k=v&...]')")
    rest = spec[len(BUILTIN) + 1:] if spec != BUILTIN else ""
    seed_text, _, query = rest.partition("?")
    changes: dict[str, object] = {}
    if seed_text:
        try:
            changes["seed"] = int(seed_text)
        except ValueError:
            raise ValueError(f"data source {spec!r}: seed {seed_text!r} is not an integer "
                             "(write 'builtin:<seed>')") from None
    from vlmray.config import parse_value  # lazy: config imports this module's checks

    hints = typing.get_type_hints(SyntheticConfig)
    valid = sorted(f.name for f in dataclasses.fields(SyntheticConfig))
    for part in filter(None, query.split("&")):
        name, eq, value = part.partition("=")
        if name not in hints or not eq:
            raise ValueError(f"data source {spec!r}: {part!r} is not 'field=value' with a "
                             f"field of SyntheticConfig; valid fields: {valid}")
        try:
            changes[name] = parse_value(hints[name], value, name)
        except ValueError as e:
            raise ValueError(f"data source {spec!r}: {e}") from None
    return dataclasses.replace(base, **changes)


def check_sources(cfg: DataConfig) -> None:
    """The checks ``DataConfig`` runs on its sources; raises ``ValueError`` naming the fix."""
    if cfg.sampling == "single_source" and not cfg.extra_sources:
        raise ValueError("data.sampling='single_source' draws each batch from one of several "
                         "sources: list at least one more in data.extra_sources (a dataset "
                         "root / URI, or 'builtin:<seed>'), or use data.sampling='mixed'")
    names = [cfg.source, *cfg.extra_sources]
    if len(set(names)) != len(names):
        raise ValueError(f"data.source and data.extra_sources repeat a source: {names}")
    for spec in names:
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"data.extra_sources: {spec!r} is not a dataset URI or "
                             "'builtin:<seed>'")
        if is_builtin(spec):
            builtin_config(spec, cfg.synthetic)   # raises, naming the valid fields
    r = cfg.retrieval
    seeded = cfg.source != BUILTIN and is_builtin(cfg.source)
    if (cfg.extra_sources or seeded) and (r.enabled or r.reference_fraction > 0):
        raise ValueError("data.retrieval indexes one data.source ('builtin' or a dataset URI): "
                         "it does not combine with data.extra_sources or a 'builtin:<seed>' "
                         "source")


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


__all__ = ["BUILTIN", "builtin_config", "check_sources", "choose_source", "is_builtin",
           "source_probabilities"]
