"""Config dicts and command-line overrides: ``section.field=value`` strings parsed into each
field's type, unknown names rejected with the valid ones listed.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

from vlmray.config.errors import ConfigError, unknown_message
from vlmray.config.objectives import ObjectiveSpec


def dataclass_from_dict(cls: type, d: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} in {cls.__name__}; valid: {sorted(known)}")
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _coerce_obj(hints[name], value)
    return cls(**kwargs)


def _coerce_obj(tp: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return dataclass_from_dict(tp, value)
    if typing.get_origin(tp) is list and typing.get_args(tp)[0] is ObjectiveSpec:
        return [v if isinstance(v, ObjectiveSpec) else ObjectiveSpec(**v) for v in value]
    return value


def field_paths(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """All overridable dotted names of a config -> their type hints."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(field_paths(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = hints[f.name]
    return out


def parse_value(tp: Any, text: str, name: str) -> Any:
    """Parses a command-line string into the field's type, with a clear error."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if text not in choices:
            raise ConfigError(f"{name}: {text!r} is not one of {list(choices)}")
        return text
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    try:
        if tp is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if tp in (int, float, str):
            return tp(text)
        if typing.get_origin(tp) is list and typing.get_args(tp)[0] is ObjectiveSpec:
            return parse_objectives(text)
        return json.loads(text)  # dicts and lists
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{name}: cannot read {text!r} as {getattr(tp, '__name__', tp)}") from e


def parse_objectives(text: str) -> list[ObjectiveSpec]:
    """``clip`` / ``clip:1.0,siglip:0.5`` / a JSON list of ``{"name", "weight", "params"}``."""
    if text.lstrip().startswith("["):
        return [ObjectiveSpec(**d) for d in json.loads(text)]
    specs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        specs.append(ObjectiveSpec(name=name, weight=float(weight) if weight else 1.0))
    return specs


def apply_overrides(cfg: Any, overrides: dict[str, str | Any]) -> Any:
    """Returns a copy of ``cfg`` (any config dataclass) with dotted fields replaced; unknown
    names raise, listing the valid ones."""
    cfg = dataclass_from_dict(type(cfg), json.loads(json.dumps(dataclasses.asdict(cfg))))
    paths = field_paths(cfg)
    for name, value in overrides.items():
        if name not in paths:
            raise ConfigError(unknown_field_message(name, sorted(paths)))
        if isinstance(value, str):
            value = parse_value(paths[name], value, name)
        *parents, leaf = name.split(".")
        target = cfg
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)
    try:  # rebuild, so every section's own checks (__post_init__) see the new values
        return dataclass_from_dict(type(cfg), json.loads(json.dumps(dataclasses.asdict(cfg))))
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def unknown_field_message(name: str, valid: list[str]) -> str:
    return unknown_message("config field", name, valid, limit=len(valid))


def check_literals(obj: Any, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_literals(value, f"{prefix}{f.name}.")
        elif typing.get_origin(hints[f.name]) is Literal:
            choices = typing.get_args(hints[f.name])
            if value not in choices:
                raise ConfigError(f"{prefix}{f.name}: {value!r} is not one of {list(choices)}")


__all__ = ["apply_overrides", "check_literals", "dataclass_from_dict", "field_paths", "parse_objectives",
           "parse_value", "unknown_field_message"]
