r"""CLIP's symmetric InfoNCE loss (Radford et al., 2021, "Learning Transferable Visual Models
From Natural Language Supervision").

For a global batch of N pairs with L2-normalised embeddings u_i (image), v_i (text) and the
learned inverse temperature s = exp(t):

    L = 1/(2N) sum_i [ -log( exp(s u_i.v_i) / sum_j exp(s u_i.v_j) )
                       -log( exp(s v_i.u_i) / sum_j exp(s v_i.u_j) ) ]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmray.objectives.base import LossResult, Objective, require, stack_metrics
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs

Gather = Literal["local", "global", "local_nograd"]


@register_objective("clip")
class ClipLoss(Objective):
    r"""CLIP's symmetric InfoNCE over image-text pairs gathered from all W workers.

        L = 1/(2N) sum_i [ CE(s u_i V^T, i) + CE(s v_i U^T, i) ]

    With ``gather="local"`` worker r scores only its B = N/W rows against all N columns
    (logits B x N, labels ``r*B + arange(B)``) and L_r averages its B rows, so
    (1/W) sum_r L_r = L and, with gather-with-grad and DDP's gradient average, the gradients
    equal the single-process ones. ``"global"`` computes the full N x N on every rank (same loss
    and gradients, W times the compute). ``"local_nograd"`` gathers detached features (open_clip's
    ``gather_with_grad=False``): same loss, but gradients miss the other ranks' terms.
    """

    needs = frozenset({"image_embeds", "text_embeds", "logit_scale"})

    @dataclass(kw_only=True)
    class Config:
        gather: Gather = "local"
        """local: B x N logits, exact grads; global: N x N per rank; local_nograd: detached."""
        label_smoothing: float = 0.0
        """epsilon of the label-smoothed cross-entropy, in [0, 1)."""

        def __post_init__(self) -> None:
            if not 0.0 <= self.label_smoothing < 1.0:
                eps = self.label_smoothing
                raise ValueError(f"clip: label_smoothing must be in [0, 1), got {eps}")

    def __init__(self, cfg: ClipLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else ClipLoss.Config()

    def logits(
        self, image: Tensor, text: Tensor, logit_scale: Tensor, dist: Dist
    ) -> tuple[Tensor, Tensor]:
        """(per_image, per_text) = (s U_r V^T, s V_r U^T), each (B, N); (N, N) if global.

        image, text: (B, D) this worker's normalised embeddings; logit_scale: () = s.
        """
        if image.shape != text.shape:
            raise ValueError(f"clip: image {tuple(image.shape)} and text {tuple(text.shape)} differ")
        pairs = torch.stack((image, text), dim=1)  # (B, 2, D): one collective for both
        gathered = dist.all_gather(pairs, with_grad=self.cfg.gather != "local_nograd")  # (N, 2, D)
        all_image, all_text = gathered.unbind(dim=1)  # (N, D) each
        if self.cfg.gather == "global":
            per_image = logit_scale * all_image @ all_text.T  # (N, N)
            return per_image, per_image.T
        return logit_scale * image @ all_text.T, logit_scale * text @ all_image.T  # (B, N) each

    def targets(self, logits: Tensor, dist: Dist) -> Tensor:
        """Index of each row's positive column, int64 (rows,): arange(N) or r*B + arange(B)."""
        rows = logits.shape[0]
        if self.cfg.gather == "global":
            return torch.arange(rows, dtype=torch.long, device=logits.device)
        return dist.offsets(rows, device=logits.device)

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r = (CE(per_image, y) + CE(per_text, y)) / 2, each CE a mean over this rank's rows."""
        image = require(out, "image_embeds", self.name)
        text = require(out, "text_embeds", self.name)
        logit_scale = require(out, "logit_scale", self.name)
        per_image, per_text = self.logits(image, text, logit_scale, dist)
        labels = self.targets(per_image, dist)
        eps = self.cfg.label_smoothing
        loss = 0.5 * (
            F.cross_entropy(per_image, labels, label_smoothing=eps)
            + F.cross_entropy(per_text, labels, label_smoothing=eps)
        )
        return LossResult(loss=loss, metrics=self.metrics(per_image, per_text, labels, logit_scale))

    @staticmethod
    @torch.no_grad()
    def metrics(
        per_image: Tensor, per_text: Tensor, labels: Tensor, logit_scale: Tensor
    ) -> dict[str, Tensor]:
        """In-batch top-1 accuracy both ways (over this rank's rows) and the current scale s,
        as float64 0-d tensors on the device (no host sync)."""
        acc_i2t = (per_image.argmax(dim=1) == labels).double().mean()
        acc_t2i = (per_text.argmax(dim=1) == labels).double().mean()
        return stack_metrics(("acc_i2t", "acc_t2i", "logit_scale"),
                             (acc_i2t, acc_t2i, logit_scale.detach().double().reshape(())))


__all__ = ["ClipLoss"]
