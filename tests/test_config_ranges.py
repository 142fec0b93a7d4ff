"""Every number of the run config has a range, checked when its section is built: a bad value
fails with ``ConfigError`` naming the field and the valid range, before any work (plain
Python: no Ray, no torch).

    pytest tests/test_config_ranges.py -q
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing

import pytest

from vlmray.config import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
)
from vlmray.recipes import recipe

SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


def numeric_fields() -> list[tuple[str, str, type]]:
    """(section, field, int or float) of every int / float / ``float | None`` field."""
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if typing.get_origin(tp) in (typing.Union, types.UnionType):
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            if tp in (int, float):
                out.append((section, f.name, tp))
    return out


def bad_values(kind: type) -> list[object]:
    """Values no numeric field admits: not finite, far out of range, or of the wrong type."""
    values: list[object] = [math.nan, math.inf, -1e18, "3", True]
    return values + [2.5] if kind is int else values


def test_the_walk_sees_every_section_and_the_new_field() -> None:
    names = {f"{s}.{n}" for s, n, _ in numeric_fields()}
    assert {"data.image_size", "model.embed_dim", "train.lr", "train.max_bad_steps",
            "eval.batch_size"} <= names and len(names) >= 30


@pytest.mark.parametrize("section, name, kind", numeric_fields(),
                         ids=[f"{s}.{n}" for s, n, _ in numeric_fields()])
def test_every_numeric_field_refuses_bad_values(section: str, name: str, kind: type) -> None:
    cls = SECTIONS[section]
    default = getattr(cls(), name)
    for value in bad_values(kind):
        with pytest.raises(ConfigError, match=rf"^{section}\.{name} must be .*, got ") as e:
            cls(**{name: value})
        assert re.search(r"an int|a finite number", str(e.value)), str(e.value)
    cls(**{name: default})                                   # the default itself is valid


@pytest.mark.parametrize("override, message", [
    ({"train.log_every": "0"}, "train.log_every must be an int >= 1, got 0"),
    ({"train.keep_checkpoints": "0"}, "train.keep_checkpoints must be an int >= 1, got 0"),
    ({"train.max_failures": "-1"}, "train.max_failures must be an int >= 0, got -1"),
    ({"train.grad_clip": "nan"}, "train.grad_clip must be a finite number >= 0, got nan"),
    ({"train.lr": "1e30"}, "train.lr must be a finite number in (0, 1], got 1e+30"),
    ({"train.cpus_per_worker": "-1"}, "train.cpus_per_worker must be a finite number >= 0"),
    ({"data.image_size": "0"}, "data.image_size must be an int >= 1, got 0"),
    ({"eval.batch_size": "0"}, "eval.batch_size must be an int >= 1, got 0"),
    ({"train.max_bad_steps": "0"}, "train.max_bad_steps must be an int >= 1, got 0"),
    ({"train.lr": "0.5", "train.weight_decay": "2"}, "train.lr * train.weight_decay must be < 1"),
    ({"train.worker_resources": '{"slot": -1}'}, "train.worker_resources: each amount"),
])
def test_the_reported_bad_settings_fail_as_overrides(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        recipe("clip_tiny", **override)


def test_a_stored_config_with_a_bad_value_does_not_load() -> None:
    d = Config().to_dict()
    d["train"]["log_every"] = 0
    with pytest.raises(ConfigError, match=r"train\.log_every must be an int >= 1"):
        Config.from_dict(d)
