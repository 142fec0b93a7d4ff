r"""KELIP's multi-crop contrastive loss (Ko & Gu, 2022, "Large-scale Bilingual Language-Image
Contrastive Learning").

KELIP trains CLIP with multi-crop augmentation (SwAV's global and local crops): every crop of an
image is a positive for the image's caption. With the plain image embedding u^0 = ``image_
embeds`` and the V augmented views u^1..u^V (``image_view_embeds``, ``data.views.image``: e.g.
one ``global`` and two ``local`` crops), captions v and CLIP's scale s, the loss averages CLIP's
symmetric InfoNCE (``vlmray.objectives.contrastive.clip``) over the V + 1 image sets:

    L = 1/(V+1) sum_{k=0}^{V} 1/(2N) sum_i [ CE(s u^k_i V^T, i) + CE(s v_i (U^k)^T, i) ]

Each term is ``clip``'s loss, gathered across workers the same way (``gather="local"``: B x N
logits per rank with a gather with gradient, so the averaged gradients equal the single-process
ones). ``include_image=False`` drops the k = 0 term (views only).

Deviations (our reading): KELIP feeds the local crops at a lower resolution (SwAV's 96 px
beside 224 px); ``data.views`` resizes every crop to the full side S. KELIP also initialises
the image encoder from MAE pre-training; ``kelip_tiny`` trains ``mim`` jointly instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmray.models.outputs import IMAGE_VIEW_EMBEDS
from vlmray.objectives.base import LossResult, Objective, require
from vlmray.objectives.contrastive.clip import ClipLoss, Gather
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs


@register_objective("multicrop_clip")
class MultiCropClipLoss(Objective):
    r"""CLIP's InfoNCE of the plain image and of every augmented crop against the captions,
    averaged over the V + 1 image sets (module docstring: L, deviations)."""

    needs = frozenset({"image_embeds", "text_embeds", "logit_scale", IMAGE_VIEW_EMBEDS})

    @dataclass(kw_only=True)
    class Config:
        gather: Gather = "local"
        """As ``clip``: local (B x N logits, exact grads), global (N x N), local_nograd."""
        label_smoothing: float = 0.0
        """epsilon of the label-smoothed cross-entropy, in [0, 1)."""
        include_image: bool = True
        """Average the plain image embedding's term in with the views' terms."""

        def __post_init__(self) -> None:
            if not 0.0 <= self.label_smoothing < 1.0:
                raise ValueError(f"multicrop_clip: label_smoothing must be in [0, 1), got "
                                 f"{self.label_smoothing}")
            if self.gather not in ("local", "global", "local_nograd"):
                raise ValueError(f"multicrop_clip: gather {self.gather!r} is not one of "
                                 "'local', 'global', 'local_nograd'")

    def __init__(self, cfg: MultiCropClipLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else MultiCropClipLoss.Config()
        self.clip = ClipLoss(ClipLoss.Config(gather=self.cfg.gather,
                                             label_smoothing=self.cfg.label_smoothing))

    def image_sets(self, out: Outputs) -> list[Tensor]:
        """[u^0 (B, D) if include_image, u^1 .. u^V (B, D)], checked."""
        image = require(out, "image_embeds", self.name)
        if IMAGE_VIEW_EMBEDS not in out.extra:
            raise ValueError(f"objective {self.name!r} needs Outputs.extra"
                             f"[{IMAGE_VIEW_EMBEDS!r}]: set data.views.image (e.g. "
                             "['global', 'local', 'local'])")
        views = out.extra[IMAGE_VIEW_EMBEDS]
        if views.ndim != 3 or views.shape[0] != image.shape[0] or views.shape[1] < 1:
            raise ValueError(f"multicrop_clip: need image_view_embeds (B, V >= 1, D) for B = "
                             f"{image.shape[0]}, got {tuple(views.shape)}")
        return ([image] if self.cfg.include_image else []) + list(views.unbind(dim=1))

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r = mean over image sets of clip's L_r (image set k against the captions)."""
        text = require(out, "text_embeds", self.name)
        scale = require(out, "logit_scale", self.name)
        eps = self.cfg.label_smoothing
        terms, first = [], None
        for image in self.image_sets(out):
            per_image, per_text = self.clip.logits(image, text, scale, dist)
            labels = self.clip.targets(per_image, dist)
            terms.append(0.5 * (F.cross_entropy(per_image, labels, label_smoothing=eps)
                                + F.cross_entropy(per_text, labels, label_smoothing=eps)))
            first = first or (per_image, per_text, labels)
        loss = torch.stack(terms).mean()
        metrics = ClipLoss.metrics(*first, scale)     # accuracies of the first image set
        values = list(torch.stack([t.detach().double() for t in terms]).unbind())
        if self.cfg.include_image:
            metrics["loss_image"] = values.pop(0)
        views = values[0]
        for v in values[1:]:            # summed in order, as Python's sum() of floats did
            views = views + v
        metrics["loss_views"] = views / len(values)
        return LossResult(loss=loss, metrics=metrics)


__all__ = ["MultiCropClipLoss"]
