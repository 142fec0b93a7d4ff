"""``ObjectiveMix``: the training loss as a weighted sum of objectives, L = sum_i w_i * L_i."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vlmray.config.objectives import ObjectiveSpec
from vlmray.objectives.base import LossResult, Metric, Objective, SetupContext
from vlmray.objectives.registry import build_objective, check_mix

if TYPE_CHECKING:
    from vlmray.data.tokenize import Tokenizer
    from vlmray.distributed import Dist
    from vlmray.eval.heldout import HeldOut
    from vlmray.models.outputs import Outputs


class ObjectiveMix(nn.Module):
    """L = sum_i w_i * L_i over named objectives.

    Metrics: ``loss`` (the weighted total), ``loss/<name>`` (each objective's unweighted L_i)
    and each objective's own metrics as ``<name>/<metric>``; detached 0-d tensors on the
    device (no host sync per step): ``base.host_metrics`` reads them all in one sync.
    """

    def __init__(
        self, objectives: Mapping[str, Objective], weights: Mapping[str, float] | None = None
    ) -> None:
        super().__init__()
        if not objectives:
            raise ValueError("ObjectiveMix needs at least one objective")
        weights = dict(weights or {})
        stray = sorted(set(weights) - set(objectives))
        if stray:
            raise ValueError(f"weights for unknown objectives {stray}; have {sorted(objectives)}")
        self.objectives = nn.ModuleDict(dict(objectives))
        self.weights: dict[str, float] = {n: float(weights.get(n, 1.0)) for n in objectives}

    @classmethod
    def from_specs(cls, specs: Sequence[ObjectiveSpec]) -> ObjectiveMix:
        """Build every spec: the mix is checked (non-empty, distinct names), and building
        checks each spec's name, params and weight. ``vlmray.validate`` ran the same checks on
        the driver before any work; here they guard direct use of the library."""
        check_mix(specs)
        return cls({s.name: build_objective(s) for s in specs}, {s.name: s.weight for s in specs})

    def setup(self, ctx: SetupContext) -> ObjectiveMix:
        """Lets each objective create its model-dependent parameters; returns ``self``."""
        for obj in self.objectives.values():
            obj.setup(ctx)
        return self

    @property
    def needs(self) -> frozenset[str]:
        """Union of the objectives' ``needs``: what the model must produce."""
        return frozenset().union(*(obj.needs for obj in self.objectives.values()))

    def prepare(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``batch`` plus the columns the objectives add before the forward (``Objective.
        prepare``). Objectives that add the same column share the first one's (e.g. MIM and
        MMM share one patch mask); a column already in the batch is never replaced."""
        out = dict(batch)
        for obj in self.objectives.values():
            for key, value in obj.prepare(out).items():
                out.setdefault(key, value)
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: HeldOut, tokenizer: Tokenizer) -> dict[str, float]:
        """Every objective's own held-out metrics (``Objective.evaluate``); two objectives
        reporting the same name is an error."""
        metrics: dict[str, float] = {}
        for name, obj in self.objectives.items():
            was_training = obj.training
            obj.eval()
            found = obj.evaluate(model, data, tokenizer)
            obj.train(was_training)
            clash = sorted(set(found) & set(metrics))
            if clash:
                raise ValueError(f"objective {name!r} reports eval metrics {clash} that another "
                                 "objective already reported")
            metrics.update(found)
        return metrics

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """Run each objective and combine: loss = sum_i w_i * loss_i. No host sync: the
        metrics stay on the device (losses as float32, as they were always logged)."""
        results = {name: obj(batch, out, dist) for name, obj in self.objectives.items()}
        total = sum(self.weights[name] * r.loss for name, r in results.items())
        metrics: dict[str, Metric] = {"loss": total.detach().float()}
        for name, result in results.items():
            metrics[f"loss/{name}"] = result.loss.detach().float()
            metrics.update({f"{name}/{key}": v.detach() if isinstance(v, Tensor) else v
                            for key, v in result.metrics.items()})
        return LossResult(loss=total, metrics=metrics)


__all__ = ["ObjectiveMix"]
