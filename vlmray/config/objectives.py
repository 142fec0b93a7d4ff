"""One term of the training loss as a recipe holds it: a registry name, a weight and the
objective's own parameters (checked against the objective's ``Config`` by
``vlmray.objectives.registry``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)


class ObjectiveSpec:
    """One term of the training loss: ``weight * objective(name, **params)``."""

    name: str
    """Registry name, e.g. ``"clip"`` (see ``list_objectives()``)."""
    weight: float = 1.0
    """Non-negative weight w_i in ``sum_i w_i * loss_i``."""
    params: dict[str, Any] = field(default_factory=dict)
    """Fields of the objective's ``Config``; unknown names are rejected."""


__all__ = ["ObjectiveSpec"]
