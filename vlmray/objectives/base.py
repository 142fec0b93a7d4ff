"""The objective contract: a small module that turns a batch and model outputs into a loss."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs


@dataclass
class LossResult:
    """A scalar loss plus detached scalar metrics for logging (names without a prefix)."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class. Subclasses set ``name`` and ``needs`` and implement ``forward``.

    ``needs`` lists the ``Outputs`` fields and batch columns the objective reads, so the model
    computes only what the active objectives use.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        raise NotImplementedError


__all__ = ["LossResult", "Objective"]
