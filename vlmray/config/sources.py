"""Training sources as a config names them: ``builtin``, ``builtin:<seed>[?field=value&...]``
(a second built-in dataset with some ``SyntheticConfig`` fields changed), or a dataset URI.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING

from vlmray.config.data import SyntheticConfig
from vlmray.config.overrides import parse_value

if TYPE_CHECKING:
    from vlmray.config.run import DataConfig

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


__all__ = ["BUILTIN", "builtin_config", "check_sources", "is_builtin"]
