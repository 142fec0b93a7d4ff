r"""Region-word matching: box regions scored against the caption words that name them, the
classification logits of a detector replaced by region-word alignment scores (Li et al., 2022,
"Grounded Language-Image Pre-training" (GLIP); Yao et al., 2022, "DetCLIP").

Inputs per row i and box slot k (``vlmray.data.regions``): a box b_ik, the caption positions
m_ik (REGION_SPANS, 1 on the phrase's words) and a validity bit v_ik (REGION_MASK). With the
projected image tokens T^img and text tokens T^txt of the model,

    r_ik = normalize( h( pool(T^img_i, b_ik) ) )             (region, ``vlmray.models.regions``)
    p_ik = normalize( sum_l m_ikl T^txt_il / sum_l m_ikl )  (phrase: mean of its word tokens)

where h is a linear region head (initialised to the identity) this objective owns. Over the
set V of valid (i, k) of the GLOBAL batch (all workers, gathered with gradient) the alignment
logits are S_ab = s r_a . p_b (a, b in V) with the objective's own learnable scale s (its own
temperature, not the model's ``logit_scale``: region-word scores and image-text scores live at
different ranges). Positives are the phrases of the region's own row that name the same caption
words, P(a) = {b in V : row(b) = row(a), m_b = m_a} (on the built-in data every box of a row has
the same phrase, so the row's boxes share one span and their phrase features are identical):

    l^{r->p}_a = -log( sum_{b in P(a)} exp S_ab / sum_{b in V} exp S_ab )
    l^{p->r}_a = -log( sum_{b in P(a)} exp S_ba / sum_{b in V} exp S_ba )
    L = 1/(2|V|) sum_{a in V} ( l^{r->p}_a + l^{p->r}_a )

Each term is -log of the TOTAL probability of the positives: the duplicated phrase features
of a row (one per box slot) act as one target, and a phrase's positives are all the boxes it
names (any of them may win). The loss can reach 0, which averaging the positives'
log-probabilities (SupCon-style) would not: that floors it at log|P(a)| when the positives'
scores are equal, as they are here. Phrases of OTHER rows are negatives,
even when they name the same class (as CLIP treats same-class pairs): text tokens are
contextual, so two captions' "red circle" states differ. Worker r, holding the rows R_r,
computes L_r = W/(2|V|) sum_{a in V, row(a) in R_r} ( l^{r->p}_a + l^{p->r}_a ), so
(1/W) sum_r L_r = L, and with the gradient-carrying gather the trainer's average of the
workers' gradients is the single-process gradient. With |V| = 0 the loss is 0, still connected
to the graph (every parameter gets a zero gradient).

Deviations from the papers (our reading): GLIP scores each anchor / proposal against every
word token (S = O P^T), supervises it with a binary (focal) loss on the tokens of its phrase, and
fuses image and text deeply before that; DetCLIP scores regions against a batch-level concept
dictionary with a focal-style loss. Here the regions are the data's ground-truth boxes pooled
from the ViT's patch tokens (no box prediction or regression, no fusion), a phrase is the mean
of its word tokens rather than token by token, and the loss is a symmetric softmax over the
global batch's phrases (CLIP-style) rather than per-token binary terms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.data import schema
from vlmray.eval.grounding import grounding_metrics
from vlmray.models.regions import pool_regions
from vlmray.objectives.base import LossResult, Objective, SetupContext, require, stack_metrics
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.data.tokenize import Tokenizer
    from vlmray.distributed import Dist
    from vlmray.eval.heldout import HeldOut
    from vlmray.models.outputs import Outputs

REGION_INPUTS = (schema.REGION_BOXES, schema.REGION_SPANS, schema.REGION_MASK)


def phrase_features(text_tokens: Tensor, spans: Tensor) -> Tensor:
    """p (B, K, D): normalised mean of text tokens (B, L, D) over spans (B, K, L) (0/1); rows
    with an empty span give a zero vector."""
    spans = spans.to(text_tokens.dtype)
    summed = torch.einsum("bkl,bld->bkd", spans, text_tokens)
    return F.normalize(summed / spans.sum(-1, keepdim=True).clamp(min=1.0), dim=-1)


def multi_positive_ce(logits: Tensor, pos: Tensor, cols: Tensor) -> Tensor:
    """Per row: -log(sum_{pos} exp / sum_{cols} exp) for logits (M, C), pos (M, C) bool (a
    subset of ``cols``), cols (C,) bool. A row without positives gives 0."""
    floor = torch.finfo(logits.dtype).min
    pos = pos | (~pos.any(1, keepdim=True) & cols)          # no positive: numerator = denominator
    num = logits.masked_fill(~pos, floor).logsumexp(1)
    den = logits.masked_fill(~cols, floor).logsumexp(1)
    return den - num


@register_objective("regionword")
class RegionWordLoss(Objective):
    """Symmetric region-word alignment over the global batch (see the module docstring for L).

    Owns a linear region head h (D x D, identity at init) and the log of its scale s; needs a
    ViT vision tower (``SetupContext.patch_grid``) and the data's region columns
    (``data.regions > 0``). ``evaluate`` reports region-word grounding accuracy on the held-out
    split (``vlmray.eval.grounding``).
    """

    needs = frozenset({"image_tokens", "text_tokens", "text_mask", *REGION_INPUTS})

    @dataclass(kw_only=True)
    class Config:
        init_temperature: float = 0.07
        """Initial temperature 1/s of the alignment logits."""
        max_scale: float = 100.0
        """Upper clamp of s (as CLIP's logit scale)."""
        region_head: bool = True
        """Learn the linear region head h; False: h is the identity (no parameters)."""

        def __post_init__(self) -> None:
            if not 0.0 < self.init_temperature <= 1.0:
                raise ValueError(f"regionword: init_temperature must be in (0, 1], got "
                                 f"{self.init_temperature}")
            if self.max_scale < 1.0 / self.init_temperature:
                raise ValueError(f"regionword: max_scale ({self.max_scale}) must be >= "
                                 f"1/init_temperature ({1.0 / self.init_temperature:g})")

    def __init__(self, cfg: RegionWordLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else RegionWordLoss.Config()
        self.grid: tuple[int, int] | None = None
        self.head: nn.Module = nn.Identity()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.cfg.init_temperature)))

    def setup(self, ctx: SetupContext) -> None:
        """The patch grid of the vision tower and the region head at width D."""
        if ctx.patch_grid is None:
            raise ValueError("regionword pools regions from patch tokens: it needs a ViT vision "
                             "tower (SetupContext.patch_grid is None for this model)")
        self.grid = (ctx.patch_grid[0], ctx.patch_grid[1])
        if self.cfg.region_head:
            head = nn.Linear(ctx.embed_dim, ctx.embed_dim)
            with torch.no_grad():
                head.weight.copy_(torch.eye(ctx.embed_dim))
                head.bias.zero_()
            self.head = head

    @property
    def scale(self) -> Tensor:
        """s = exp(log_scale), clamped to ``max_scale``."""
        return self.log_scale.clamp(max=math.log(self.cfg.max_scale)).exp()

    def region_features(self, image_tokens: Tensor, boxes: Tensor) -> Tensor:
        """r (B, K, D): normalised h(pool(tokens (B, N, D), boxes (B, K, 4)))."""
        if self.grid is None:
            raise ValueError(f"objective {self.name!r} has no patch grid yet: call "
                             "setup(SetupContext) first (ObjectiveMix.setup does)")
        pooled = pool_regions(image_tokens, self.grid, boxes.to(image_tokens.dtype))
        return F.normalize(self.head(pooled), dim=-1)

    def inputs(self, batch: Mapping[str, Tensor],
               out: Outputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(r (B, K, D), p (B, K, D), valid (B, K) bool, spans (B, K, L)), checked."""
        missing = [c for c in REGION_INPUTS if c not in batch]
        if missing:
            raise ValueError(f"objective {self.name!r} needs batch columns {missing}: set "
                             "data.regions > 0 (max boxes per row)")
        img_tok = require(out, "image_tokens", self.name)
        txt_tok = require(out, "text_tokens", self.name)
        boxes, spans, valid = (batch[c] for c in REGION_INPUTS)
        b, k = valid.shape
        if (boxes.shape != (b, k, 4) or spans.shape != (b, k, txt_tok.shape[1])
                or img_tok.shape[0] != b or txt_tok.shape[0] != b):
            raise ValueError(
                f"regionword: need region_boxes (B, K, 4), region_spans (B, K, L), region_mask "
                f"(B, K), image_tokens (B, N, D), text_tokens (B, L, D); got "
                f"{tuple(boxes.shape)}, {tuple(spans.shape)}, {tuple(valid.shape)}, "
                f"{tuple(img_tok.shape)}, {tuple(txt_tok.shape)}")
        valid = valid > 0
        spans = spans * valid[..., None].to(spans.dtype)
        return (self.region_features(img_tok, boxes), phrase_features(txt_tok, spans), valid,
                spans)

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r: this worker's share of the symmetric region-word loss."""
        r, p, valid, spans = self.inputs(batch, out)
        b, k, d = r.shape
        packed = torch.cat((r, p, valid[..., None].to(r.dtype), spans.to(r.dtype)), dim=-1)
        everything = dist.all_gather(packed, with_grad=True)                  # (N, K, 2D+1+L)
        all_r, all_p = everything[..., :d], everything[..., d:2 * d]
        all_valid = everything[..., 2 * d].detach() > 0.5                      # (N, K)
        all_spans = everything[..., 2 * d + 1:].detach()                       # (N, K, L)
        rows = dist.offsets(b, device=r.device)
        pos = self.positives(spans.to(r.dtype), valid, all_spans, all_valid, rows)  # (BK, NK)
        cols = all_valid.flatten()
        s = self.scale
        logits = s * r.flatten(0, 1) @ all_p.flatten(0, 1).T                   # (BK, NK) r->p
        l_rp = multi_positive_ce(logits, pos, cols)
        l_pr = multi_positive_ce(s * p.flatten(0, 1) @ all_r.flatten(0, 1).T, pos, cols)
        n_valid = all_valid.sum()
        terms = torch.where(valid.flatten(), l_rp + l_pr, torch.zeros_like(l_rp))
        loss = terms.sum() * (dist.world_size / (2.0 * n_valid.clamp(min=1).to(r.dtype)))
        return LossResult(loss=loss, metrics=self.metrics(logits, pos, cols, valid, n_valid))

    @staticmethod
    def positives(spans: Tensor, valid: Tensor, all_spans: Tensor, all_valid: Tensor,
                  rows: Tensor) -> Tensor:
        """pos (B*K, N*K) bool: column (j, k') is a positive of local region (i, k) iff
        j = rows[i], both are valid and their spans are equal."""
        b, k, _ = spans.shape
        n = all_valid.shape[0]
        own = all_spans[rows]                                                  # (B, K, L)
        same = (spans[:, :, None, :] == own[:, None, :, :]).all(-1)             # (B, K, K)
        same &= valid[:, :, None] & all_valid[rows][:, None, :]
        pos = torch.zeros(b, k, n, k, dtype=torch.bool, device=spans.device)
        pos[torch.arange(b, device=spans.device), :, rows, :] = same
        return pos.reshape(b * k, n * k)

    @staticmethod
    @torch.no_grad()
    def metrics(logits: Tensor, pos: Tensor, cols: Tensor, valid: Tensor,
                n_valid: Tensor) -> dict[str, Tensor]:
        """acc: share of this worker's valid regions whose best phrase is a positive;
        valid_frac: share of the global box slots that are valid."""
        rows = valid.flatten()
        best = logits.masked_fill(~cols, float("-inf")).argmax(1)
        hit = pos.gather(1, best[:, None]).squeeze(1) & rows
        acc = hit.sum() / rows.sum().clamp(min=1)
        frac = n_valid / cols.numel()
        return stack_metrics(("acc", "valid_frac"), (acc.double(), frac.double()))

    def evaluate(self, model: nn.Module, data: HeldOut, tokenizer: Tokenizer) -> dict[str, float]:
        """grounding_top1 / grounding_chance on the held-out boxes (``vlmray.eval.grounding``)."""
        return grounding_metrics(model, data, tokenizer, region_features=self.region_features)


__all__ = ["RegionWordLoss", "multi_positive_ce", "phrase_features"]
