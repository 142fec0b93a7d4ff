"""Recipes of the generative and alignment family (issue 7): fusion encoders, decoders and
region features beside the contrastive towers. Imported by ``vlmray.recipes`` (registers them).
"""

from __future__ import annotations

from vlmray.config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: F401
from vlmray.objectives.registry import ObjectiveSpec  # noqa: F401
from vlmray.recipes import RECIPES  # noqa: F401

# --- recipes (each helper appends its own below this line) --------------------------------
