r"""PyramidCLIP's hierarchical alignment (Gao, Liu, Xu, Zhang, Li, Ji and Shen, NeurIPS 2022,
"PyramidCLIP: Hierarchical Feature Alignment for Vision-language Model Pretraining").

A web caption describes its image only in part, and other images in the batch are often
compatible with it. PyramidCLIP therefore builds a pyramid of semantic levels on each side and
contrasts them level by level, with softened targets for the negatives:

    image levels   G  the global view           text levels   T_s  a summary of the caption
                   L  a local crop                            T_o  the original caption
                   R  detector ROI features                   T_a  object/attribute words

Peer-level alignment contrasts elements of the same granularity, (G, T_s), (L, T_o), (R, T_a);
cross-level alignment relates each modality's object level to the other modality's global
level, (R, T_s) and (G, T_a) (the pairing as we read the paper). Every pair
(X, Y) is a symmetric InfoNCE over the global batch of N rows with the softened targets

    y_ij = 1 - a          if j = i
    y_ij = a / (N - 1)    otherwise          (a: the softening epsilon)

    NCE_a(X, Y) = -1/N sum_i sum_j y_ij log( exp(s x_i.y_j) / sum_k exp(s x_i.y_k) )
    L(X, Y)     = ( NCE_a(X, Y) + NCE_a(Y, X) ) / 2

and the objective is L = L_peer + lambda L_cross, a sum over the peer pairs plus lambda times the
sum over the cross-level pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from vlmray.models.outputs import IMAGE_VIEW_EMBEDS, TEXT_VIEW_EMBEDS
from vlmray.objectives.base import LossResult, Objective, require, stack_metrics
from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs

IMAGE_LEVELS = ("global", "local")
"""G = ``Outputs.image_embeds``; L = ``extra[IMAGE_VIEW_EMBEDS][:, local_view]``."""
TEXT_LEVELS = ("caption", "summary", "attributes")
"""T_o = ``Outputs.text_embeds``; T_s, T_a = ``extra[TEXT_VIEW_EMBEDS][:, summary_view]``,
``[:, attribute_view]``."""
PEER_PAIRS = (("global", "summary"), ("local", "caption"), ("local", "attributes"))
"""(image level, text level) pairs of the same granularity; (L, T_a) stands in for (R, T_a)."""
CROSS_PAIRS = (("global", "attributes"), ("local", "summary"))
"""Cross-level pairs: the object words with the global image, and (L, T_s) for (R, T_s)."""


def softened_nce(logits: Tensor, labels: Tensor, softening: float) -> Tensor:
    """-mean_i [ (1-a) log p_{i,y_i} + a/(N-1) sum_{j != y_i} log p_ij ], p = softmax(logits).

    logits: (R, N) scores of R rows against N columns; labels: int64 (R,) positive columns.
    The positive keeps 1 - a and the N - 1 negatives share a (PyTorch's ``label_smoothing=e``
    instead spreads e over all N columns, the positive's included: e = a N / (N - 1)).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-softmax of half-precision logits loses the small terms
    log_prob = logits.log_softmax(dim=1)  # (R, N)
    positive = log_prob.gather(1, labels[:, None]).squeeze(1)  # (R,)
    columns = logits.shape[1]
    if softening == 0.0 or columns == 1:
        return -positive.mean()
    negatives = log_prob.sum(dim=1) - positive  # (R,) sum over the N - 1 negatives
    return -((1.0 - softening) * positive + softening / (columns - 1) * negatives).mean()


@register_objective("pyramidclip")
class PyramidClipLoss(Objective):
    r"""Peer-level and cross-level softened InfoNCE over vlmray's image and text levels.

        L = ( w_p sum_{(X,Y) in peer} L(X, Y) + w_c sum_{(X,Y) in cross} L(X, Y) )
            / ( 3 w_p + 2 w_c )

        peer  = (G, T_s), (L, T_o), (L, T_a)        cross = (G, T_a), (L, T_s)

    with L(X, Y) the symmetric softened InfoNCE of the module docstring. The paper's sum
    L_peer + lambda L_cross is this with w_p = 1, w_c = lambda, divided by the constant
    3 + 2 lambda, so the objective sits on one InfoNCE's scale (log N at chance) and a mix
    weight means the same thing here as for ``clip``.

    Levels. G is the model's image embedding, L the augmented ``local`` crop view
    (``data.views.image``), T_o the caption, T_s / T_a the derived ``summary`` / ``attributes``
    texts (``data.views.text``). The paper's third image level, ROI features of a pretrained
    object detector with their category and attribute tags, is not available: vlmray runs no
    detector. Its text counterpart T_a (content words of the caption) is therefore aligned with
    the local crop, the closest thing we have to a region: a zoomed-in part of the image, where
    a few objects fill the view, as the ROIs do. (R, T_a) becomes (L, T_a) and the cross-level
    (R, T_s) becomes (L, T_s); (G, T_a) is kept. The pairs are the module constants
    ``PEER_PAIRS`` and ``CROSS_PAIRS``. Add ``clip`` to the mix to also contrast (G, T_o).

    Distribution. The five (B, D) levels are gathered with gradient in one collective. With
    ``gather="local"`` rank r scores its B rows against all N columns for every pair (logits
    B x N, labels ``r*B + arange(B)`` from ``ClipLoss.targets``) and averages its B rows, so
    (1/W) sum_r L_r = L and, with DDP's gradient average, the gradients equal one process's on
    the full batch; the softened targets need only N, the number of columns, which every rank
    knows. ``"global"`` computes the N x N logits of each pair on every rank.
    """

    needs = frozenset({"image_embeds", "text_embeds", "logit_scale", IMAGE_VIEW_EMBEDS,
                       TEXT_VIEW_EMBEDS})

    @dataclass(kw_only=True)
    class Config:
        local_view: int = 0
        """Slot of the ``local`` crop in ``data.views.image`` (``IMAGE_VIEW_EMBEDS[:, slot]``)."""
        summary_view: int = 0
        """Slot of the ``summary`` text in ``data.views.text`` (``TEXT_VIEW_EMBEDS[:, slot]``)."""
        attribute_view: int = 1
        """Slot of the ``attributes`` text in ``data.views.text``; differs from summary_view."""
        peer_weight: float = 1.0
        """w_p, weight of each peer-level pair; >= 0."""
        cross_weight: float = 1.0
        """w_c (the paper's lambda relative to w_p), weight of each cross-level pair; >= 0."""
        softening: float = 0.2
        """a, target mass moved from the positive to the N - 1 negatives; in [0, 1)."""
        gather: Literal["local", "global"] = "local"
        """local: B x N logits per rank, exact grads; global: N x N on every rank."""

        def __post_init__(self) -> None:
            for name in ("local_view", "summary_view", "attribute_view"):
                slot = getattr(self, name)
                if isinstance(slot, bool) or not isinstance(slot, int) or slot < 0:
                    raise ValueError(f"pyramidclip: {name} must be an int >= 0, got {slot!r}")
            if self.summary_view == self.attribute_view:
                raise ValueError("pyramidclip: summary_view and attribute_view must be different "
                                 f"text view slots, both are {self.summary_view}")
            for name in ("peer_weight", "cross_weight"):
                weight = getattr(self, name)
                if not math.isfinite(weight) or weight < 0:
                    raise ValueError(f"pyramidclip: {name} must be a finite number >= 0, "
                                     f"got {weight}")
            if self.peer_weight + self.cross_weight == 0:
                raise ValueError("pyramidclip: peer_weight and cross_weight are both 0; "
                                 "at least one level must have weight")
            if not 0.0 <= self.softening < 1.0:
                raise ValueError(f"pyramidclip: softening must be in [0, 1), got "
                                 f"{self.softening}")

    def __init__(self, cfg: PyramidClipLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else PyramidClipLoss.Config()
        self._clip = ClipLoss(ClipLoss.Config(gather=self.cfg.gather))  # targets(); no params

    def levels(self, out: Outputs) -> dict[str, Tensor]:
        """The five levels by name, each (B, D): G, L and T_o, T_s, T_a."""
        image = require(out, "image_embeds", self.name)
        views = self._extra(out, IMAGE_VIEW_EMBEDS, "data.views.image")  # (B, V, D)
        texts = self._extra(out, TEXT_VIEW_EMBEDS, "data.views.text")  # (B, V_t, D)
        cfg = self.cfg
        self._check_slot(views, cfg.local_view, "local_view", "image", image.shape)
        self._check_slot(texts, cfg.summary_view, "summary_view", "text", image.shape)
        self._check_slot(texts, cfg.attribute_view, "attribute_view", "text", image.shape)
        return {"global": image, "local": views[:, cfg.local_view],
                "caption": require(out, "text_embeds", self.name),
                "summary": texts[:, cfg.summary_view], "attributes": texts[:, cfg.attribute_view]}

    def gather_levels(self, levels: dict[str, Tensor],
                      dist: Dist) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(this rank's rows, all N rows) of every level, one collective with gradient."""
        names = list(levels)
        dtype = levels["global"].dtype
        for name in names:
            if levels[name].shape != levels["global"].shape:
                raise ValueError(f"pyramidclip: level {name!r} {tuple(levels[name].shape)} and "
                                 f"'global' {tuple(levels['global'].shape)} differ")
        stacked = torch.stack([levels[n].to(dtype) for n in names], dim=1)  # (B, 5, D)
        gathered = dist.all_gather(stacked, with_grad=True).unbind(dim=1)  # 5 x (N, D)
        local = stacked.unbind(dim=1)  # 5 x (B, D)
        if self.cfg.gather == "global":
            local = gathered
        return dict(zip(names, local)), dict(zip(names, gathered))

    def pair_logits(self, rows: dict[str, Tensor], columns: dict[str, Tensor], image: str,
                    text: str, logit_scale: Tensor) -> tuple[Tensor, Tensor]:
        """(s X_r Y^T, s Y_r X^T), each (B, N) ((N, N) if global), for levels X=image, Y=text."""
        per_image = logit_scale * rows[image] @ columns[text].T
        per_text = logit_scale * rows[text] @ columns[image].T
        return per_image, per_text

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r = weighted mean of the pairs' symmetric softened InfoNCE over this rank's rows."""
        logit_scale = require(out, "logit_scale", self.name)
        rows, columns = self.gather_levels(self.levels(out), dist)
        eps, terms = self.cfg.softening, {}
        for image, text in PEER_PAIRS + CROSS_PAIRS:
            per_image, per_text = self.pair_logits(rows, columns, image, text, logit_scale)
            labels = self._clip.targets(per_image, dist)  # r*B + arange(B), or arange(N)
            terms[f"{image}_{text}"] = 0.5 * (softened_nce(per_image, labels, eps)
                                              + softened_nce(per_text, labels, eps))
            if (image, text) == PEER_PAIRS[0]:  # (G, T_s): accuracy of the eval embedding
                with torch.no_grad():
                    hits = [(p.argmax(dim=1) == labels).double().mean()
                            for p in (per_image, per_text)]
        peer = sum(terms[f"{i}_{t}"] for i, t in PEER_PAIRS)
        cross = sum(terms[f"{i}_{t}"] for i, t in CROSS_PAIRS)
        w_p, w_c = self.cfg.peer_weight, self.cfg.cross_weight
        loss = (w_p * peer + w_c * cross) / (w_p * len(PEER_PAIRS) + w_c * len(CROSS_PAIRS))
        return LossResult(loss=loss, metrics=self.metrics(terms, hits, logit_scale))

    @staticmethod
    @torch.no_grad()
    def metrics(terms: dict[str, Tensor], hits: list[Tensor],
                logit_scale: Tensor) -> dict[str, Tensor]:
        """Each pair's loss (``loss_<image>_<text>``), the peer and cross means, top-1 accuracy
        of (G, T_s) both ways over this rank's rows, and s."""
        names = [f"loss_{name}" for name in terms] + ["loss_peer", "loss_cross", "acc_i2t",
                                                      "acc_t2i", "logit_scale"]
        peer = torch.stack([terms[f"{i}_{t}"] for i, t in PEER_PAIRS]).mean()
        cross = torch.stack([terms[f"{i}_{t}"] for i, t in CROSS_PAIRS]).mean()
        values = [t.double() for t in terms.values()] + [peer.double(), cross.double(), *hits,
                                                         logit_scale.detach().double().reshape(())]
        return stack_metrics(names, values)

    def _extra(self, out: Outputs, key: str, config: str) -> Tensor:
        """``out.extra[key]`` (B, V, D), or a clear error when the model skipped it."""
        if key not in out.extra:
            raise ValueError(f"objective {self.name!r} needs Outputs.extra[{key!r}]: set {config} "
                             f"in the recipe and run the model with needs={sorted(self.needs)}")
        return out.extra[key]

    def _check_slot(self, views: Tensor, slot: int, param: str, kind: str,
                    image_shape: torch.Size) -> None:
        """``views`` is (B, V, D) like the image embeddings (B, D), and slot < V."""
        if views.dim() != 3 or (views.shape[0], views.shape[2]) != tuple(image_shape):
            raise ValueError(f"pyramidclip: {kind} view embeddings {tuple(views.shape)} are not "
                             f"(B, V, D) for image embeddings {tuple(image_shape)}")
        if slot >= views.shape[1]:
            raise ValueError(f"pyramidclip: {param}={slot} but the batch has {views.shape[1]} "
                             f"{kind} view(s) (data.views.{kind})")


__all__ = ["CROSS_PAIRS", "IMAGE_LEVELS", "PEER_PAIRS", "PyramidClipLoss", "TEXT_LEVELS",
           "softened_nce"]
