"""vlmray: pretrain vision-language models on Ray.

    import vlmray
    cfg = vlmray.recipe("clip_tiny", **{"train.steps": 100})
    result = vlmray.run(cfg, output="runs/demo")
    result.metrics["zero_shot_top1"]

Attributes load lazily, so ``import vlmray.data...`` stays light (no torch, no Ray).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Config": "vlmray.config", "ConfigError": "vlmray.config", "apply_overrides": "vlmray.config",
    "validate": "vlmray.config", "RunResult": "vlmray.api", "run": "vlmray.api",
    "list_recipes": "vlmray.recipes", "recipe": "vlmray.recipes",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlmray' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
