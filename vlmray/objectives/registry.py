"""The objective registry: names -> classes, and specs validated against each class's ``Config``.

An objective class registers itself and declares its parameters as a nested dataclass::

    @register_objective("clip")
    class ClipLoss(Objective):
        @dataclass(kw_only=True)
        class Config:
            gather: Literal["local", "global", "local_nograd"] = "local"
        def __init__(self, cfg: Config | None = None) -> None: ...

``ObjectiveSpec(name="clip", weight=1.0, params={"gather": "global"})`` is what a recipe holds.
``validate_spec`` checks it (name, param names, ``Literal`` choices, scalar types, the Config's
own ``__post_init__``) without building anything, so bad specs fail before Ray starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from vlmray._registry import Registry, UnknownNameError
from vlmray.config.objectives import ObjectiveSpec
from vlmray.objectives.base import Objective

OBJECTIVES = Registry[type[Objective]]("objective")


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: register an ``Objective`` under ``name`` and set ``cls.name``."""

    def deco(cls: type[Objective]) -> type[Objective]:
        declared = cls.__dict__.get("name")
        if declared is not None and declared != name:
            raise ValueError(f"{cls.__qualname__}.name={declared!r} but it registers as {name!r}")
        OBJECTIVES.register(name)(cls)
        cls.name = name
        return cls

    return deco


def list_objectives() -> list[str]:
    """Registered objective names, sorted."""
    return OBJECTIVES.names()


def validate_spec(spec: ObjectiveSpec) -> None:
    """Raise ``ValueError`` (``UnknownNameError`` for unknown names) if ``spec`` cannot build."""
    _resolve(spec)


def validate_specs(specs: Sequence[ObjectiveSpec]) -> None:
    """Validate every spec of a mix, and that the mix is non-empty with distinct names."""
    check_mix(specs)
    for spec in specs:
        validate_spec(spec)


def check_mix(specs: Sequence[ObjectiveSpec]) -> None:
    """The mix-level checks alone: non-empty, no name twice (building checks each spec)."""
    if not specs:
        raise ValueError("need at least one objective; valid: " + ", ".join(list_objectives()))
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"objective(s) {repeated} listed more than once; merge their weights")


def build_objective(spec: ObjectiveSpec) -> Objective:
    """Validate ``spec`` and build its objective from the class's ``Config``."""
    cls, cfg = _resolve(spec)
    return cls() if cfg is None else cls(cfg)


def _resolve(spec: ObjectiveSpec) -> tuple[type[Objective], Any]:
    """(class, built Config or None) after every check."""
    cls = OBJECTIVES.get(spec.name)
    _check_weight(spec)
    if not isinstance(spec.params, Mapping):
        kind = type(spec.params).__name__
        raise ValueError(f"objective {spec.name!r}: params must be a mapping, got {kind}")
    config_cls = getattr(cls, "Config", None)
    if config_cls is None:
        if spec.params:
            raise ValueError(f"objective {spec.name!r} takes no params, got {sorted(spec.params)}")
        return cls, None
    _check_params(spec.name, config_cls, spec.params)
    return cls, config_cls(**spec.params)


def _check_weight(spec: ObjectiveSpec) -> None:
    weight = spec.weight
    number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
    if not number or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"objective {spec.name!r}: weight must be a number >= 0, got {weight!r}")


def _check_params(objective: str, config_cls: type, params: Mapping[str, Any]) -> None:
    """Names, required fields and value types of ``params`` against a Config dataclass."""
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    hints = typing.get_type_hints(config_cls)
    for key, value in params.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ";"
            raise UnknownNameError(
                f"objective {objective!r} has no param {key!r}{hint} "
                f"valid params: {', '.join(fields) or '(none)'}"
            )
        _check_value(f"objective {objective!r}: param {key!r}", value, hints.get(key, Any))
    missing = [n for n, f in fields.items() if n not in params and _required(f)]
    if missing:
        raise ValueError(f"objective {objective!r}: missing required params {missing}")


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _check_value(what: str, value: Any, annotation: Any) -> None:
    """Check ``Literal`` choices and plain scalar types; other annotations pass through."""
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        if not any(type(value) is type(c) and value == c for c in choices):
            valid = ", ".join(repr(c) for c in choices)
            raise UnknownNameError(f"{what}: {value!r} is not a choice; valid choices: {valid}")
        return
    accepts = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(annotation)
    if accepts is None:
        return
    if not isinstance(value, accepts) or (annotation is not bool and isinstance(value, bool)):
        got = type(value).__name__
        raise ValueError(f"{what} expects {annotation.__name__}, got {got} {value!r}")


__all__ = [
    "OBJECTIVES",
    "build_objective",
    "list_objectives",
    "register_objective",
    "validate_spec",
    "check_mix",
    "validate_specs",
]
