r"""DeCLIP's multi-view supervision, MVS (Li et al., ICLR 2022, "Supervision Exists Everywhere: A
Data Efficient Contrastive Language-Image Pre-training Paradigm").

One image-text pair holds more than one positive: two views of the image (x, x~) and two of the
caption (t, t~, here t~ an EDA rewrite) give 2 x 2 = 4 image-text pairs, each scored with CLIP's
InfoNCE against the other pairs of the global batch. With u^a the image views' and v^b the text
views' L2-normalised embeddings, s the learned inverse temperature and N the global batch:

    L_MVS = 1/4 sum_{a in {x, x~}} sum_{b in {t, t~}} L_CLIP(u^a, v^b)
    L_CLIP(u, v) = 1/(2N) sum_i [ -log softmax_j(s u_i.v_j)[i] - log softmax_j(s v_i.u_j)[i] ]

The (x, t) term is CLIP's own loss, so ``declip_mv`` replaces ``clip`` in a recipe. DeCLIP's
image and text self-supervision are ``simsiam`` and ``mlm`` (``contrastive/simsiam.py``,
``generative/mlm.py``); its nearest-neighbour supervision is ``declip_nns``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmray.models.outputs import IMAGE_VIEW_EMBEDS, TEXT_VIEW_EMBEDS
from vlmray.objectives.base import LossResult, Objective, require, stack_metrics
from vlmray.objectives.contrastive.clip import ClipLoss, Gather
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs

_PAIRS = ("it", "iT", "It", "IT")
"""Metric suffixes of the four pairs: i/t the batch's own image/caption, I/T the extra views."""


def view_of(out: Outputs, key: str, index: int, objective: str) -> Tensor:
    """``out.extra[key][:, index]`` (B, D), or a clear error naming the data option to set."""
    if key not in out.extra:
        option = "data.views.image" if key == IMAGE_VIEW_EMBEDS else "data.views.text"
        raise ValueError(f"objective {objective!r} needs Outputs.extra[{key!r}]: list a view in "
                         f"{option} and run the model with this objective's needs")
    views = out.extra[key]                                                  # (B, V, D)
    if not 0 <= index < views.shape[1]:
        raise ValueError(f"objective {objective!r}: view {index} of {key!r} does not exist; "
                         f"the batch has {views.shape[1]} view(s)")
    return views[:, index]                                                  # (B, D)


@register_objective("declip_mv")
class DeclipMVLoss(Objective):
    r"""L_MVS: the mean of CLIP's InfoNCE over the 4 (image view, text view) pairs.

        L = 1/4 [ L_CLIP(u, v) + L_CLIP(u, v~) + L_CLIP(u~, v) + L_CLIP(u~, v~) ]

    u = ``out.image_embeds``, u~ = ``extra["image_view_embeds"][:, image_view]``,
    v = ``out.text_embeds``, v~ = ``extra["text_view_embeds"][:, text_view]``.

    Each term is ``ClipLoss``'s: with ``gather="local"`` rank r scores its B rows against all N
    gathered columns (logits B x N, labels ``r*B + arange(B)``) and the gather carries gradient,
    so the mean over ranks of L_r is L and the DDP-averaged gradients equal the single-process
    ones; ``"global"`` computes the N x N logits on every rank.
    """

    needs = frozenset({"image_embeds", "text_embeds", "logit_scale", IMAGE_VIEW_EMBEDS,
                       TEXT_VIEW_EMBEDS})

    @dataclass(kw_only=True)
    class Config:
        image_view: int = 0
        """Which of ``data.views.image`` is u~ (index into the (B, V, D) view embeddings)."""
        text_view: int = 0
        """Which of ``data.views.text`` is v~ (DeCLIP: the ``eda`` rewrite)."""
        gather: Gather = "local"
        """As ``clip``: local (B x N, exact grads), global (N x N), local_nograd (detached)."""

        def __post_init__(self) -> None:
            for name in ("image_view", "text_view"):
                if getattr(self, name) < 0:
                    raise ValueError(f"declip_mv: {name} must be >= 0, got {getattr(self, name)}")

    def __init__(self, cfg: DeclipMVLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else DeclipMVLoss.Config()
        self.clip = ClipLoss(ClipLoss.Config(gather=self.cfg.gather))

    def views(self, out: Outputs) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """((u, u~), (v, v~)), each (B, D)."""
        images = (require(out, "image_embeds", self.name),
                  view_of(out, IMAGE_VIEW_EMBEDS, self.cfg.image_view, self.name))
        texts = (require(out, "text_embeds", self.name),
                 view_of(out, TEXT_VIEW_EMBEDS, self.cfg.text_view, self.name))
        return images, texts

    def pair_loss(self, image: Tensor, text: Tensor, logit_scale: Tensor,
                  dist: Dist) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """L_CLIP(u^a, v^b) on this rank's rows, and (per_image, per_text, labels) for metrics."""
        per_image, per_text = self.clip.logits(image, text, logit_scale, dist)  # (B, N) each
        labels = self.clip.targets(per_image, dist)                               # (B,)
        loss = 0.5 * (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels))
        return loss, per_image, per_text, labels

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r = 1/4 sum over the 4 pairs of ClipLoss's L_r."""
        logit_scale = require(out, "logit_scale", self.name)
        images, texts = self.views(out)
        losses, metrics = [], {}
        for name, (image, text) in zip(_PAIRS, ((i, t) for i in images for t in texts)):
            loss, per_image, per_text, labels = self.pair_loss(image, text, logit_scale, dist)
            losses.append(loss)
            if name == "it":
                metrics = ClipLoss.metrics(per_image, per_text, labels, logit_scale)
        total = torch.stack(losses).mean()
        metrics.update(stack_metrics((f"loss_{name}" for name in _PAIRS),
                                     (x.detach().double() for x in losses)))
        return LossResult(loss=total, metrics=metrics)


__all__ = ["DeclipMVLoss", "view_of"]
