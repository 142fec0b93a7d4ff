r"""Image-text matching (ITM) with hard negatives mined from the contrastive similarities
(Li et al., 2021, "Align before Fuse" (ALBEF); Li et al., 2022, "BLIP"; through the backbone's
own fusion for FIBER, Dou et al., 2022).

A fusion encoder f reads a (text, image) token pair and a 2-way head h scores its pair
representation: p(match | I, T) = softmax(h(f(T, I)))_1. For the global batch of N pairs with
normalised embeddings u_i (image), v_j (text) and scale s, every image i gets one negative
text j ~ q^{i2t}_i and every text i one negative image k ~ q^{t2i}_i:

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

Two choices of f (``fusion``):

* ``"own"`` (ALBEF / BLIP): the objective owns a ``FusionEncoder`` over the model's projected
  token features (width D); f(T, I) is the fused first text state (D).
* ``"model"`` (FIBER): the model fuses in its backbone (``model.arch="fiber"``):
  (X, Y) = model.fuse(I_in, T_in, m) over the trunk states entering its fusion blocks
  (``fiber_image_in`` / ``fiber_text_in``), and f(T, I) = [Y_CLS ; pool(X)] (C_t + C_v), the
  fused text CLS concatenated with the pooled fused image as in METER / FIBER's ITM head. The
  model's ``fuse`` runs outside the DDP forward, on the gathered rows; DDP reduces the fusion
  blocks' gradients all the same (tests/objectives/test_itm_fiber.py checks them against one
  process on the full batch).

``evaluate`` scores held-out pairs: each true pair and one mismatched pair (the caption of an
image with a different label) -> ``itm_accuracy`` (balanced over positives and negatives) and
``itm_auc`` (ROC AUC of p(match)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.data import schema
from vlmray.models.fiber import FIBER_IMAGE_IN, FIBER_INPUTS, FIBER_TEXT_IN
from vlmray.models.fusion import FusionEncoder
from vlmray.objectives.base import LossResult, Objective, SetupContext, require, stack_metrics
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.data.tokenize import Tokenizer
    from vlmray.distributed import Dist
    from vlmray.eval.heldout import HeldOut
    from vlmray.models.outputs import Outputs

_SEED_STRIDE = 1_000_003
_EMBEDS = frozenset({"image_embeds", "text_embeds", "logit_scale"})
_EVAL_BATCH = 64
Fusion = Literal["own", "model"]


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


def mismatched_pairs(labels: Tensor, samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """(rows (n,), partners (n,)): up to ``samples`` held-out rows drawn without replacement,
    each with the row of another image whose label differs (uniform, fixed ``seed``); rows
    whose label every other row shares are left out."""
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    rows = torch.randperm(len(labels), generator=g)[:samples].sort().values
    other = (labels[rows, None] != labels[None, :]).double()                # (n, N)
    rows, other = rows[other.sum(1) > 0], other[other.sum(1) > 0]
    if len(rows) == 0:
        return rows, rows
    return rows, torch.multinomial(other, 1, generator=g).squeeze(1)


def roc_auc(pos: Tensor, neg: Tensor) -> float:
    """ROC AUC of scores pos (P,) against neg (Q,): P(pos > neg) + P(pos == neg) / 2."""
    diff = pos.double()[:, None] - neg.double()[None, :]
    return ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()


@register_objective("itm")
class ItmLoss(Objective):
    r"""Binary matched / not-matched classification of image-text pairs through a fusion encoder
    (ALBEF / BLIP ITM, or FIBER's fusion in the backbone), with one hard negative text per image
    and one hard negative image per text sampled from the gathered similarity matrix (see the
    module docstring for L).

    ``fusion="own"``: owns the fusion encoder and the 2-way head (width D = ``ctx.embed_dim``).
    ``fusion="model"``: owns only the head (width ``model.pair_width``) and calls the model's
    ``fuse``. ``last_negatives`` holds the global indices (j_i, k_i) drawn for this rank's rows
    in the latest forward (for inspection and tests).
    """

    needs = _EMBEDS | {"image_tokens", "text_tokens", "text_mask"}

    @dataclass(kw_only=True)
    class Config:
        hard_negatives: bool = True
        """True: negatives ~ softmax of the similarities (BLIP); False: uniform over j != i."""
        seed: int = 0
        """Seed of the negative sampling; with the step counter every run is reproducible."""
        fusion: Fusion = "own"
        """own: the objective's fusion encoder; model: the model's ``fuse`` (arch fiber)."""
        layers: int = 2
        """Fusion encoder depth (``fusion="own"``)."""
        heads: int = 4
        """Fusion attention heads (``fusion="own"``; must divide D)."""
        eval_samples: int = 256
        """Held-out pairs ``evaluate`` scores (each with one mismatched pair)."""

        def __post_init__(self) -> None:
            if self.layers < 1 or self.heads < 1:
                raise ValueError(f"itm: layers and heads must be >= 1, got {self.layers}, "
                                 f"{self.heads}")
            if self.seed < 0:
                raise ValueError(f"itm: seed must be >= 0, got {self.seed}")
            if self.fusion not in ("own", "model"):
                raise ValueError(f"itm: fusion must be one of 'own', 'model'; got "
                                 f"{self.fusion!r}")
            if self.eval_samples < 1:
                raise ValueError(f"itm: eval_samples must be >= 1, got {self.eval_samples}")

    def __init__(self, cfg: ItmLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else ItmLoss.Config()
        if self.cfg.fusion == "model":
            self.needs = _EMBEDS | {FIBER_INPUTS}
        self.fusion: FusionEncoder | None = None
        self.head: nn.Module | None = None
        self._model: tuple[nn.Module, ...] = ()   # (core model,): a tuple, not a submodule
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.last_negatives: tuple[Tensor, Tensor] | None = None

    def setup(self, ctx: SetupContext) -> None:
        """own: fusion encoder f and head h sized from D = ``ctx.embed_dim``; model: head h
        sized from the model's ``pair_width``."""
        if self.cfg.fusion == "model":
            if not callable(getattr(ctx.model, "fuse", None)):
                raise ValueError("itm fusion='model' needs a model with fusion in the backbone "
                                 "(model.arch='fiber')")
            self._model = (ctx.model,)
            self.head = nn.Linear(int(ctx.model.pair_width), 2)
            return
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

    def score(self, images: Tensor, texts: Tensor, masks: Tensor,
              model: Any = None) -> Tensor:
        """Match logits (M, 2) of M pairs: image features (M, N_i, C_i), text features
        (M, L, C_t), masks (M, L) bool. ``model``: whose ``fuse`` (fusion="model"; default
        the one given to ``setup``)."""
        if self.head is None or (self.fusion is None and not self._model):
            raise ValueError(f"objective {self.name!r} has no fusion encoder yet: call "
                             "setup(SetupContext) first (ObjectiveMix.setup does)")
        if self.fusion is not None:
            return self.head(self.fusion.pooled(texts, images, masks))
        model = self._model[0] if model is None else model
        return self.head(model.pair_features(*model.fuse(images, texts, masks)))

    def inputs(self, out: Outputs,
               batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                     Tensor]:
        """(image (B, D), text (B, D), s (), image features (B, N_i, C_i), text features
        (B, L, C_t), text mask (B, L) as the text features' dtype), checked. Features: the
        projected tokens (own) or the trunk states entering FIBER's blocks (model)."""
        image = require(out, "image_embeds", self.name)
        text = require(out, "text_embeds", self.name)
        scale = require(out, "logit_scale", self.name)
        if self.cfg.fusion == "model":
            missing = [k for k in (FIBER_IMAGE_IN, FIBER_TEXT_IN) if k not in out.extra]
            if missing:
                raise ValueError(f"itm fusion='model' needs Outputs.extra {missing}: run a "
                                 "model with fusion in the backbone (model.arch='fiber')")
            img_tok, txt_tok = out.extra[FIBER_IMAGE_IN], out.extra[FIBER_TEXT_IN]
        else:
            img_tok = require(out, "image_tokens", self.name)
            txt_tok = require(out, "text_tokens", self.name)
        mask = out.text_mask if out.text_mask is not None else batch.get(schema.TOKEN_MASK)
        if mask is None:
            mask = torch.ones(txt_tok.shape[:2], dtype=torch.bool, device=txt_tok.device)
        b = image.shape[0]
        if (text.shape[0] != b or img_tok.ndim != 3 or txt_tok.ndim != 3
                or img_tok.shape[0] != b or txt_tok.shape[0] != b
                or mask.shape != txt_tok.shape[:2]):
            raise ValueError(
                f"itm: need image/text embeds (B, D), image features (B, N, C), text features "
                f"(B, L, C), text_mask (B, L); got {tuple(image.shape)}, {tuple(text.shape)}, "
                f"{tuple(img_tok.shape)}, {tuple(txt_tok.shape)}, {tuple(mask.shape)}")
        return image, text, scale, img_tok, txt_tok, mask.to(txt_tok.dtype)

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r: mean CE over this rank's B positives and 2B sampled negatives."""
        if self.head is None:
            raise ValueError(f"objective {self.name!r} has no fusion encoder yet: call "
                             "setup(SetupContext) first (ObjectiveMix.setup does)")
        image, text, scale, img_tok, txt_tok, mask = self.inputs(out, batch)
        b = image.shape[0]
        embeds = dist.all_gather(torch.stack((image, text), dim=1).detach(), with_grad=False)
        all_img_tok = dist.all_gather(img_tok, with_grad=True)                    # (N, N_i, C)
        text_and_mask = torch.cat((txt_tok, mask.unsqueeze(-1)), dim=-1)           # (B, L, C+1)
        all_text_and_mask = dist.all_gather(text_and_mask, with_grad=True)         # (N, L, C+1)
        all_txt_tok, all_mask = all_text_and_mask[..., :-1], all_text_and_mask[..., -1].detach()

        step = int(self.step.item())  # host sync: seeds the negative sampler's generator
        neg_text, neg_image = self.sample(*embeds.unbind(dim=1), scale, step)
        rows = dist.offsets(b, device=neg_text.device)
        neg_text, neg_image = neg_text[rows], neg_image[rows]                      # (B,) each
        self.last_negatives = (neg_text, neg_image)
        with torch.no_grad():
            self.step += 1

        images = torch.cat((img_tok, img_tok, all_img_tok[neg_image]))              # (3B, N_i, C)
        texts = torch.cat((txt_tok, all_txt_tok[neg_text], txt_tok))                # (3B, L, C)
        masks = torch.cat((mask, all_mask[neg_text], mask)) > 0.5                   # (3B, L)
        logits = self.score(images, texts, masks)                                   # (3B, 2)
        labels = torch.zeros(3 * b, dtype=torch.long, device=logits.device)
        labels[:b] = 1
        loss = F.cross_entropy(logits, labels)
        return LossResult(loss=loss, metrics=self.metrics(logits, labels, b))

    @staticmethod
    @torch.no_grad()
    def metrics(logits: Tensor, labels: Tensor, b: int) -> dict[str, Tensor]:
        """ITM accuracy over the 3B pairs, and on the positives / negatives alone."""
        hit = (logits.argmax(dim=1) == labels).double()
        return stack_metrics(("acc", "acc_pos", "acc_neg"),
                             (hit.mean(), hit[:b].mean(), hit[b:].mean()))

    # --- held-out evaluation ------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: HeldOut, tokenizer: Tokenizer) -> dict[str, float]:
        """``itm_accuracy``: (accuracy on the true pairs + accuracy on the mismatched pairs) / 2,
        a pair called a match when p(match) > 1/2; ``itm_auc``: ROC AUC of p(match), true vs
        mismatched pairs. Up to ``eval_samples`` rows, partners from ``mismatched_pairs``."""
        rows, partners = mismatched_pairs(data.labels, self.cfg.eval_samples, self.cfg.seed)
        if len(rows) == 0:
            return {}
        pos = self.match_probs(model, data, rows, rows)                           # (n,)
        neg = self.match_probs(model, data, rows, partners)                       # (n,)
        accuracy = 0.5 * ((pos > 0.5).double().mean() + (neg <= 0.5).double().mean())
        return {"itm_accuracy": accuracy.item(), "itm_auc": roc_auc(pos, neg)}

    def match_probs(self, model: nn.Module, data: HeldOut, images: Tensor,
                    captions: Tensor) -> Tensor:
        """p(match) (n,) of held-out image ``images[k]`` with caption ``captions[k]``."""
        device = next(model.parameters()).device
        probs = []
        for start in range(0, len(images), _EVAL_BATCH):
            img = images[start:start + _EVAL_BATCH]
            cap = captions[start:start + _EVAL_BATCH]
            feats = self.pair_inputs(model, data, img, cap, device)
            probs.append(self.score(*feats, model=model).float().softmax(-1)[:, 1].cpu())
        return torch.cat(probs)

    def pair_inputs(self, model: Any, data: HeldOut, images: Tensor, captions: Tensor,
                    device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """What ``score`` reads for held-out pairs: (image feats, text feats, mask bool)."""
        pixels = data.pixels[images].to(device)
        if getattr(model, "text_input", "tokens") == "pixels":        # CLIPPO: rendered text
            rendered = data.rendered_captions(data.pixels.shape[-1])[captions].to(device)
            txt = model.encode_text(rendered, tokens=True)[1]
            mask = torch.ones(txt.shape[:2], dtype=torch.bool, device=device)
            return model.encode_image(pixels, tokens=True)[1], txt, mask
        ids = data.tokens[captions].to(device)
        mask = data.token_mask[captions].to(device)
        if self.cfg.fusion == "model":
            return model.image_inputs(pixels), model.text_inputs(ids, mask), mask.bool()
        img = model.encode_image(pixels, tokens=True)[1]
        return img, model.encode_text(ids, mask)[1], mask.bool()


__all__ = ["ItmLoss", "mismatched_pairs", "negative_weights", "roc_auc"]
