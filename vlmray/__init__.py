"""vlmray: pretrain vision-language models on Ray.

    import vlmray
    cfg = vlmray.recipe("clip_tiny", **{"train.steps": 100})
    result = vlmray.run(cfg, output="runs/demo")
    result.metrics["zero_shot_top1"]

Attributes load lazily, so ``import vlmray.data...`` stays light (no torch, no Ray).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Ray reads this once, when it is first imported: without it, a loopback RAY_ADDRESS
# (127.0.0.1) is rewritten to the machine's IP, where a loopback-only head does not listen.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

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
