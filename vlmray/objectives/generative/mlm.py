r"""DeCLIP's text self-supervision, TSS (Li et al., ICLR 2022, "Supervision Exists Everywhere: A
Data Efficient Contrastive Language-Image Pre-training Paradigm"): BERT's masked language
modelling on the caption. Its image counterpart (ISS) is ``simsiam``
(``vlmray.objectives.contrastive.simsiam``).

The head is created in ``setup`` from the model's widths and trained with the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.data.schema import MLM_LABELS
from vlmray.models.outputs import MLM_STATES
from vlmray.objectives.base import LossResult, Objective, SetupContext, not_set_up, stack_metrics
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs

IGNORE = -100
"""``MLM_LABELS`` value of an unmasked token (not scored)."""


@register_objective("mlm")
class MLMLoss(Objective):
    r"""DeCLIP's TSS: masked language modelling on the caption (BERT's MLM).

        L = -1/M sum_{(i, l) in masked} log softmax(f(h_{i,l}))[y_{i,l}]

    h = ``extra["mlm_states"]`` (B, L, C), the text tower's states on the masked caption
    (``schema.MLM_TOKENS``); y = ``batch["mlm_labels"]`` (B, L), -100 where not masked; f the
    head Linear(C, C)-GELU-LayerNorm-Linear(C, V) (BERT's transform and decoder, untied);
    M the number of masked tokens in the GLOBAL batch.

    Exact under data parallelism: the ranks mask different numbers of tokens, so a per-rank
    mean would weight each rank's tokens by 1/M_r. Rank r instead returns
    L_r = W/M * sum_{masked on r} CE, with M all-reduced over ranks (a count: no gradient),
    so (1/W) sum_r L_r = L and the DDP-averaged gradients equal the single-process ones.
    With no masked token anywhere the loss is 0 (graph kept, zero gradients).
    """

    needs = frozenset({MLM_STATES, MLM_LABELS})

    @dataclass(kw_only=True)
    class Config:
        label_smoothing: float = 0.0
        """epsilon of the label-smoothed cross-entropy, in [0, 1) (BERT: 0)."""

        def __post_init__(self) -> None:
            if not 0.0 <= self.label_smoothing < 1.0:
                eps = self.label_smoothing
                raise ValueError(f"mlm: label_smoothing must be in [0, 1), got {eps}")

    def __init__(self, cfg: MLMLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else MLMLoss.Config()
        self.head: nn.Module | None = None

    def setup(self, ctx: SetupContext) -> None:
        """f sized from C = ``ctx.text_width`` and V = ``ctx.vocab_size``."""
        c, vocab = ctx.text_width, ctx.vocab_size
        if c <= 0 or vocab <= 0:
            raise ValueError(f"mlm needs a text tower and a vocabulary; got width C={c}, "
                             f"vocab_size={vocab}")
        self.head = nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.LayerNorm(c), nn.Linear(c, vocab))

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r = sum of CE over this rank's masked tokens / (M / W)."""
        if self.head is None:
            raise not_set_up(self.name, "head")
        states, labels = self.inputs(batch, out)                            # (B, L, C), (B, L)
        masked = labels != IGNORE                                           # (B, L)
        logits = self.head(states[masked])                                  # (M_r, V)
        targets = labels[masked]                                            # (M_r,)
        ce_sum = F.cross_entropy(logits, targets, reduction="sum",
                                 label_smoothing=self.cfg.label_smoothing)
        total = dist.all_reduce_sum(masked.sum().double())                  # M, no grad
        share = (total / dist.world_size).clamp(min=1.0 / dist.world_size)  # M / W, > 0
        loss = ce_sum / share.to(ce_sum)
        with torch.no_grad():
            hits = (logits.argmax(dim=-1) == targets).double().sum()
            acc = hits / masked.sum().clamp(min=1)
            metrics = stack_metrics(("acc", "masked_tokens"), (acc, total.to(acc)))
        return LossResult(loss=loss, metrics=metrics)

    def inputs(self, batch: Mapping[str, Tensor], out: Outputs) -> tuple[Tensor, Tensor]:
        """(h (B, L, C), y (B, L) int64), or a clear error naming what is missing."""
        if MLM_STATES not in out.extra:
            raise ValueError(f"objective {self.name!r} needs Outputs.extra[{MLM_STATES!r}]: set "
                             "data.views.mlm_prob > 0 and run the model with this objective's "
                             "needs")
        if MLM_LABELS not in batch:
            raise ValueError(f"objective {self.name!r} needs the batch column {MLM_LABELS!r} "
                             "(data.views.mlm_prob > 0)")
        states, labels = out.extra[MLM_STATES], batch[MLM_LABELS].long()
        if states.shape[:2] != labels.shape:
            raise ValueError(f"mlm: states {tuple(states.shape)} and labels "
                             f"{tuple(labels.shape)} disagree on (B, L)")
        return states, labels


__all__ = ["MLMLoss"]
