r"""PaLI's split-captioning prefix-LM objective (Chen et al., 2022, "PaLI: A Jointly-Scaled
Multilingual Language-Image Model"), with a small image+text -> text encoder-decoder.

Row i's caption has k_i words w_1..w_k (between BOS and EOS). A split point
s_i ~ U{0, ..., floor(frac * k_i)} is drawn; the encoder reads [image tokens; w_1..w_s] and the
decoder generates the rest, z_i = (BOS, w_{s+1}, ..., w_k, EOS). Worker r minimises the mean NLL
over its real target tokens

    L_pali = - (1 / |V_r|) sum_{(i, t) in V_r} log p(z_{i,t+1} | z_{i,<=t}, Enc(I_i, w_{i,1..s_i})).

The loss is local (no gather): the trainer's average over workers gives the mean of per-worker
token means. The split points of the global batch of N = W*B rows are drawn with a generator
seeded by (``seed``, step) on every rank, and each rank keeps its own rows, so they do not
depend on W; ``step`` is a buffer (saved in checkpoints) that advances once per forward.

Deviations (our reading): PaLI's encoder-decoder is a pretrained mT5 fed by a ViT, with a
mixture of tasks; here one small encoder-decoder (shared token embedding, T5-style: every
decoder layer cross-attends) learns split-captioning only, on the model's projected image
tokens (CLS included). PaLI splits captions at a random point; we draw s uniformly from
[0, frac * k] so the decoder always has words left to generate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vlmray.data import schema
from vlmray.data.tokenize import EOS
from vlmray.eval.captioning import caption_metrics
from vlmray.models.encdec import EncoderDecoder
from vlmray.objectives.base import LossResult, Objective, SetupContext, require
from vlmray.objectives.generative.caption import check_eval_config, image_tokens, token_nll
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.data.tokenize import Tokenizer
    from vlmray.distributed import Dist
    from vlmray.eval.heldout import HeldOut
    from vlmray.models.outputs import Outputs

_SEED_STRIDE = 1_000_003


def word_counts(ids: Tensor, mask: Tensor, eos_id: int = EOS) -> Tensor:
    """k (B,): real tokens minus the leading BOS and a final EOS (absent when truncated)."""
    n = mask.long().sum(1)                                                      # (B,)
    last = ids.gather(1, (n - 1).clamp(min=0)[:, None]).squeeze(1)
    return (n - 1 - (last == eos_id).long()).clamp(min=0)


def split_points(k: Tensor, frac: float, u: Tensor) -> Tensor:
    """s (B,) = floor(u * (floor(frac * k) + 1)) for uniform u in [0, 1): uniform over
    {0, ..., floor(frac * k)}."""
    hi = torch.floor(frac * k.double()).long()
    s = torch.floor(u.double() * (hi + 1).double()).long()
    return torch.minimum(s, hi)


def split_caption(ids: Tensor, mask: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ids, mask (B, L) = [BOS w_1..w_k EOS PAD..], split points s (B,) ->
    (prefix (B, P) = w_1..w_s, prefix mask (B, P), target (B, T) = [BOS w_{s+1}..w_k EOS],
    target mask (B, T)); P = max s, T = max (n - s); padded slots hold id 0, mask 0."""
    n = mask.long().sum(1)                                                      # (B,)
    length = n - s                                                              # target lengths
    p, t = torch.stack((s.max(), length.max())).tolist()   # one host sync: the shapes
    last = ids.shape[1] - 1
    j = torch.arange(p, device=ids.device)[None]                                # (1, P)
    prefix_mask = j < s[:, None]
    prefix = ids.gather(1, (1 + j).clamp(max=last).expand(ids.shape[0], -1))
    j = torch.arange(t, device=ids.device)[None]                                # (1, T)
    source = torch.where(j == 0, 0, s[:, None] + j).clamp(max=last)
    target_mask = j < length[:, None]
    target = ids.gather(1, source)
    return (prefix * prefix_mask, prefix_mask.long(), target * target_mask, target_mask.long())


@register_objective("pali")
class PaliLoss(Objective):
    """PaLI split-captioning L_pali (module docstring) through an encoder-decoder the objective
    owns, reading ``Outputs.image_tokens`` and ``schema.TOKENS`` / ``TOKEN_MASK``.
    ``last_split`` holds this rank's split points of the latest forward."""

    needs = frozenset({"image_tokens"})

    @dataclass(kw_only=True)
    class Config:
        encoder_layers: int = 2
        """Bidirectional encoder blocks over [image tokens; prefix]."""
        decoder_layers: int = 2
        """Causal decoder blocks, each cross-attending to the encoder states."""
        heads: int = 4
        """Attention heads (must divide D)."""
        split_frac: float = 0.5
        """s is uniform in [0, split_frac * words]; 0 = plain captioning."""
        seed: int = 0
        """Seed of the split points; with the step counter every run is reproducible."""
        max_len: int = 64
        """Longest prefix / target (positions) the encoder-decoder handles."""
        eval_samples: int = 64
        """Held-out images captioned (empty prefix) by ``evaluate``."""
        beam_size: int = 3
        """Beam width of ``evaluate``'s beam decoding (greedy is always reported too)."""

        def __post_init__(self) -> None:
            if self.encoder_layers < 1 or self.decoder_layers < 1 or self.heads < 1:
                raise ValueError(f"pali: encoder_layers, decoder_layers and heads must be >= 1, "
                                 f"got {self.encoder_layers}, {self.decoder_layers}, "
                                 f"{self.heads}")
            if not 0.0 <= self.split_frac <= 1.0:
                raise ValueError(f"pali: split_frac must be in [0, 1], got {self.split_frac}")
            if self.seed < 0 or self.max_len < 2:
                raise ValueError(f"pali: need seed >= 0 and max_len >= 2, got {self.seed}, "
                                 f"{self.max_len}")
            check_eval_config("pali", self.eval_samples, self.beam_size)

    def __init__(self, cfg: PaliLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else PaliLoss.Config()
        self.encdec: EncoderDecoder | None = None
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.last_split: Tensor | None = None

    def setup(self, ctx: SetupContext) -> None:
        """The encoder-decoder at width D = ``ctx.embed_dim`` over ``ctx.vocab_size`` ids."""
        d, cfg = ctx.embed_dim, self.cfg
        if d % cfg.heads != 0:
            raise ValueError(f"pali: embed_dim D={d} is not divisible by heads={cfg.heads}")
        self.encdec = EncoderDecoder(ctx.vocab_size, d, encoder_layers=cfg.encoder_layers,
                                     decoder_layers=cfg.decoder_layers, heads=cfg.heads,
                                     max_len=cfg.max_len)

    def _encdec(self) -> EncoderDecoder:
        if self.encdec is None:
            raise ValueError(f"objective {self.name!r} has no encoder-decoder yet: call "
                             "setup(SetupContext) first (ObjectiveMix.setup does)")
        return self.encdec

    def draw_splits(self, k: Tensor, step: int, dist: Dist) -> Tensor:
        """This rank's split points s (B,) for word counts k (B,): u for all N = W*B rows from
        the generator of (seed, step), this rank's rows kept."""
        b = k.shape[0]
        gen = torch.Generator().manual_seed((self.cfg.seed * _SEED_STRIDE + step) % (2**63 - 1))
        u = torch.rand(b * dist.world_size, generator=gen, dtype=torch.float64)
        rows = dist.offsets(b, device="cpu")
        return split_points(k.cpu(), self.cfg.split_frac, u[rows]).to(k.device)

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_pali over this rank's real target tokens."""
        encdec = self._encdec()
        img_tokens = require(out, "image_tokens", self.name)                    # (B, N, D)
        ids, mask = batch[schema.TOKENS], batch[schema.TOKEN_MASK]               # (B, L)
        if ids.shape[0] != img_tokens.shape[0]:
            raise ValueError(f"pali: {ids.shape[0]} captions for {img_tokens.shape[0]} images")
        # host sync: the step seeds the split sampler's generator
        s = self.draw_splits(word_counts(ids, mask), int(self.step.item()), dist)
        with torch.no_grad():
            self.step += 1
        self.last_split = s
        prefix, prefix_mask, target, target_mask = split_caption(ids, mask, s)
        logits = encdec(img_tokens, prefix, prefix_mask, target[:, :-1], target_mask[:, :-1])
        loss, metrics = token_nll(logits, target[:, 1:], target_mask[:, 1:].bool())
        metrics["prefix_words"] = s.double().mean()
        return LossResult(loss=loss, metrics=metrics)

    @torch.no_grad()
    def generate(self, model: nn.Module, pixels: Tensor, *, max_len: int, beam_size: int,
                 bos_id: int, eos_id: int, pad_id: int) -> Tensor:
        """Captions ids (B, max_len) for pixels (B, 3, S, S) from an empty prefix."""
        encdec = self._encdec()
        device = encdec.decoder.pos.device
        img = image_tokens(model, pixels, device).to(encdec.decoder.pos.dtype)
        empty = torch.zeros(img.shape[0], 0, dtype=torch.long, device=device)
        return encdec.generate(img, empty, empty, max_len=max_len, beam_size=beam_size,
                               bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)

    def evaluate(self, model: nn.Module, data: HeldOut, tokenizer: Tokenizer) -> dict[str, float]:
        """``pali_{bleu4,f1}_{greedy,beam}`` on the first ``eval_samples`` held-out images."""
        return caption_metrics(self, model, data, tokenizer, prefix="pali",
                               samples=self.cfg.eval_samples, beam_size=self.cfg.beam_size)


__all__ = ["PaliLoss", "split_caption", "split_points", "word_counts"]
