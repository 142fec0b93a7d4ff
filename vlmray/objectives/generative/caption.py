r"""Image captioning through a decoder the objective owns (Yu et al., 2022, "CoCa: Contrastive
Captioners are Image-Text Foundation Models").

An attentional pooler turns the image tokens (B, N, D) into n_q queries' states m (B, n_q, D);
a causal text decoder reads the caption y = (y_0 = BOS, y_1, ..., y_T) and cross-attends to m.
Worker r minimises the mean negative log-likelihood of its batch's real caption tokens

    L_cap = - (1 / |V_r|) sum_{(i, t) in V_r} log p(y_{i,t+1} | y_{i,<=t}, m_i),

V_r = the (row, position) pairs of this rank's B rows whose target y_{i,t+1} is a real token
(``TOKEN_MASK``; padding is ignored). The loss is local: every term reads its own row only, so
no gather is needed; the trainer's gradient average over W workers gives (1/W) sum_r L_r, the
mean of per-worker token means (equal to the global token mean when workers hold equally many
tokens). CoCa weights the contrastive and captioning losses 1 : 2 (``coca_tiny``).

Deviations (our reading): CoCa's decoder's unimodal text layers are shared with its
contrastive text encoder; here the decoder has its own unimodal layers and the contrastive loss
uses the model's separate text tower. CoCa pools 256 queries for captioning; we default to 16
for 16-token images. The LM head is tied to the decoder's token embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.data import schema
from vlmray.eval.captioning import caption_metrics
from vlmray.models.decoder import AttentionalPooler, TextDecoder
from vlmray.objectives.base import LossResult, Metric, Objective, SetupContext, require
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.data.tokenize import Tokenizer
    from vlmray.distributed import Dist
    from vlmray.eval.heldout import HeldOut
    from vlmray.models.outputs import Outputs


def token_nll(logits: Tensor, targets: Tensor,
              valid: Tensor) -> tuple[Tensor, dict[str, Metric]]:
    """Mean NLL over the valid positions: logits (B, T, V), targets (B, T), valid (B, T) bool
    -> (loss (), metrics: token accuracy (0-d tensor) and the number of tokens)."""
    # host sync, needed anyway: ``logits[valid]`` below sizes its output from the mask
    if not bool(valid.any()):
        raise ValueError("no real target tokens in the batch: every caption is empty")
    picked, wanted = logits[valid], targets[valid]                               # (n, V), (n,)
    loss = F.cross_entropy(picked.to(torch.promote_types(picked.dtype, torch.float32)), wanted)
    with torch.no_grad():
        acc = (picked.argmax(-1) == wanted).double().mean()
    return loss, {"token_acc": acc, "tokens": float(wanted.numel())}


def check_eval_config(name: str, eval_samples: int, beam_size: int) -> None:
    if eval_samples < 1 or beam_size < 1:
        raise ValueError(f"{name}: eval_samples and beam_size must be >= 1, got "
                         f"{eval_samples}, {beam_size}")


def image_tokens(model: nn.Module, pixels: Tensor, device: torch.device) -> Tensor:
    """The model's projected image tokens (B, N, D) for held-out pixels (B, 3, S, S)."""
    _, tokens = model.encode_image(pixels.to(device), tokens=True)
    if tokens is None:
        raise ValueError("the model returned no image tokens (encode_image(tokens=True))")
    return tokens


@register_objective("caption")
class CaptionLoss(Objective):
    """CoCa's captioning loss L_cap (module docstring): attentional pooler over
    ``Outputs.image_tokens`` -> memory; causal decoder over ``schema.TOKENS`` predicts each
    next real token. Owns the pooler and decoder, sized in ``setup`` from D and the vocab."""

    needs = frozenset({"image_tokens"})

    @dataclass(kw_only=True)
    class Config:
        unimodal_layers: int = 1
        """Decoder blocks without cross-attention (text only), first."""
        multimodal_layers: int = 2
        """Decoder blocks with cross-attention to the pooled image, after those."""
        heads: int = 4
        """Attention heads of the pooler and decoder (must divide D)."""
        n_queries: int = 16
        """Attentional-pooler queries: the memory's length (CoCa: 256)."""
        max_len: int = 64
        """Longest caption (positions) the decoder handles."""
        eval_samples: int = 64
        """Held-out images captioned by ``evaluate``."""
        beam_size: int = 3
        """Beam width of ``evaluate``'s beam decoding (greedy is always reported too)."""

        def __post_init__(self) -> None:
            if self.unimodal_layers < 0 or self.multimodal_layers < 1:
                raise ValueError(f"caption: need unimodal_layers >= 0 and multimodal_layers >= "
                                 f"1, got {self.unimodal_layers}, {self.multimodal_layers}")
            if self.heads < 1 or self.n_queries < 1 or self.max_len < 2:
                raise ValueError(f"caption: need heads >= 1, n_queries >= 1, max_len >= 2; got "
                                 f"{self.heads}, {self.n_queries}, {self.max_len}")
            check_eval_config("caption", self.eval_samples, self.beam_size)

    def __init__(self, cfg: CaptionLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else CaptionLoss.Config()
        self.pooler: AttentionalPooler | None = None
        self.decoder: TextDecoder | None = None

    def setup(self, ctx: SetupContext) -> None:
        """Pooler and decoder at width D = ``ctx.embed_dim`` over ``ctx.vocab_size`` ids."""
        d, cfg = ctx.embed_dim, self.cfg
        if d % cfg.heads != 0:
            raise ValueError(f"caption: embed_dim D={d} is not divisible by heads={cfg.heads}")
        if ctx.vocab_size < 5:
            raise ValueError(f"caption: needs the tokenizer's vocab_size, got {ctx.vocab_size}")
        self.pooler = AttentionalPooler(d, cfg.n_queries, cfg.heads)
        self.decoder = TextDecoder(ctx.vocab_size, d, unimodal_layers=cfg.unimodal_layers,
                                   multimodal_layers=cfg.multimodal_layers, heads=cfg.heads,
                                   max_len=cfg.max_len)

    def _parts(self) -> tuple[AttentionalPooler, TextDecoder]:
        if self.pooler is None or self.decoder is None:
            raise ValueError(f"objective {self.name!r} has no decoder yet: call "
                             "setup(SetupContext) first (ObjectiveMix.setup does)")
        return self.pooler, self.decoder

    def logits(self, img_tokens: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Teacher-forced next-token logits (B, L-1, V) for inputs ids[:, :-1]."""
        pooler, decoder = self._parts()
        return decoder(ids[:, :-1], mask[:, :-1], pooler(img_tokens))

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_cap over this rank's real caption tokens."""
        img_tokens = require(out, "image_tokens", self.name)                   # (B, N, D)
        ids, mask = batch[schema.TOKENS], batch[schema.TOKEN_MASK]              # (B, L)
        if ids.shape[0] != img_tokens.shape[0] or ids.shape[1] < 2:
            raise ValueError(f"caption: need tokens (B, L >= 2) for {img_tokens.shape[0]} "
                             f"images, got {tuple(ids.shape)}")
        logits = self.logits(img_tokens, ids, mask)                             # (B, L-1, V)
        loss, metrics = token_nll(logits, ids[:, 1:], mask[:, 1:].bool())
        return LossResult(loss=loss, metrics=metrics)

    @torch.no_grad()
    def generate(self, model: nn.Module, pixels: Tensor, *, max_len: int, beam_size: int,
                 bos_id: int, eos_id: int, pad_id: int) -> Tensor:
        """Captions ids (B, max_len) for pixels (B, 3, S, S) (``TextDecoder.generate``)."""
        pooler, decoder = self._parts()
        device = decoder.pos.device
        memory = pooler(image_tokens(model, pixels, device).to(decoder.pos.dtype))
        return decoder.generate(memory, max_len=max_len, beam_size=beam_size, bos_id=bos_id,
                                eos_id=eos_id, pad_id=pad_id)

    def evaluate(self, model: nn.Module, data: HeldOut, tokenizer: Tokenizer) -> dict[str, float]:
        """``caption_{bleu4,f1}_{greedy,beam}`` on the first ``eval_samples`` held-out images."""
        return caption_metrics(self, model, data, tokenizer, prefix="caption",
                               samples=self.cfg.eval_samples, beam_size=self.cfg.beam_size)


__all__ = ["CaptionLoss", "check_eval_config", "image_tokens", "token_nll"]
