r"""ALIP's adaptive bi-path contrastive loss (Yang, Deng, An, Li, Feng, Guo, Yang and Liu,
ICCV 2023, "ALIP: Adaptive Language-Image Pre-training with Synthetic Caption").

Every image x_i comes with its raw (web) text t_i and a synthetic caption c_i written by a
captioner from the image; all three are L2-normalised embeddings, t and c from the SAME text
tower. Over the global batch of N rows, three similarities per row

    S^tc_i = <t_i, c_i>,    S^xt_i = <x_i, t_i>,    S^xc_i = <x_i, c_i>

each keep an exponential moving average of their batch mean (buffers ``ema_tc``, ``ema_xt``,
``ema_xc``, saved with checkpoints; m = ``momentum``, E starts at ``init`` = 1), updated
BEFORE the weights are computed:

    E^k <- m E^k + (1 - m) (1/N) sum_i S^k_i            k in {tc, xt, xc}

(``init_from_batch=True``, not in the paper: the first update sets E^k to the first batch's
mean instead, for runs too short for E to forget its start; see ``alip_tiny``.)

Language Consistency Gate (LCG): a raw text that disagrees with the caption of its image
(below the running mean) makes the whole sample count less,

    W^s_i = min( exp(gamma (S^tc_i - E^tc)), 1 )

Description Consistency Gate (DCG): for the samples the LCG judged inconsistent (W^s_i < 1),
each of the two pairs is weighted by how well it matches the image relative to its running
mean; consistent samples keep weight 1 (not clipped otherwise: these weights may exceed 1):

    W^t_i = exp(gamma (S^xt_i - E^xt)),  W^c_i = exp(gamma (S^xc_i - E^xc))   if W^s_i < 1
    W^t_i = W^c_i = 1                                                      if W^s_i = 1

All weights carry no gradient. With the shared logit scale s and InfoNCE cross-entropies
CE_i(a -> b) = -log softmax_j(s <a_i, b_j>)_i over the global batch,

    L = (1/N) sum_i W^s_i W^t_i (CE_i(x -> t) + CE_i(t -> x)) / 2
      + (1/N) sum_i W^s_i W^c_i (CE_i(x -> c) + CE_i(c -> x)) / 2

``gates=False`` sets every weight to 1: the plain bi-path CLIP loss (the EMAs still run, for
the metrics). gamma = 2 and m = 0.99 are the released code's values (it writes
exp(S - E)^2).

Distribution: worker r gathers (x, t, c) of all N rows with gradients (one collective) and
scores its B = N/W rows against all N columns (logits B x N, labels r*B + arange(B)), so
(1/W) sum_r L_r = L and, after the trainer's gradient average, the gradients equal one
process on the full batch. The similarities and EMAs are computed from the gathered
(detached) embeddings, so every rank sees the global batch and holds the same buffers.

Our reading / deviations: the EMAs update only in training mode (``self.training``); they
are float64 buffers and the similarities are computed in float32 at least (bf16 autocast
would round them; the released code keeps them as Python numbers, not in checkpoints); the
paper's captioner is OFA on YFCC15M, here any ``data.rewrite.captioner`` fills
``synthetic_caption`` (the built-in data's oracle by default in ``alip_tiny``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmray.models.outputs import SYNTHETIC_TEXT_EMBEDS
from vlmray.objectives.base import LossResult, Objective, require, stack_metrics
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs

_PAIRS = ("tc", "xt", "xc")


def ema_update(ema: Tensor, sims: Tensor, momentum: float) -> Tensor:
    """E' = m E + (1 - m) mean(S): ema () and sims (N,) -> () (not in place)."""
    return momentum * ema + (1.0 - momentum) * sims.mean().to(ema.dtype)


def gate_weights(s_tc: Tensor, s_xt: Tensor, s_xc: Tensor, e_tc: Tensor, e_xt: Tensor,
                 e_xc: Tensor, gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """(W^s, W^t, W^c), each (N,), from the similarities (N,) and the (updated) EMAs ():
    the LCG W^s = min(exp(gamma (S^tc - E^tc)), 1) and the DCG weights, exp(gamma (S - E))
    where W^s < 1 and 1 elsewhere. No gradient flows through them."""
    with torch.no_grad():
        w_s = torch.exp(gamma * (s_tc - e_tc)).clamp(max=1.0)
        gated = w_s < 1.0
        one = torch.ones_like(w_s)
        w_t = torch.where(gated, torch.exp(gamma * (s_xt - e_xt)), one)
        w_c = torch.where(gated, torch.exp(gamma * (s_xc - e_xc)), one)
    return w_s, w_t, w_c


@register_objective("alip")
class AlipLoss(Objective):
    r"""ALIP: image-text and image-caption InfoNCE, each row weighted by the Language and
    Description Consistency Gates (see the module docstring for L and the gates).

    Needs the model's image and raw-text embeddings, the logit scale and the synthetic
    captions' embeddings (``Outputs.extra["synthetic_text_embeds"]``, from the batch's
    ``synthetic_tokens``: ``data.extra_texts=["synthetic_caption"]``).

    Metrics: ``w_s``, ``w_t``, ``w_c`` (global-batch means of the weights), ``gated_frac``
    (fraction with W^s < 1), ``ema_tc``, ``ema_xt``, ``ema_xc``, ``loss_text`` and
    ``loss_caption`` (the two weighted terms), ``acc_i2t`` (this rank's in-batch top-1).
    """

    needs = frozenset({"image_embeds", "text_embeds", "logit_scale", SYNTHETIC_TEXT_EMBEDS})

    @dataclass(kw_only=True)
    class Config:
        gamma: float = 2.0
        """gamma of the gates' exp(gamma (S - E)); 0 makes every weight 1."""
        momentum: float = 0.99
        """m of the similarity EMAs, in [0, 1)."""
        init: float = 1.0
        """Starting value of the three EMAs (a cosine, in [-1, 1])."""
        gates: bool = True
        """False: every weight is 1 (plain bi-path CLIP on raw text and synthetic caption)."""
        init_from_batch: bool = False
        """True (not in the paper): the first update sets each EMA to the first training
        batch's mean similarity instead of moving it from ``init``."""

        def __post_init__(self) -> None:
            if not self.gamma >= 0.0:
                raise ValueError(f"alip: gamma must be >= 0, got {self.gamma}")
            if not 0.0 <= self.momentum < 1.0:
                raise ValueError(f"alip: momentum must be in [0, 1), got {self.momentum}")
            if not -1.0 <= self.init <= 1.0:
                raise ValueError(f"alip: init must be a cosine in [-1, 1], got {self.init}")

    def __init__(self, cfg: AlipLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else AlipLoss.Config()
        for pair in _PAIRS:
            self.register_buffer(f"ema_{pair}",
                                 torch.tensor(float(self.cfg.init), dtype=torch.float64))
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def embeddings(self, out: Outputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x (B, D), t (B, D), c (B, D), s ()) from the model's outputs, checked."""
        image = require(out, "image_embeds", self.name)
        text = require(out, "text_embeds", self.name)
        scale = require(out, "logit_scale", self.name)
        caption = out.extra.get(SYNTHETIC_TEXT_EMBEDS)
        if caption is None:
            raise ValueError(f"alip needs Outputs.extra[{SYNTHETIC_TEXT_EMBEDS!r}]: train with "
                             "data.extra_texts=['synthetic_caption'] (and a data.rewrite "
                             "captioner) so batches carry synthetic_tokens")
        if not image.shape == text.shape == caption.shape or image.ndim != 2:
            raise ValueError(f"alip: image, text and caption embeddings must be (B, D) alike; "
                             f"got {tuple(image.shape)}, {tuple(text.shape)}, "
                             f"{tuple(caption.shape)}")
        return image, text, caption, scale

    @torch.no_grad()
    def weights(self, all_x: Tensor, all_t: Tensor, all_c: Tensor) -> dict[str, Tensor]:
        """Gate weights (N,) of the global batch from the gathered embeddings (N, D); moves the
        EMAs first (training mode). Returns w_s, w_t, w_c and the similarities s_tc/s_xt/s_xc."""
        dtype = torch.promote_types(all_x.dtype, torch.float32)
        x, t, c = (v.detach().to(dtype) for v in (all_x, all_t, all_c))
        sims = {"tc": (t * c).sum(-1), "xt": (x * t).sum(-1), "xc": (x * c).sum(-1)}
        if self.training:
            # host sync (control flow): the first update starts the EMAs from the batch
            first = self.cfg.init_from_batch and int(self.ema_updates) == 0
            for pair, s in sims.items():
                ema = getattr(self, f"ema_{pair}")
                ema.copy_(ema_update(ema, s, 0.0 if first else self.cfg.momentum))
            self.ema_updates += 1
        emas = [getattr(self, f"ema_{p}").to(dtype) for p in _PAIRS]
        w_s, w_t, w_c = gate_weights(sims["tc"], sims["xt"], sims["xc"], *emas, self.cfg.gamma)
        if not self.cfg.gates:
            w_s, w_t, w_c = (torch.ones_like(w) for w in (w_s, w_t, w_c))
        return {"w_s": w_s, "w_t": w_t, "w_c": w_c, **{f"s_{p}": s for p, s in sims.items()}}

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r over this rank's B rows against all N columns (see the module docstring)."""
        image, text, caption, scale = self.embeddings(out)
        b = image.shape[0]
        gathered = dist.all_gather(torch.stack((image, text, caption), dim=1))  # (N, 3, D)
        all_x, all_t, all_c = gathered.unbind(dim=1)                            # (N, D) each
        w = self.weights(all_x, all_t, all_c)
        rows = dist.offsets(b, device=image.device)                             # (B,)
        ce = {
            "xt": F.cross_entropy(scale * image @ all_t.T, rows, reduction="none"),
            "tx": F.cross_entropy(scale * text @ all_x.T, rows, reduction="none"),
            "xc": F.cross_entropy(scale * image @ all_c.T, rows, reduction="none"),
            "cx": F.cross_entropy(scale * caption @ all_x.T, rows, reduction="none"),
        }                                                                       # (B,) each
        w_text = (w["w_s"] * w["w_t"])[rows].to(ce["xt"].dtype)                 # (B,)
        w_caption = (w["w_s"] * w["w_c"])[rows].to(ce["xc"].dtype)              # (B,)
        loss_text = (w_text * (ce["xt"] + ce["tx"]) / 2).mean()
        loss_caption = (w_caption * (ce["xc"] + ce["cx"]) / 2).mean()
        loss = loss_text + loss_caption
        acc = (scale * image @ all_t.T).argmax(dim=1) == rows
        return LossResult(loss=loss, metrics=self.metrics(w, loss_text, loss_caption, acc))

    @torch.no_grad()
    def metrics(self, w: Mapping[str, Tensor], loss_text: Tensor, loss_caption: Tensor,
                acc: Tensor) -> dict[str, Tensor]:
        """Gate means over the global batch, the EMAs, the two terms and this rank's acc."""
        names = ["w_s", "w_t", "w_c", "gated_frac", "ema_tc", "ema_xt", "ema_xc",
                 "loss_text", "loss_caption", "acc_i2t"]
        values = [w["w_s"].mean(), w["w_t"].mean(), w["w_c"].mean(),
                  (w["w_s"] < 1.0).double().mean(), self.ema_tc, self.ema_xt, self.ema_xc,
                  loss_text, loss_caption, acc.double().mean()]
        return stack_metrics(names, (v.detach().double().reshape(()) for v in values))


__all__ = ["AlipLoss", "ema_update", "gate_weights"]
