"""The recipe registry: names -> functions that return a complete ``Config``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlmray._registry import Registry
from vlmray.config import Config, apply_overrides

RECIPES: Registry[Callable[[], Config]] = Registry("recipe")


def recipe(name: str, **overrides: Any) -> Config:
    """The named recipe's config with dotted overrides (``**{"train.steps": 100}``) applied."""
    cfg = RECIPES.get(name)()
    return apply_overrides(cfg, overrides) if overrides else cfg


def list_recipes() -> list[str]:
    return RECIPES.names()


__all__ = ["RECIPES", "list_recipes", "recipe"]
