r"""NLIP's noise completion (Huang, Long, Han, Xu, Liang, Xu and Liang, AAAI 2023, "NLIP:
Noise-robust Language-Image Pre-training"), on top of its noise harmonisation (``nlip``).

Harmonisation (``NlipLoss``) gives every pair i of the global batch a noise probability p_i
(a two-component GMM on recent per-pair contrastive losses) and softens its contrastive
target by p_i: L_har. Completion adds a concept-conditioned caption decoder and uses its
captions as an auxiliary text for the pairs judged noisy:

Concepts. A vocabulary of K concept words c_1..c_K (``Config.concepts``) is tokenised with the
data's tokenizer and embedded by the model's own text tower, e_k = f_t(c_k) (no grad, refreshed
every ``concept_refresh`` steps). Image i's concepts are the top-k words by cosine:
C_i = topk_k cos(u_i, e_k), u_i its image embedding.

Decoder. A causal text decoder g cross-attends to the memory
m_i = [ image tokens of i (N_img, D) ; g's own token embeddings of the words of C_i ]
and is trained on the real captions y_i, each row weighted by how clean the pair looks:

    L_cap = (1/N) sum_i (1 - p_i) * (1/T_i) sum_{t < T_i} -log g(y_{i,t+1} | y_{i,<=t}, m_i)

(T_i real target tokens of row i; rows without any contribute 0).

Completion. Before each step's forward (``prepare``, no grad) g greedily writes a caption
y~_i for every image from m_i; the model encodes it with its text tower, c_i = f_t(y~_i)
(``Outputs.extra["completion_embeds"]``), and an InfoNCE between images and completions,
weighted by p_i, lets the likely-noisy pairs lean on their completion (s = the model's
logit scale, U, C the gathered image / completion embeddings):

    L_aux = (1/N) sum_i p_i * 1/2 [ CE(s u_i C^T, i) + CE(s c_i U^T, i) ]

    L = L_har + w_cap L_cap + w_aux L_aux      (w_cap = ``caption_weight``, w_aux = ``aux_weight``)

Before the first GMM fit p_i = 0: L_har is CLIP's loss, L_cap the plain captioning loss
(per-row mean) and L_aux = 0.

Deviations, stated plainly (our reading where the paper is terse). The paper pre-trains its
captioner and picks concepts from a large external concept vocabulary scored by the model's
own image-text similarity; here the concept vocabulary is a short configurable word list
(default: the built-in data's colours, shapes and sizes) and the decoder trains jointly from
scratch. The paper *replaces* a noisy pair's caption with the generated one (or appends
it); we keep the original pair in the harmonised loss and add the completion as a second,
p_i-weighted positive text (an auxiliary InfoNCE), so completions of an untrained decoder
cannot hurt before the GMM says a pair is noisy. Captions are greedy (no beam, no nucleus
sampling) and regenerated every step for every row. Concept embeddings and completions use
the model in eval mode (no dropout; RA-CLIP references are not used for them).

Distribution: L_har is ``NlipLoss``'s (exact); L_cap is local per row; L_aux gathers both
embeddings with gradients (``ClipLoss.logits``), each rank scoring its B rows against all N
columns. Every rank holds the same GMM, so (1/W) sum_r L_r = L with exact gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.data import schema
from vlmray.eval.captioning import caption_metrics, special_tokens
from vlmray.models.decoder import TextDecoder
from vlmray.models.outputs import COMPLETION_EMBEDS
from vlmray.objectives.base import LossResult, SetupContext, require, stack_metrics
from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.contrastive.nlip import NlipLoss
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.data.tokenize import Tokenizer
    from vlmray.distributed import Dist
    from vlmray.eval.heldout import HeldOut
    from vlmray.models.outputs import Outputs

DEFAULT_CONCEPTS = ("red,green,blue,yellow,purple,circle,square,triangle,cross,"
                    "small,little,tiny,large,big")
"""The built-in data's colour, shape and size words (``vlmray.data.synthetic_text``)."""


def concept_words(concepts: str) -> list[str]:
    """The comma-separated words of ``Config.concepts``, stripped, empties dropped."""
    return [w.strip() for w in concepts.split(",") if w.strip()]


def top_concepts(image_embeds: Tensor, concept_embeds: Tensor, k: int) -> Tensor:
    """Indices (B, k) of each image's k concepts of highest cosine, best first:
    image_embeds (B, D), concept_embeds (K, D), k <= K."""
    sims = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(concept_embeds.float(),
                                                                   dim=-1).T  # (B, K)
    return sims.topk(k, dim=1).indices


def weighted_caption_loss(logits: Tensor, targets: Tensor, valid: Tensor,
                          weights: Tensor) -> Tensor:
    """(1/B) sum_i w_i * mean_{t valid} -log p(targets_it): logits (B, T, V), targets (B, T),
    valid (B, T) bool, weights (B,) (constants). Rows without valid targets contribute 0."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    nll = F.cross_entropy(logits.to(wide).transpose(1, 2), targets, reduction="none")  # (B, T)
    count = valid.sum(dim=1)                                                     # (B,)
    per_row = (nll * valid).sum(dim=1) / count.clamp(min=1)
    return (weights.detach().to(wide) * per_row).mean()


def weighted_infonce(clip: ClipLoss, image: Tensor, other: Tensor, scale: Tensor,
                     weights: Tensor, dist: Dist) -> Tensor:
    """(1/N) sum_i w_i 1/2 [CE(s u_i O^T, i) + CE(s o_i U^T, i)] as this rank's share:
    image, other (B, D) normalised; weights (B,) for local gathering, (N,) for global (the
    rows ``clip.logits`` scores). Gathers with gradients through ``clip.logits``."""
    per_image, per_other = clip.logits(image, other, scale, dist)               # (R, N) each
    labels = clip.targets(per_image, dist)                                       # (R,)
    wide = torch.promote_types(per_image.dtype, torch.float32)
    rows = 0.5 * (F.cross_entropy(per_image.to(wide), labels, reduction="none")
                  + F.cross_entropy(per_other.to(wide), labels, reduction="none"))  # (R,)
    return (weights.detach().to(wide) * rows).mean()


@register_objective("nlip_completion")
class NlipCompletionLoss(NlipLoss):
    """NLIP's harmonised InfoNCE plus noise completion (module docstring): a concept-
    conditioned caption decoder trained on the pairs judged clean, whose greedy captions
    (``prepare``) give the pairs judged noisy an auxiliary p_i-weighted InfoNCE."""

    needs = NlipLoss.needs | {"image_tokens", COMPLETION_EMBEDS}

    @dataclass(kw_only=True)
    class Config(NlipLoss.Config):
        concepts: str = DEFAULT_CONCEPTS
        """Comma-separated concept words (each tokenises to >= 1 non-special id)."""
        top_k: int = 3
        """Concepts per image in the decoder's memory; 1 <= top_k <= number of concepts."""
        concept_refresh: int = 50
        """Re-embed the concepts with the current text tower every this many steps; > 0."""
        caption_weight: float = 1.0
        """w_cap, the weight of the (1 - p)-weighted captioning loss; >= 0."""
        aux_weight: float = 1.0
        """w_aux, the weight of the p-weighted image-completion InfoNCE; >= 0."""
        unimodal_layers: int = 1
        """Decoder blocks without cross-attention, first."""
        multimodal_layers: int = 2
        """Decoder blocks with cross-attention to the memory; >= 1."""
        heads: int = 4
        """Decoder attention heads (must divide D)."""
        max_len: int = 64
        """Longest caption (positions) the decoder handles; >= the data's context length."""
        eval_samples: int = 64
        """Held-out images ``evaluate`` captions."""

        def __post_init__(self) -> None:
            super().__post_init__()
            words = concept_words(self.concepts)
            checks = [(len(words) >= 1, "concepts must name at least one word"),
                      (len(set(words)) == len(words), "concepts must be distinct"),
                      (1 <= self.top_k <= max(1, len(words)),
                       f"top_k must be in [1, {len(words)}] (the number of concepts)"),
                      (self.concept_refresh > 0, "concept_refresh must be > 0"),
                      (self.caption_weight >= 0 and self.aux_weight >= 0,
                       "caption_weight and aux_weight must be >= 0"),
                      (self.unimodal_layers >= 0 and self.multimodal_layers >= 1,
                       "need unimodal_layers >= 0 and multimodal_layers >= 1"),
                      (self.heads >= 1 and self.max_len >= 2, "need heads >= 1, max_len >= 2"),
                      (self.eval_samples >= 1, "eval_samples must be >= 1")]
            for ok, message in checks:
                if not ok:
                    raise ValueError(f"nlip_completion: {message}, got {self}")

    def __init__(self, cfg: NlipCompletionLoss.Config | None = None) -> None:
        super().__init__(cfg if cfg is not None else NlipCompletionLoss.Config())
        self.cfg: NlipCompletionLoss.Config
        self.decoder: TextDecoder | None = None
        self._model: tuple[nn.Module, ...] = ()    # (core model,): a tuple, not a submodule
        self._specials = (1, 2, 0)                 # (bos, eos, pad), set from the tokenizer
        self.register_buffer("concept_at", torch.full((), -1, dtype=torch.long))

    # --- setup: decoder and concept vocabulary -------------------------------------------------

    def setup(self, ctx: SetupContext) -> None:
        """Decoder at width D over the vocabulary; the concepts tokenised with
        ``ctx.tokenizer``: text-tower inputs (K, L) and word ids (K, L_c) for the memory."""
        d, cfg = ctx.embed_dim, self.cfg
        if ctx.tokenizer is None:
            raise ValueError("nlip_completion needs SetupContext.tokenizer (to tokenise its "
                             "concepts); the trainer sets it")
        if d % cfg.heads != 0:
            raise ValueError(f"nlip_completion: embed_dim D={d} is not divisible by "
                             f"heads={cfg.heads}")
        self._model = (ctx.model,)
        self._specials = special_tokens(ctx.tokenizer)
        self.decoder = TextDecoder(ctx.vocab_size, d, unimodal_layers=cfg.unimodal_layers,
                                   multimodal_layers=cfg.multimodal_layers, heads=cfg.heads,
                                   max_len=cfg.max_len)
        words = concept_words(cfg.concepts)
        ids, mask = (torch.as_tensor(a) for a in ctx.tokenizer(words))        # (K, L) each
        special = torch.tensor(sorted(set(ctx.tokenizer.special_ids)), dtype=ids.dtype)
        content = [row[m.bool() & ~torch.isin(row, special)] for row, m in zip(ids, mask)]
        empty = [w for w, c in zip(words, content) if len(c) == 0]
        if empty:
            raise ValueError(f"nlip_completion: concepts {empty} tokenise to no word ids")
        width = max(len(c) for c in content)
        word_ids = torch.zeros(len(words), width, dtype=torch.long)
        word_mask = torch.zeros(len(words), width, dtype=torch.bool)
        for k, c in enumerate(content):
            word_ids[k, : len(c)], word_mask[k, : len(c)] = c, True
        self.register_buffer("concept_tokens", ids.long(), persistent=False)
        self.register_buffer("concept_token_mask", mask.long(), persistent=False)
        self.register_buffer("concept_words", word_ids, persistent=False)
        self.register_buffer("concept_word_mask", word_mask, persistent=False)
        self.register_buffer("concept_embeds", torch.zeros(len(words), d))

    def _decoder(self) -> TextDecoder:
        if self.decoder is None:
            raise ValueError(f"objective {self.name!r} has no decoder yet: call "
                             "setup(SetupContext) first (ObjectiveMix.setup does)")
        return self.decoder

    @torch.no_grad()
    def refresh_concepts(self, model: nn.Module) -> None:
        """e_k = the model's text embedding of each concept (eval mode), (K, D)."""
        was_training = model.training
        model.eval()
        try:
            emb = model.encode_text(self.concept_tokens, self.concept_token_mask)[0]
        finally:
            model.train(was_training)
        self.concept_embeds.copy_(emb.to(self.concept_embeds))
        self.concept_at.copy_(self.step)

    # --- the concept-conditioned decoder -------------------------------------------------------

    def memory(self, img_tokens: Tensor, concepts: Tensor) -> tuple[Tensor, Tensor]:
        """m = [image tokens (B, N, D); decoder embeddings of the concepts' words (B, k L_c,
        D)] and its mask (B, N + k L_c) bool; concepts (B, k) indices."""
        words = self.concept_words[concepts].flatten(1)                           # (B, k L_c)
        word_mask = self.concept_word_mask[concepts].flatten(1)
        emb = self._decoder().embed(words).to(img_tokens.dtype)                   # (B, kL_c, D)
        real = torch.ones(img_tokens.shape[:2], dtype=torch.bool, device=img_tokens.device)
        return torch.cat((img_tokens, emb), dim=1), torch.cat((real, word_mask), dim=1)

    @torch.no_grad()
    def complete(self, model: nn.Module, pixels: Tensor, *, max_len: int, beam_size: int = 1,
                 specials: tuple[int, int, int] | None = None) -> tuple[Tensor, Tensor]:
        """(captions ids (B, max_len) = [BOS, y~, EOS, PAD...], concepts (B, k)) for pixels
        (B, 3, S, S), with ``model`` in eval mode and the current concept embeddings;
        ``specials`` = (bos, eos, pad), default the tokenizer's given at setup."""
        was_training = model.training
        model.eval()
        try:
            emb, tokens = model.encode_image(pixels, tokens=True)
        finally:
            model.train(was_training)
        if tokens is None:
            raise ValueError("nlip_completion: the model returned no image tokens")
        concepts = top_concepts(emb, self.concept_embeds, self.cfg.top_k)          # (B, k)
        decoder = self._decoder()
        memory, memory_mask = self.memory(tokens.to(decoder.pos.dtype), concepts)
        bos, eos, pad = specials if specials is not None else self._specials
        ids = decoder.generate(memory, memory_mask, max_len=max_len, beam_size=beam_size,
                               bos_id=bos, eos_id=eos, pad_id=pad)
        if ids.shape[1] < max_len:                          # decoder.max_len < the batch's L
            ids = F.pad(ids, (0, max_len - ids.shape[1]), value=pad)
        return ids, concepts

    @torch.no_grad()
    def prepare(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``COMPLETION_TOKENS`` / ``COMPLETION_MASK`` (B, L) greedy captions of every image
        (L = the batch's token length) and ``COMPLETION_CONCEPTS`` (B, k); re-embeds the
        concepts first when ``concept_refresh`` steps have passed (or never embedded)."""
        if not self._model:
            raise ValueError(f"objective {self.name!r} has no model yet: call "
                             "setup(SetupContext) first (ObjectiveMix.setup does)")
        model = self._model[0]
        # one host sync (control flow): whether to refresh the concepts first
        at, step = torch.stack((self.concept_at, self.step)).tolist()
        if at < 0 or step - at >= self.cfg.concept_refresh:
            self.refresh_concepts(model)
        ids, concepts = self.complete(model, batch[schema.PIXELS],
                                      max_len=batch[schema.TOKENS].shape[1])
        return {schema.COMPLETION_TOKENS: ids,
                schema.COMPLETION_MASK: (ids != self._specials[2]).long(),
                schema.COMPLETION_CONCEPTS: concepts}

    # --- the loss --------------------------------------------------------------------------

    def caption_loss(self, img_tokens: Tensor, concepts: Tensor, ids: Tensor, mask: Tensor,
                     weights: Tensor) -> Tensor:
        """L_cap's share of this rank: teacher-forced decoder on the real captions ids (B, L),
        mask (B, L), memory from img_tokens (B, N, D) and concepts (B, k); weights (B,)."""
        memory, memory_mask = self.memory(img_tokens, concepts)
        logits = self._decoder()(ids[:, :-1], mask[:, :-1], memory, memory_mask)  # (B, L-1, V)
        return weighted_caption_loss(logits, ids[:, 1:], mask[:, 1:].bool(), weights)

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r = L_har + w_cap L_cap + w_aux L_aux over this rank's rows; updates the GMM
        state when training (as ``nlip``)."""
        image = require(out, "image_embeds", self.name)
        text = require(out, "text_embeds", self.name)
        scale = require(out, "logit_scale", self.name)
        img_tokens = require(out, "image_tokens", self.name)
        completion = out.extra.get(COMPLETION_EMBEDS)
        missing = [c for c in (schema.COMPLETION_CONCEPTS, schema.TOKENS, schema.TOKEN_MASK)
                   if c not in batch]
        if completion is None or missing:
            raise ValueError(f"nlip_completion needs Outputs.extra[{COMPLETION_EMBEDS!r}] and "
                             f"batch columns {missing}: run ObjectiveMix.prepare(batch) before "
                             "the model (train_step does)")
        per_image, per_text = self.clip.logits(image, text, scale, dist)           # (R, N)
        labels = self.clip.targets(per_image, dist)
        pair_loss = self.pair_losses(per_image, per_text, labels)                  # (R,)
        active = self.observe(pair_loss, dist) if self.training else self.is_active()
        if active:
            p_noise = self.noise_probability(pair_loss)                             # (R,) f64
            har = self.harmonised_loss(per_image, per_text, labels, p_noise)
        else:
            p_noise = torch.zeros_like(pair_loss, dtype=torch.float64)
            har = 0.5 * (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels))
        b = image.shape[0]
        p_rows = p_noise if self.cfg.gather == "local" else p_noise[dist.offsets(b)]  # (B,)
        cap = self.caption_loss(img_tokens, batch[schema.COMPLETION_CONCEPTS],
                                batch[schema.TOKENS], batch[schema.TOKEN_MASK], 1.0 - p_rows)
        aux = weighted_infonce(self.clip, image, completion, scale, p_noise, dist)
        loss = har + self.cfg.caption_weight * cap + self.cfg.aux_weight * aux
        metrics = self.metrics(per_image, per_text, labels, scale, p_noise)
        metrics.update(stack_metrics(
            ("harmonised_loss", "caption_loss", "aux_loss", "noisy_rows"),
            (har.detach().double(), cap.detach().double(), aux.detach().double(),
             (p_rows > 0.5).double().sum())))
        return LossResult(loss=loss, metrics=metrics)

    # --- held-out evaluation ------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, model: nn.Module, pixels: Tensor, *, max_len: int, beam_size: int,
                 bos_id: int, eos_id: int, pad_id: int) -> Tensor:
        """``Captioner``: ids (B, max_len) for pixels (B, 3, S, S), conditioned on the
        concepts (embedded with ``model`` first if they never were)."""
        if int(self.concept_at) < 0:
            self.refresh_concepts(model)
        device = self._decoder().pos.device
        return self.complete(model, pixels.to(device), max_len=max_len, beam_size=beam_size,
                             specials=(bos_id, eos_id, pad_id))[0]

    def evaluate(self, model: nn.Module, data: HeldOut, tokenizer: Tokenizer) -> dict[str, float]:
        """``completion_{bleu4,f1}_{greedy,beam}`` of the concept-conditioned captions of the
        first ``eval_samples`` held-out images against their paired captions."""
        return caption_metrics(self, model, data, tokenizer, prefix="completion",
                               samples=self.cfg.eval_samples, beam_size=3)


__all__ = ["DEFAULT_CONCEPTS", "NlipCompletionLoss", "concept_words", "top_concepts",
           "weighted_caption_loss", "weighted_infonce"]
