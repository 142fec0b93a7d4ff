"""Recipes: functions that return a complete ``Config``, by family. ``clip_tiny`` is the default.

    cfg = recipe("clip_tiny", **{"train.steps": "200"})
    list_recipes()                      # every registered name (``--list-recipes``)

``registry.py`` holds the registry; each family module registers its recipes when imported and
imports no other family: ``contrastive.py`` (CLIP and the objectives on its two towers),
``generative.py`` (fusion, decoders, regions), ``rewrite.py`` (rewritten and synthetic captions)
and ``retrieval.py`` (a FAISS index beside the batch).
"""

from __future__ import annotations

from vlmray.recipes import contrastive, generative, retrieval, rewrite  # noqa: F401  (register)
from vlmray.recipes.registry import RECIPES, list_recipes, recipe

__all__ = ["RECIPES", "list_recipes", "recipe"]
