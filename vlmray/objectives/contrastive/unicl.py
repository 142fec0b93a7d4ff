r"""UniCL's unified contrastive loss (Yang et al., 2022, "Unified Contrastive Learning in
Image-Text-Label Space").

Image-label data and image-text data share one batch: a row carries a class label y_i >= 0, or
y_i = -1 when it is a caption-only web pair. Pairs (i, j) of the global batch of N are positives
when both rows carry the same label; a caption-only row is positive only with itself:

    P_i = { j : y_i = y_j >= 0 } ∪ { i }

With L2-normalised embeddings u_i (image), v_i (text) and the learned inverse temperature s:

    L_i2t = -1/N sum_i 1/|P_i| sum_{j in P_i} log( exp(s u_i.v_j) / sum_k exp(s u_i.v_k) )
    L_t2i = -1/N sum_j 1/|P_j| sum_{i in P_j} log( exp(s v_j.u_i) / sum_k exp(s v_j.u_k) )
    L     = (L_i2t + L_t2i) / 2

With all labels distinct (or all -1) every P_i = {i} and L is CLIP's symmetric InfoNCE.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from vlmray.data.schema import LABEL
from vlmray.objectives.base import LossResult, Objective, require, stack_metrics
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs


def multi_positive_nce(logits: Tensor, positives: Tensor) -> Tensor:
    """-mean_i 1/|P_i| sum_{j in P_i} log_softmax(logits)_ij.

    logits: (R, N) scores of R rows against N columns; positives: bool (R, N), >= 1 per row.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-softmax of half-precision logits loses the small terms
    log_prob = logits.log_softmax(dim=1)  # (R, N)
    weights = positives.to(log_prob.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True)  # y_ij / |P_i|
    return -(weights * log_prob).sum(dim=1).mean()


@register_objective("unicl")
class UniClLoss(Objective):
    r"""UniCL's bidirectional multi-positive InfoNCE, targets from label equality.

        L = 1/2 [ NCE+(s U V^T, Y) + NCE+(s V U^T, Y) ],   Y_ij = [j in P_i]

    where NCE+ averages -log softmax over each row's positives (Y is symmetric, so one matrix
    serves both directions). Labels come from the batch column ``label`` (int64 (B,), -1 for
    caption-only rows); they are gathered without gradient, the embeddings with gradient.

    With ``gather="local"`` worker r scores its B rows against all N columns (logits and
    targets B x N; row i of rank r is global row r*B + i) and averages its B rows, so
    (1/W) sum_r L_r = L and, with gather-with-grad and DDP's gradient average, the gradients
    equal the single-process ones. ``"global"`` computes the N x N problem on every rank.
    """

    needs = frozenset({"image_embeds", "text_embeds", "logit_scale", LABEL})

    @dataclass(kw_only=True)
    class Config:
        gather: Literal["local", "global"] = "local"
        """local: B x N logits per rank, exact grads; global: N x N on every rank."""

    def __init__(self, cfg: UniClLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else UniClLoss.Config()

    def logits(
        self, image: Tensor, text: Tensor, logit_scale: Tensor, dist: Dist
    ) -> tuple[Tensor, Tensor]:
        """(per_image, per_text) = (s U_r V^T, s V_r U^T), each (B, N); (N, N) if global."""
        if image.shape != text.shape:
            raise ValueError(f"unicl: image {tuple(image.shape)} and text {tuple(text.shape)} "
                             "differ")
        pairs = torch.stack((image, text), dim=1)  # (B, 2, D): one collective for both
        all_image, all_text = dist.all_gather(pairs, with_grad=True).unbind(dim=1)  # (N, D)
        if self.cfg.gather == "global":
            per_image = logit_scale * all_image @ all_text.T  # (N, N)
            return per_image, per_image.T
        return logit_scale * image @ all_text.T, logit_scale * text @ all_image.T  # (B, N)

    def targets(self, labels: Tensor, dist: Dist) -> Tensor:
        """Y: bool (B, N) (or (N, N) if global), Y_ij = [y_i = y_j >= 0] or [i = j].

        labels: int64 (B,) this rank's labels, -1 for caption-only rows.
        """
        all_labels = dist.all_gather(labels, with_grad=False)  # (N,)
        columns = torch.arange(all_labels.shape[0], device=labels.device)  # (N,)
        if self.cfg.gather == "global":
            rows, row_labels = columns, all_labels
        else:
            rows, row_labels = dist.offsets(labels.shape[0], device=labels.device), labels
        same = (row_labels[:, None] == all_labels[None, :]) & (row_labels[:, None] >= 0)
        return same | (rows[:, None] == columns[None, :])

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r = (NCE+(per_image, Y) + NCE+(per_text, Y)) / 2, means over this rank's rows."""
        image = require(out, "image_embeds", self.name)
        text = require(out, "text_embeds", self.name)
        logit_scale = require(out, "logit_scale", self.name)
        labels = self.batch_labels(batch, image)
        per_image, per_text = self.logits(image, text, logit_scale, dist)
        positives = self.targets(labels, dist)
        loss = 0.5 * (multi_positive_nce(per_image, positives)
                      + multi_positive_nce(per_text, positives))
        return LossResult(loss=loss, metrics=self.metrics(per_image, per_text, positives,
                                                          labels, logit_scale))

    def batch_labels(self, batch: Mapping[str, Tensor], image: Tensor) -> Tensor:
        """The batch's ``label`` column as int64 (B,) on the embeddings' device."""
        if LABEL not in batch:
            raise ValueError(f"objective {self.name!r} needs the batch column {LABEL!r} (int64, "
                             f"-1 for caption-only rows); the batch has {sorted(batch)}")
        labels = torch.as_tensor(batch[LABEL]).to(device=image.device, dtype=torch.long)
        labels = labels.reshape(-1)
        if labels.shape[0] != image.shape[0]:
            raise ValueError(f"unicl: {labels.shape[0]} labels for {image.shape[0]} embeddings")
        return labels

    @staticmethod
    @torch.no_grad()
    def metrics(per_image: Tensor, per_text: Tensor, positives: Tensor, labels: Tensor,
                logit_scale: Tensor) -> dict[str, Tensor]:
        """Top-1 hits a positive (both ways), mean |P_i|, labelled fraction, and s."""
        def hit(logits: Tensor) -> Tensor:
            return positives.gather(1, logits.argmax(dim=1, keepdim=True)).double().mean()

        names = ("acc_i2t", "acc_t2i", "positives", "labelled", "logit_scale")
        return stack_metrics(names, (
            hit(per_image), hit(per_text), positives.sum(dim=1).double().mean(),
            (labels >= 0).double().mean(), logit_scale.detach().double().reshape(()),
        ))


__all__ = ["UniClLoss", "multi_positive_nce"]
