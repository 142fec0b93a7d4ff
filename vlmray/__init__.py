"""vlmray: pretrain vision-language models on Ray.

    import vlmray
    cfg = vlmray.recipe("clip_tiny", **{"train.steps": 100})
    result = vlmray.run(cfg, output="runs/demo")
    result.metrics["zero_shot_top1"]

Attributes load lazily, so ``import vlmray.data...`` stays light (no torch, no Ray).

Layers (``tests/test_layers.py`` holds them): each imports only itself and those before it.

    config -> _registry, runtime -> distributed -> data -> eval -> models -> objectives
    -> train -> embedders -> rewrite -> retrieval -> api, validate, recipes, pipelines -> cli

``eval`` sits below ``models``: it is the measuring kit (held-out loading, metrics, caption and
grounding scores) that models and objectives measure themselves with, and it names the model
and the objectives it drives by Protocols. ``embedders`` (models rebuilt from checkpoints to
score and embed with) sits above ``train``, and the stages that use them are handed a resolved
model. ``pipelines`` is the one home of composed plans (the training feed, curate, rewrite,
index); ``jobs/`` scripts only parse flags and call it.
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
    "validate": "vlmray.validate", "RunResult": "vlmray.api", "run": "vlmray.api",
    "list_recipes": "vlmray.recipes", "recipe": "vlmray.recipes",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlmray' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
