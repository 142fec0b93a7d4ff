r"""OneR's four contrasts for one single-tower model (Jang et al., 2023, "Unifying
Vision-Language Representation Space with Single-tower Transformer", AAAI).

Notation (all embeddings L2-normalised, produced by ONE shared encoder f, see
``vlmray.models.oner``): u_i = f(I_i), v_i = f(T_i); the cross-modal mix m_i = f([I_i; T_pi(i)])
(row i's image patches followed by its partner's caption, pi(i) = (i + 1) mod B within the local
batch); the in-context pair c_i = f([I_i; T_i]); s the learned inverse temperature. Over the
global batch of N rows, with soft targets y_i = lam e_i + (1 - lam) e_pi(i) (in global columns)
and CE(z, y) = -sum_j y_j log softmax(z)_j:

    ITC: L = 1/(2N) sum_i [ CE(s u_i V^T, e_i) + CE(s v_i U^T, e_i) ]          (CLIP)
    XMC: L = 1/(2N) sum_i [ CE(s m_i U^T, y_i) + CE(s m_i V^T, y_i) ]
         the mix holds image i and caption pi(i): it is a positive of both pairs, weighted like
         mixup (lam for pair i, whose image it carries; 1 - lam for pair pi(i), whose caption)
    CIC: L = 1/(2N) sum_i [ CE(s c_i U^T, e_i) + CE(s c_i V^T, e_i) ]
         an image in the context of its own caption keeps the pair's meaning: c_i is the
         positive of u_i and v_i (invariance to added, consistent context)
    CMC: L = 1/N sum_i CE(s m_i C^T, y_i)
         mixup in the contextual space: the mix's positives are the in-context pairs c_i (lam)
         and c_pi(i) (1 - lam)

    L_OneR = w_itc ITC + w_xmc XMC + w_cic CIC + w_cmc CMC

Reading of the paper: the objectives' names, what each mixes and which pairs are positives
follow the paper's description; the exact weighting (equal mixup weight lam = 1/2 for the
concatenation, one direction - mixed row against unimodal / contextual columns - for the
mixed terms) is this module's choice and is configurable.

Distributed: worker r scores its B rows against all N gathered columns (u, v, c gathered with
grad in ONE collective), labels r*B + i and r*B + pi(i) (``ClipLoss.targets``); the mean of the
W local losses is L, and with DDP's gradient average the gradients equal one process's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmray.models.oner import ONER_MIXED_EMBEDS, ONER_PAIRED_EMBEDS, ONER_PARTNER
from vlmray.objectives.base import LossResult, Objective, require
from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs

TERMS = ("itc", "xmc", "cic", "cmc")


@register_objective("oner")
class OneRLoss(Objective):
    r"""OneR's ITC + XMC + CIC + CMC (weights ``itc``, ``xmc``, ``cic``, ``cmc``).

        L = w_itc ITC + w_xmc XMC + w_cic CIC + w_cmc CMC      (module docstring: each term)

    A term with weight 0 is skipped, and the model is not asked for inputs only it needs
    (``needs`` is set per instance: mixes for XMC/CMC, in-context pairs for CIC/CMC).
    Metrics: each term's value (``itc``...), ITC's in-batch accuracies and the scale.
    """

    needs = frozenset({"image_embeds", "text_embeds", "logit_scale", ONER_MIXED_EMBEDS,
                       ONER_PAIRED_EMBEDS})

    @dataclass(kw_only=True)
    class Config:
        itc: float = 1.0
        """Weight of the image-text contrast (CLIP's InfoNCE between u and v)."""
        xmc: float = 1.0
        """Weight of the cross-modal mixup contrast (m against U and V, soft targets)."""
        cic: float = 1.0
        """Weight of the contextual invariance contrast (c against U and V)."""
        cmc: float = 1.0
        """Weight of the contextual mixup contrast (m against C, soft targets)."""
        lam: float = 0.5
        """Mixup target weight of the pair whose IMAGE the mix carries, in (0, 1]; the
        caption's pair gets 1 - lam."""

        def __post_init__(self) -> None:
            weights = {t: getattr(self, t) for t in TERMS}
            bad = {t: w for t, w in weights.items() if not (w >= 0.0 and w < float("inf"))}
            if bad:
                raise ValueError(f"oner: term weights must be finite and >= 0, got {bad}")
            if not any(weights.values()):
                raise ValueError("oner: at least one of itc, xmc, cic, cmc must be > 0")
            if not 0.0 < self.lam <= 1.0:
                raise ValueError(f"oner: lam must be in (0, 1], got {self.lam}")

    def __init__(self, cfg: OneRLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else OneRLoss.Config()
        self.clip = ClipLoss(ClipLoss.Config(gather="local"))   # targets and metrics
        base = {"image_embeds", "text_embeds", "logit_scale"}
        if self.cfg.xmc or self.cfg.cmc:
            base.add(ONER_MIXED_EMBEDS)
        if self.cfg.cic or self.cfg.cmc:
            base.add(ONER_PAIRED_EMBEDS)
        self.needs = frozenset(base)   # per instance: only what the active terms read

    def soft_targets(self, labels: Tensor, partner: Tensor, columns: int,
                     dtype: torch.dtype) -> Tensor:
        """y (B, N) = lam one_hot(r*B + i) + (1 - lam) one_hot(r*B + pi(i)).

        labels: (B,) global column of each row, r*B + arange(B); partner: (B,) LOCAL pi(i), so
        its global column is labels[pi(i)].
        """
        if partner.shape != labels.shape:
            raise ValueError(f"oner: partner {tuple(partner.shape)} does not match the "
                             f"{labels.shape[0]} rows")
        rows = labels.shape[0]
        lam = torch.full((rows, 1), self.cfg.lam, dtype=dtype, device=labels.device)
        y = torch.zeros(rows, columns, dtype=dtype, device=labels.device)
        y = y.scatter_add(1, labels[:, None], lam)
        return y.scatter_add(1, labels[partner.to(labels.device)][:, None], 1 - lam)

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """sum_k w_k L_k on this rank's rows (each term a mean over its B rows)."""
        image = require(out, "image_embeds", self.name)                     # (B, D) u
        text = require(out, "text_embeds", self.name)                       # (B, D) v
        scale = require(out, "logit_scale", self.name)                      # ()
        cfg = self.cfg
        mixed = self._extra(out, ONER_MIXED_EMBEDS) if (cfg.xmc or cfg.cmc) else None
        paired = self._extra(out, ONER_PAIRED_EMBEDS) if (cfg.cic or cfg.cmc) else None
        local = [image, text] + ([paired] if paired is not None else [])
        bank = dist.all_gather(torch.stack(local, dim=1), with_grad=True)   # (N, 2|3, D)
        all_u, all_v = bank[:, 0], bank[:, 1]                               # (N, D) each
        per_image, per_text = scale * image @ all_v.T, scale * text @ all_u.T   # (B, N)
        labels = self.clip.targets(per_image, dist)                         # (B,) r*B + i
        terms: dict[str, Tensor] = {}
        if cfg.itc:
            terms["itc"] = 0.5 * (F.cross_entropy(per_image, labels)
                                  + F.cross_entropy(per_text, labels))
        if mixed is not None:
            y = self.soft_targets(labels, self._extra(out, ONER_PARTNER), bank.shape[0],
                                  mixed.dtype)                              # (B, N)
            if cfg.xmc:
                terms["xmc"] = 0.5 * (F.cross_entropy(scale * mixed @ all_u.T, y)
                                      + F.cross_entropy(scale * mixed @ all_v.T, y))
            if cfg.cmc:
                terms["cmc"] = F.cross_entropy(scale * mixed @ bank[:, 2].T, y)
        if cfg.cic:
            terms["cic"] = 0.5 * (F.cross_entropy(scale * paired @ all_u.T, labels)
                                  + F.cross_entropy(scale * paired @ all_v.T, labels))
        loss = sum(getattr(cfg, k) * v for k, v in terms.items())
        metrics = self.clip.metrics(per_image, per_text, labels, scale)
        metrics.update({k: v.detach() for k, v in terms.items()})
        return LossResult(loss=loss, metrics=metrics)

    def _extra(self, out: Outputs, key: str) -> Tensor:
        if key not in out.extra:
            raise ValueError(f"objective 'oner' needs Outputs.extra[{key!r}]; the model returned "
                             f"{sorted(out.extra)} (use model.arch='oner')")
        return out.extra[key]


__all__ = ["OneRLoss"]
