r"""Image-text matching (ITM) with hard negatives mined from the contrastive similarities
(Li et al., 2021, "Align before Fuse" (ALBEF); Li et al., 2022, "BLIP").

A fusion encoder f (``vlmray.models.fusion.FusionEncoder``) reads a (text, image) token pair and
a 2-way head h scores its first state: p(match | I, T) = softmax(h(f(T, I)[0]))_1. For the
global batch of N pairs with normalised embeddings u_i (image), v_j (text) and scale s, every
image i gets one negative text j ~ q^{i2t}_i and every text i one negative image k ~ q^{t2i}_i:

    q^{i2t}_{ij} = [j != i] exp(s u_i.v_j) / sum_{k != i} exp(s u_i.v_k)
    q^{t2i}_{ij} = [j != i] exp(s v_i.u_j) / sum_{k != i} exp(s v_i.u_k)

(``hard_negatives=False``: uniform over j != i). The weights carry no gradient. Worker r, with
local rows R_r (|R_r| = B = N/W), minimises the mean cross-entropy over its 3B pairs

    L_r = 1/(3B) sum_{i in R_r} [ CE(h f(T_i, I_i), 1) + CE(h f(T_{j_i}, I_i), 0)
                                  + CE(h f(T_i, I_{k_i}), 0) ]

so (1/W) sum_r L_r is the single-process loss L on the N pairs. The negatives' token features
come from a gather with gradient, so the gradients (after the trainer's average over workers)
equal the single-process ones. The N x N draw uses a generator seeded with (``seed``, step) on
every rank and each rank keeps its rows, so the negatives do not depend on W; ``step`` is a
buffer (saved in checkpoints) that advances once per forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.models.fusion import FusionEncoder
from vlmray.objectives.base import LossResult, Objective, SetupContext
from vlmray.objectives.contrastive.clip import require
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs

_SEED_STRIDE = 1_000_003


def negative_weights(logits: Tensor, hard: bool) -> Tensor:
    """Sampling weights (N, N) from logits (N, N) = s U V^T: row i is softmax over j != i
    (``hard``) or uniform over j != i; the diagonal (the positive) is exactly zero."""
    n = logits.shape[0]
    if logits.ndim != 2 or logits.shape[1] != n or n < 2:
        raise ValueError(f"itm: need square similarities with N >= 2, got {tuple(logits.shape)}")
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    if not hard:
        return (~eye).to(logits.dtype) / (n - 1)
    return logits.detach().masked_fill(eye, float("-inf")).softmax(dim=1)


@register_objective("itm")
class ItmLoss(Objective):
    r"""Binary matched / not-matched classification of image-text pairs through a fusion encoder
    (ALBEF / BLIP ITM), with one hard negative text per image and one hard negative image per
    text sampled from the gathered similarity matrix (see the module docstring for L).

    Owns the fusion encoder and the 2-way head (created in ``setup`` at width D =
    ``ctx.embed_dim``). ``last_negatives`` holds the global indices (j_i, k_i) drawn for this
    rank's rows in the latest forward (for inspection and tests).
    """

    needs = frozenset({"image_embeds", "text_embeds", "logit_scale", "image_tokens",
                       "text_tokens", "text_mask"})

    @dataclass(kw_only=True)
    class Config:
        hard_negatives: bool = True
        """True: negatives ~ softmax of the similarities (BLIP); False: uniform over j != i."""
        seed: int = 0
        """Seed of the negative sampling; with the step counter every run is reproducible."""
        layers: int = 2
        """Fusion encoder depth."""
        heads: int = 4
        """Fusion attention heads (must divide D)."""

        def __post_init__(self) -> None:
            if self.layers < 1 or self.heads < 1:
                raise ValueError(f"itm: layers and heads must be >= 1, got {self.layers}, "
                                 f"{self.heads}")
            if self.seed < 0:
                raise ValueError(f"itm: seed must be >= 0, got {self.seed}")

    def __init__(self, cfg: ItmLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else ItmLoss.Config()
        self.fusion: FusionEncoder | None = None
        self.head: nn.Module | None = None
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.last_negatives: tuple[Tensor, Tensor] | None = None

    def setup(self, ctx: SetupContext) -> None:
        """Fusion encoder f and head h sized from D = ``ctx.embed_dim``."""
        d = ctx.embed_dim
        if d % self.cfg.heads != 0:
            raise ValueError(f"itm: embed_dim D={d} is not divisible by heads={self.cfg.heads}")
        self.fusion = FusionEncoder(d, layers=self.cfg.layers, heads=self.cfg.heads)
        self.head = nn.Linear(d, 2)

    def generator(self, step: int, device: torch.device) -> torch.Generator:
        """The sampling generator of ``step``: identical on every rank."""
        seed = (self.cfg.seed * _SEED_STRIDE + step) % (2**63 - 1)
        return torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def sample(self, all_image: Tensor, all_text: Tensor, logit_scale: Tensor,
               step: int) -> tuple[Tensor, Tensor]:
        """Global negatives (neg_text (N,), neg_image (N,)) for all N rows: text j_i for image i,
        image k_i for text i, drawn with ``generator(step)`` (same on every rank)."""
        logits = logit_scale.detach() * all_image.detach() @ all_text.detach().T  # (N, N)
        gen = self.generator(step, logits.device)
        hard = self.cfg.hard_negatives
        neg_text = torch.multinomial(negative_weights(logits, hard), 1, generator=gen)
        neg_image = torch.multinomial(negative_weights(logits.T, hard), 1, generator=gen)
        return neg_text.squeeze(1), neg_image.squeeze(1)

    def inputs(self, out: Outputs) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(image (B, D), text (B, D), s (), image tokens (B, N_i, D), text tokens (B, L, D),
        text mask (B, L) as the tokens' dtype), checked."""
        image = require(out, "image_embeds", self.name)
        text = require(out, "text_embeds", self.name)
        scale = require(out, "logit_scale", self.name)
        img_tok = require(out, "image_tokens", self.name)
        txt_tok = require(out, "text_tokens", self.name)
        mask = out.text_mask
        if mask is None:
            mask = torch.ones(txt_tok.shape[:2], dtype=torch.bool, device=txt_tok.device)
        b = image.shape[0]
        if (text.shape[0] != b or img_tok.ndim != 3 or txt_tok.ndim != 3
                or img_tok.shape[0] != b or txt_tok.shape[0] != b
                or mask.shape != txt_tok.shape[:2]):
            raise ValueError(
                f"itm: need image/text embeds (B, D), image_tokens (B, N, D), text_tokens "
                f"(B, L, D), text_mask (B, L); got {tuple(image.shape)}, {tuple(text.shape)}, "
                f"{tuple(img_tok.shape)}, {tuple(txt_tok.shape)}, {tuple(mask.shape)}")
        return image, text, scale, img_tok, txt_tok, mask.to(txt_tok.dtype)

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r: mean CE over this rank's B positives and 2B sampled negatives."""
        if self.fusion is None or self.head is None:
            raise ValueError(f"objective {self.name!r} has no fusion encoder yet: call "
                             "setup(SetupContext) first (ObjectiveMix.setup does)")
        image, text, scale, img_tok, txt_tok, mask = self.inputs(out)
        b = image.shape[0]
        embeds = dist.all_gather(torch.stack((image, text), dim=1).detach(), with_grad=False)
        all_img_tok = dist.all_gather(img_tok, with_grad=True)                    # (N, N_i, D)
        text_and_mask = torch.cat((txt_tok, mask.unsqueeze(-1)), dim=-1)           # (B, L, D+1)
        all_text_and_mask = dist.all_gather(text_and_mask, with_grad=True)         # (N, L, D+1)
        all_txt_tok, all_mask = all_text_and_mask[..., :-1], all_text_and_mask[..., -1].detach()

        step = int(self.step.item())
        neg_text, neg_image = self.sample(*embeds.unbind(dim=1), scale, step)
        rows = dist.offsets(b, device=neg_text.device)
        neg_text, neg_image = neg_text[rows], neg_image[rows]                      # (B,) each
        self.last_negatives = (neg_text, neg_image)
        with torch.no_grad():
            self.step += 1

        images = torch.cat((img_tok, img_tok, all_img_tok[neg_image]))              # (3B, N_i, D)
        texts = torch.cat((txt_tok, all_txt_tok[neg_text], txt_tok))                # (3B, L, D)
        masks = torch.cat((mask, all_mask[neg_text], mask)) > 0.5                   # (3B, L)
        logits = self.head(self.fusion.pooled(texts, images, masks))                # (3B, 2)
        labels = torch.zeros(3 * b, dtype=torch.long, device=logits.device)
        labels[:b] = 1
        loss = F.cross_entropy(logits, labels)
        return LossResult(loss=loss, metrics=self.metrics(logits, labels, b))

    @staticmethod
    @torch.no_grad()
    def metrics(logits: Tensor, labels: Tensor, b: int) -> dict[str, float]:
        """ITM accuracy over the 3B pairs, and on the positives / negatives alone."""
        hit = (logits.argmax(dim=1) == labels).double()
        values = torch.stack([hit.mean(), hit[:b].mean(), hit[b:].mean()]).tolist()
        return dict(zip(("acc", "acc_pos", "acc_neg"), values))


__all__ = ["ItmLoss", "negative_weights"]
