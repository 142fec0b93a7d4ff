"""Recipes that train on rewritten or synthetic captions (La-CLIP, ALIP): issue 4.
Imported by ``vlmray.recipes`` (registers them).
"""

from __future__ import annotations

from vlmray.config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: F401
from vlmray.objectives.registry import ObjectiveSpec  # noqa: F401
from vlmray.recipes import RECIPES  # noqa: F401

# --- recipes (each helper appends its own below this line) --------------------------------
