r"""DeCLIP's self-supervision within each modality (Li et al., ICLR 2022, "Supervision Exists
Everywhere: A Data Efficient Contrastive Language-Image Pre-training Paradigm").

- ``simsiam`` (ISS, image self-supervision): SimSiam (Chen & He, 2021, "Exploring Simple Siamese
  Representation Learning") between two views of each image.
- ``mlm`` (TSS, text self-supervision): BERT's masked language modelling on the caption.

Both heads are created in ``setup`` from the model's widths and trained with the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.data.schema import MLM_LABELS
from vlmray.models.outputs import IMAGE_VIEW_EMBEDS, MLM_STATES
from vlmray.objectives.base import LossResult, Objective, SetupContext
from vlmray.objectives.contrastive.clip import require
from vlmray.objectives.contrastive.declip import view_of
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs

IGNORE = -100
"""``MLM_LABELS`` value of an unmasked token (not scored)."""


def _not_set_up(objective: str, head: str) -> ValueError:
    return ValueError(f"objective {objective!r} has no {head} yet: call setup(SetupContext) "
                      "first (ObjectiveMix.setup does, before the optimiser is built)")


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """D(p, z) = -p/|p| . z/|z| per row: (B, D), (B, D) -> (B,)."""
    return -F.cosine_similarity(p, z, dim=-1)


@register_objective("simsiam")
class SimSiamLoss(Objective):
    r"""DeCLIP's ISS: SimSiam between the batch's image x1 and an augmented view x2.

        z_k = g(e_k),  p_k = h(z_k),   L = 1/2 [ D(p_1, sg(z_2)) + D(p_2, sg(z_1)) ]

    e_1 = ``out.image_embeds``, e_2 = ``extra["image_view_embeds"][:, view]`` (B, D); g the
    optional projector (``projector=True``: SimSiam's 3 layers D -> D -> D -> D, BN after each
    Linear, ReLU after the first two, the last BN without affine), else the identity; h the
    predictor D -> hidden -> D (Linear-BN-ReLU-Linear, SimSiam's bottleneck of D/4 by
    default); D the negative cosine; sg the stop-gradient; each D a mean over the rows.
    Deviation: DeCLIP's code feeds the unnormalised image features to g; here e_k are the
    L2-normalised embeddings (the outputs every objective shares; g and h start with a Linear
    and BN, and D is scale-free).

    Data parallelism. The loss has no cross-sample term, but the BatchNorm layers do: in
    training mode each normalises with its batch's mean and variance. Here every worker uses
    the statistics of its own B rows (plain ``BatchNorm1d``), so a W-worker step equals the
    mean of W single-process steps on the W local batches, not one step on the global batch
    (a test shows the difference). SimSiam's reference code converts BN to SyncBN
    (global statistics); vlmray does not wrap objectives for that. Each view goes through the
    heads in its own call, so the statistics are per view as in SimSiam.
    """

    needs = frozenset({"image_embeds", IMAGE_VIEW_EMBEDS})

    @dataclass(kw_only=True)
    class Config:
        view: int = 0
        """Which of ``data.views.image`` is x2 (index into the (B, V, D) view embeddings)."""
        projector: bool = False
        """Put SimSiam's projector g (D -> D) between the embeddings and the predictor."""
        hidden: int = 0
        """Width of the predictor's bottleneck; 0 means D // 4 (SimSiam: 2048 -> 512)."""

        def __post_init__(self) -> None:
            if self.view < 0:
                raise ValueError(f"simsiam: view must be >= 0, got {self.view}")
            if self.hidden < 0:
                raise ValueError(f"simsiam: hidden must be >= 0 (0: D // 4), got {self.hidden}")

    def __init__(self, cfg: SimSiamLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else SimSiamLoss.Config()
        self.projector: nn.Module | None = None
        self.predictor: nn.Module | None = None

    def setup(self, ctx: SetupContext) -> None:
        """g and h sized from D = ``ctx.embed_dim``."""
        d = ctx.embed_dim
        hidden = self.cfg.hidden or max(1, d // 4)
        self.projector = nn.Sequential(
            nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(),
            nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(),
            nn.Linear(d, d, bias=False), nn.BatchNorm1d(d, affine=False),
        ) if self.cfg.projector else nn.Identity()
        self.predictor = nn.Sequential(
            nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, d),
        )

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L over this rank's rows (see the class docstring for BatchNorm across workers)."""
        if self.projector is None or self.predictor is None:
            raise _not_set_up(self.name, "predictor")
        e1 = require(out, "image_embeds", self.name)                        # (B, D)
        e2 = view_of(out, IMAGE_VIEW_EMBEDS, self.cfg.view, self.name)      # (B, D)
        z1, z2 = self.projector(e1), self.projector(e2)                     # (B, D) each
        p1, p2 = self.predictor(z1), self.predictor(z2)                     # (B, D) each
        loss = 0.5 * (negative_cosine(p1, z2.detach()).mean()
                      + negative_cosine(p2, z1.detach()).mean())
        with torch.no_grad():
            # SimSiam's collapse monitor: ~1/sqrt(D) when spread out, 0 when collapsed.
            z_std = F.normalize(z1.double(), dim=-1).std(dim=0).mean()
            views_cos = F.cosine_similarity(z1.double(), z2.double(), dim=-1).mean()
            values = torch.stack([z_std, views_cos]).tolist()
        return LossResult(loss=loss, metrics=dict(zip(("z_std", "views_cos"), values)))


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
            raise _not_set_up(self.name, "head")
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
            values = torch.stack([acc, total.to(acc)]).tolist()
        return LossResult(loss=loss, metrics=dict(zip(("acc", "masked_tokens"), values)))

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


__all__ = ["MLMLoss", "SimSiamLoss", "negative_cosine"]
