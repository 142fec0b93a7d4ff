"""The objective contract: a small module that turns a batch and model outputs into a loss."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from vlmray.data.tokenize import Tokenizer
    from vlmray.distributed import Dist
    from vlmray.eval.heldout import HeldOut
    from vlmray.models.outputs import Outputs


def require(out: Outputs, name: str, objective: str) -> Tensor:
    """``out.<name>``, or a clear error when the model did not produce it."""
    value = getattr(out, name, None)
    if value is None:
        raise ValueError(f"objective {objective!r} needs Outputs.{name}; the model returned None")
    return value


def not_set_up(objective: str, part: str) -> ValueError:
    """The error for an objective used before ``setup`` created its ``part`` (a head...)."""
    return ValueError(f"objective {objective!r} has no {part} yet: call setup(SetupContext) "
                      "first (ObjectiveMix.setup does, before the optimiser is built)")


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
    image_size: int = 0
    """S, the side of the square training images (``schema.PIXELS`` is (B, 3, S, S))."""
    tokenizer: Tokenizer | None = None
    """The data's tokenizer (objectives that tokenise their own texts: NLIP's concepts)."""
    patch_grid: tuple[int, int, int] | None = None
    """(grid_h, grid_w, patch) of a ViT vision tower (``model.patch_grid``): the image is
    grid_h x grid_w patches of patch x patch pixels; None for towers without patches (CNNs)."""


Metric = Tensor | float | int
"""A training metric: a detached 0-d tensor, still on the device (no host sync), or a plain
number. ``host_metrics`` turns a dict of them into Python numbers."""


@dataclass
class LossResult:
    """A scalar loss plus detached scalar metrics for logging (names without a prefix).

    Metrics stay on the device (0-d tensors): reading one (``.item()``, ``float``) waits for
    the device, so the training loop converts them all at once, on logging steps only
    (``host_metrics``)."""

    loss: Tensor
    metrics: dict[str, Metric] = field(default_factory=dict)


def stack_metrics(names: Iterable[str], values: Iterable[Tensor]) -> dict[str, Tensor]:
    """``{name: value}`` for 0-d tensors ``values``, stacked into one detached tensor (one
    copy: a buffer among them may change later) and returned as 0-d views of it. ``stack``
    promotes them to a common dtype, as ``torch.stack(values).tolist()`` did before."""
    return dict(zip(names, torch.stack(list(values)).detach().unbind()))


def host_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` with every tensor moved to the host in ONE sync: the tensors are cast to
    float64 (exact for every float dtype, and for integers up to 2**53), concatenated on one
    device and read with a single ``.tolist()``. Each value comes back as ``.item()`` /
    ``.tolist()`` would give it (a float, an int for integer tensors, a bool for bool ones;
    a nested list for a tensor that is not 0-d). Other values pass through."""
    out = dict(metrics)
    keys = [k for k, v in metrics.items() if isinstance(v, Tensor)]
    if not keys:
        return out
    tensors = [metrics[k].detach() for k in keys]
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
    flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
    values = flat.tolist()                                     # the one host sync
    start = 0
    for key, t in zip(keys, tensors):
        chunk, start = values[start:start + t.numel()], start + t.numel()
        if t.ndim == 0:
            value = chunk[0]
            out[key] = (value if t.is_floating_point() else
                        bool(value) if t.dtype == torch.bool else int(value))
        else:                   # not a scalar: its nested list, rebuilt on the host (no sync)
            out[key] = torch.tensor(chunk, dtype=torch.float64).to(t.dtype).reshape(
                t.shape).tolist()
    return out


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

    def prepare(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Columns to add to the batch before the model's forward: inputs the objective
        corrupts itself, e.g. MIM's patch mask ``schema.PATCH_MASK``. Called every step on the
        local batch (same device as the batch). Default: none."""
        return {}

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: HeldOut, tokenizer: Tokenizer) -> dict[str, float]:
        """Held-out metrics this objective can measure with the parts it owns (caption
        decoders: generated-caption overlap; ITM: matching accuracy...), named distinctly
        (e.g. ``caption_bleu4``). ``model`` is the core model in eval mode, on the objective's
        device. Default: none."""
        return {}


__all__ = ["LossResult", "Metric", "Objective", "SetupContext", "host_metrics", "not_set_up",
           "require", "stack_metrics"]
