"""Objectives: small loss modules, a registry of them, and their weighted mix.

    from vlmray.objectives import ObjectiveMix, ObjectiveSpec
    mix = ObjectiveMix.from_specs([ObjectiveSpec(name="clip", params={"gather": "local"})])
    result = mix(batch, outputs, dist)         # LossResult(loss, metrics)
"""

from vlmray.objectives import (
    alignment,  # noqa: E402,F401  (registers "itm")
    contrastive,  # noqa: E402,F401  (registers "clip")
    generative,  # noqa: E402,F401  (registers "mim", "caption"...)
)
from vlmray.objectives.base import LossResult, Objective, SetupContext
from vlmray.objectives.mix import ObjectiveMix
from vlmray.objectives.registry import (
    OBJECTIVES,
    build_objective,
    list_objectives,
    register_objective,
    validate_spec,
    validate_specs,
)

__all__ = [
    "OBJECTIVES",
    "LossResult",
    "Objective",
    "ObjectiveMix",
    "SetupContext",
    "build_objective",
    "list_objectives",
    "register_objective",
    "validate_spec",
    "validate_specs",
]
