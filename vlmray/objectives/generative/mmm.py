r"""FLAVA's masked multimodal modelling (MMM; Singh et al., 2022, "FLAVA: A Foundational
Language And Vision Alignment Model").

A caption with 15% of its tokens masked (``schema.MLM_TOKENS``, ``data.views.mlm_prob``) and an
image with a fraction of its patches masked (``schema.PATCH_MASK``, shared with ``mim`` when
both run) are encoded by the towers (``masked_text_tokens`` (B, L, D); the visible patches
only, ``masked_image_tokens`` (B, N_vis, D)). An objective-owned joint multimodal encoder
(``vlmray.models.fusion.MultimodalEncoder``: self-attention over [CLS_M; image; text], padded
text never attended to) fuses them; its text states h^T predict the masked tokens through an
MLM head f, its image states h^I, through an MAE decoder g, the masked patches' pixels:

    L = w_mlm L_mlm + w_mim L_mim
    L_mlm = -1/M sum_{(i, l) masked} log softmax(f(h^T_{i,l}))[y_{i,l}]
    L_mim = 1/(B K) sum_i sum_{n in M_i} 1/P ||g(h^I, M)_{i,n} - x_{i,n}||^2

M is the number of masked tokens in the GLOBAL batch, as in the ``mlm`` objective: rank r
returns W/M * (its CE sum), with M all-reduced (a count, no gradient), so (1/W) sum_r L_r = L
and the averaged gradients equal the single-process ones. L_mim is ``mim``'s loss (every row
masks K patches, so per-rank means average to the global one). f is Linear(D, D)-GELU-
LayerNorm-Linear(D, V) (BERT's head), g an ``MAEDecoder``; x the (normalised) pixel targets.

Deviations (our reading): FLAVA masks image patches block-wise (BEiT) and keeps mask tokens in
the image encoder, and its MMM image target is the dVAE token of each masked patch; here the
masks are uniform, the encoder drops the masked patches (MAE) and the targets are pixels. FLAVA
shares one multimodal encoder between MMM, ITM and its contrastive heads; here MMM owns its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.data.schema import MLM_LABELS, PATCH_MASK, PIXELS, TOKEN_MASK
from vlmray.models.fusion import MultimodalEncoder
from vlmray.models.mae import MAEDecoder
from vlmray.models.outputs import MASKED_IMAGE_TOKENS, MASKED_TEXT_TOKENS
from vlmray.objectives.base import LossResult, SetupContext, stack_metrics
from vlmray.objectives.generative.mim import PatchMasking, masked_mse, pixel_targets
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs

IGNORE = -100
"""``MLM_LABELS`` value of an unmasked token (not scored)."""


def global_mlm_loss(head: nn.Module, states: Tensor, labels: Tensor,
                    dist: Dist) -> tuple[Tensor, Tensor, Tensor]:
    """(L_r, hits on this rank, M): L_r = W/M * sum of CE over this rank's masked tokens of
    states (B, L, C) -> head -> (., V) against labels (B, L) (-100: not scored); M is the
    global count (all-reduced, no gradient); L_r = 0 with the graph kept when M = 0."""
    masked = labels != IGNORE                                               # (B, L)
    logits = head(states[masked])                                           # (M_r, V)
    targets = labels[masked]
    ce_sum = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                             reduction="sum")
    total = dist.all_reduce_sum(masked.sum().double())                      # M
    share = (total / dist.world_size).clamp(min=1.0 / dist.world_size)      # M / W, > 0
    with torch.no_grad():
        hits = (logits.argmax(dim=-1) == targets).double().sum()
    return ce_sum / share.to(ce_sum), hits, total


@register_objective("mmm")
class MmmLoss(PatchMasking):
    r"""FLAVA's MMM: masked tokens and masked patches reconstructed from a joint multimodal
    encoding of the masked caption and the visible patches (module docstring: L, deviations).
    Owns the multimodal encoder, the MLM head and the MAE decoder (created in ``setup``)."""

    needs = frozenset({MASKED_IMAGE_TOKENS, MASKED_TEXT_TOKENS, MLM_LABELS, TOKEN_MASK, PIXELS,
                       PATCH_MASK})

    @dataclass(kw_only=True)
    class Config:
        mask_ratio: float = 0.4
        """Fraction of patches masked when this objective draws the mask (FLAVA: about 0.4);
        with ``mim`` listed first the two share ``mim``'s mask."""
        norm_pix: bool = True
        """Standardise each target patch by its own mean and variance (MAE)."""
        layers: int = 2
        """Depth of the joint multimodal encoder."""
        heads: int = 4
        """Attention heads of the encoder and decoder (must divide D)."""
        decoder_layers: int = 1
        """Depth of the MAE decoder on the fused image states."""
        mlm_weight: float = 1.0
        """w_mlm."""
        mim_weight: float = 1.0
        """w_mim."""
        seed: int = 0
        """Seed of the masks this objective draws."""

        def __post_init__(self) -> None:
            if not 0.0 < self.mask_ratio < 1.0:
                raise ValueError(f"mmm: mask_ratio must be in (0, 1), got {self.mask_ratio}")
            if min(self.layers, self.heads, self.decoder_layers) < 1:
                raise ValueError(f"mmm: layers, heads and decoder_layers must be >= 1, got "
                                 f"{self.layers}, {self.heads}, {self.decoder_layers}")
            if self.mlm_weight < 0 or self.mim_weight < 0:
                raise ValueError(f"mmm: mlm_weight and mim_weight must be >= 0, got "
                                 f"{self.mlm_weight}, {self.mim_weight}")
            if self.seed < 0:
                raise ValueError(f"mmm: seed must be >= 0, got {self.seed}")

    def __init__(self, cfg: MmmLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else MmmLoss.Config()
        self.encoder: MultimodalEncoder | None = None
        self.mlm_head: nn.Module | None = None
        self.decoder: MAEDecoder | None = None

    def setup(self, ctx: SetupContext) -> None:
        """Encoder, MLM head (D -> V = ``ctx.vocab_size``) and decoder at D = ``ctx.embed_dim``."""
        gh, gw, patch = self.setup_grid(ctx)
        d, vocab, heads = ctx.embed_dim, ctx.vocab_size, self.cfg.heads
        if vocab <= 0:
            raise ValueError(f"mmm needs a vocabulary for its MLM head; got vocab_size={vocab}")
        if d % heads:
            raise ValueError(f"mmm: embed_dim D={d} is not divisible by heads={heads}")
        self.encoder = MultimodalEncoder(d, layers=self.cfg.layers, heads=heads)
        self.mlm_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d),
                                      nn.Linear(d, vocab))
        self.decoder = MAEDecoder(d, (gh, gw), patch, layers=self.cfg.decoder_layers, heads=heads)

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r = w_mlm L_mlm,r + w_mim L_mim,r over this rank's rows."""
        if self.encoder is None or self.mlm_head is None or self.decoder is None:
            raise ValueError(f"objective {self.name!r} has no encoder yet: call "
                             "setup(SetupContext) first (ObjectiveMix.setup does)")
        visible, mask, pixels = self.masked_inputs(batch, out)
        text, labels, token_mask = self.text_inputs(batch, out)
        _, h_img, h_txt = self.encoder(visible, text, token_mask)           # (B,N_vis,D),(B,L,D)
        pred = self.decoder(h_img, mask)                                    # (B, N, p*p*3)
        target = pixel_targets(pixels, self.grid[2], self.cfg.norm_pix,
                               torch.promote_types(pred.dtype, torch.float32))
        l_mim = masked_mse(pred, target, mask)
        l_mlm, hits, total = global_mlm_loss(self.mlm_head, h_txt, labels, dist)
        loss = self.cfg.mlm_weight * l_mlm + self.cfg.mim_weight * l_mim
        self.advance()
        with torch.no_grad():
            acc = hits / (labels != IGNORE).sum().clamp(min=1)
            metrics = stack_metrics(("mlm", "mim", "mlm_acc", "masked_tokens"),
                                    (l_mlm.detach().double(), l_mim.detach().double(), acc,
                                     total.double()))
        return LossResult(loss=loss, metrics=metrics)

    def text_inputs(self, batch: Mapping[str, Tensor],
                    out: Outputs) -> tuple[Tensor, Tensor, Tensor]:
        """(masked-caption states (B, L, D), labels (B, L) int64, token mask (B, L) bool)."""
        if MASKED_TEXT_TOKENS not in out.extra:
            raise ValueError(f"objective {self.name!r} needs Outputs.extra"
                             f"[{MASKED_TEXT_TOKENS!r}]: set data.views.mlm_prob > 0 and run "
                             "the model with this objective's needs")
        missing = [c for c in (MLM_LABELS, TOKEN_MASK) if c not in batch]
        if missing:
            raise ValueError(f"objective {self.name!r} needs the batch column(s) {missing} "
                             "(data.views.mlm_prob > 0)")
        text, labels = out.extra[MASKED_TEXT_TOKENS], batch[MLM_LABELS].long()
        token_mask = batch[TOKEN_MASK].bool()
        if text.shape[:2] != labels.shape or token_mask.shape != labels.shape:
            raise ValueError(f"mmm: text states {tuple(text.shape)}, labels "
                             f"{tuple(labels.shape)} and token mask {tuple(token_mask.shape)} "
                             "disagree on (B, L)")
        return text, labels, token_mask


__all__ = ["IGNORE", "MmmLoss", "global_mlm_loss"]
