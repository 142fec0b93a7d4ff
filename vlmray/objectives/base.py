"""The objective contract: a small module that turns a batch and model outputs into a loss."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs


@dataclass(frozen=True)
class SetupContext:
    """What an objective may size its own parameters from, given once before the optimiser is
    built (``Objective.setup``)."""

    model: nn.Module
    """The core (unwrapped) model; e.g. OTTER copies it into an EMA teacher. Do not register it
    as a submodule of the objective (its parameters belong to the model)."""
    embed_dim: int
    """D, the width of ``Outputs.image_embeds`` / ``text_embeds`` / ``*_tokens``."""
    text_width: int
    """C, the text tower's hidden width (``Outputs.extra["mlm_states"]``)."""
    vocab_size: int
    """The tokenizer's vocabulary size (MLM heads)."""


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

    def setup(self, ctx: SetupContext) -> None:
        """Create parameters that depend on the model (heads, predictors, a teacher). Called
        once by ``ObjectiveMix.setup`` before the optimiser is built and a checkpoint loads.
        Default: nothing."""

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        raise NotImplementedError


__all__ = ["LossResult", "Objective", "SetupContext"]
