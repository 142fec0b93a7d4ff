r"""DeCLIP's image self-supervision, ISS (Li et al., ICLR 2022, "Supervision Exists Everywhere:
A Data Efficient Contrastive Language-Image Pre-training Paradigm"): SimSiam (Chen & He, 2021,
"Exploring Simple Siamese Representation Learning") between two views of each image. Its text
counterpart (TSS) is ``mlm`` (``vlmray.objectives.generative.mlm``).

The heads are created in ``setup`` from the model's width and trained with the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.models.outputs import IMAGE_VIEW_EMBEDS
from vlmray.objectives.base import (
    LossResult,
    Objective,
    SetupContext,
    not_set_up,
    require,
    stack_metrics,
)
from vlmray.objectives.contrastive.declip_mv import view_of
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs


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
            raise not_set_up(self.name, "predictor")
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
            metrics = stack_metrics(("z_std", "views_cos"), (z_std, views_cos))
        return LossResult(loss=loss, metrics=metrics)


__all__ = ["SimSiamLoss", "negative_cosine"]
