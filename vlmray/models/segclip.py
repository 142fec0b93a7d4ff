r"""SegCLIP's image encoder: a ViT whose middle layer groups patches into learnable centres.

Luo et al., 2023, "SegCLIP: Patch Aggregation with Learnable Centers for Open-Vocabulary Semantic
Segmentation" (ICML). The dual encoder's text tower and CLIP loss are unchanged; the vision trunk
(a timm ViT of depth L) is cut after block ``split`` and a semantic group module is inserted:

    X = blocks[:split]([CLS; P + pos])           (B, 1 + N, C)  N = grid_h * grid_w patches
    Q = G + MHA(LN(G), LN(X), LN(X))             (B, K, C)      G: K learnable centres
    S[n, k] = (W_q LN(x_n)) . (W_k LN(q_k)) / (sqrt(C) tau)    (+ Gumbel noise g when on)
    A~ = softmax_k(S)                            (B, N, K)      soft assignment
    A  = onehot(argmax_k A~) - sg(A~) + A~  when ``hard`` (straight-through), else A~
    Z_k = Q_k + W_o sum_n A[n,k] x_n / (sum_n A[n,k] + 1)       A-weighted mean of patches
    Z  = Z + MLP(LN(Z))                          (B, K, C)
    z_img = normalize(W_img mean_k LN(blocks[split:](Z)))       (B, D)

and trained with CLIP's contrastive loss on (z_img, z_txt). Segmentation needs no decoder: each
patch takes its centre's best-matching class prompt (``vlmray.eval.segmentation``).

Deviations / our reading: only the contrastive path is implemented (the paper adds an MAE-style
reconstruction loss on masked patches and a superpixel KL loss on A; both are left out). The
paper inserts the module after layer 10 of a 12-layer CLIP ViT-B/16 initialised from CLIP; here
``split`` is a setting (negative counts from the end, -1 = before the last block) and the
trunk starts from scratch. The centres' cross-attention reads the CLS token as well as the
patches (so every trunk parameter is used); only patches are assigned. The residual Q_k in
Z_k, the MLP and the +1 in the mean's denominator follow GroupViT's grouping block, which
SegCLIP's module builds on (the +1 keeps the straight-through gradient of an empty centre
finite: with a tiny epsilon it is ~1/eps and gradient clipping then freezes everything else).
Gumbel noise (``gumbel``) is added in training only; the default is a plain softmax.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.data.synthetic import has_objects, label_map
from vlmray.eval.heldout import class_prompts
from vlmray.eval.metrics import class_embeddings
from vlmray.eval.segmentation import (
    confusion_matrix,
    patch_labels,
    segmentation_scores,
    upsample_labels,
)
from vlmray.models import ARCH_CHECKS, MODEL_ARCHS
from vlmray.models.dual_encoder import DualEncoder
from vlmray.models.towers import TextTower, VisionTower

if TYPE_CHECKING:
    from vlmray.config import ModelConfig
    from vlmray.data.tokenize import Tokenizer
    from vlmray.eval.heldout import HeldOut

ARCH_KWARGS: dict[str, Any] = {"centres": 8, "heads": 4, "tau": 1.0, "hard": True,
                               "gumbel": False, "split": -1, "mlp_ratio": 2.0}
"""``model.arch_kwargs`` of ``segclip`` and their defaults."""
BACKGROUND_PROMPT = "a plain background"
"""The text that stands for the background class in segmentation."""
SEG_MAX_IMAGES = 128
"""Segmentation is scored on at most this many held-out images."""


class SemanticGroup(nn.Module):
    """K learnable centres that gather patches: patches (B, N, C) -> (centres (B, K, C),
    assignment A (B, N, K)); see the module docstring for the equations."""

    def __init__(self, width: int, *, centres: int, heads: int, tau: float = 1.0,
                 hard: bool = True, gumbel: bool = False, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.tau, self.hard, self.gumbel = tau, hard, gumbel
        self.centres = nn.Parameter(torch.randn(centres, width) * 0.02)     # G (K, C)
        self.norm_centres, self.norm_context = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_patches, self.norm_query = nn.LayerNorm(width), nn.LayerNorm(width)
        self.to_q, self.to_k = nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def assignment(self, patches: Tensor, queries: Tensor) -> Tensor:
        """A (B, N, K): soft, or one-hot with straight-through gradients when ``hard``."""
        q = self.to_q(self.norm_patches(patches))                           # (B, N, C)
        k = self.to_k(self.norm_query(queries))                             # (B, K, C)
        logits = q @ k.transpose(1, 2) / (math.sqrt(q.shape[-1]) * self.tau)   # (B, N, K)
        if self.gumbel and self.training:
            u = torch.rand_like(logits).clamp_(1e-9, 1.0 - 1e-9)
            logits = logits - torch.log(-torch.log(u))
        soft = logits.softmax(-1)
        if not self.hard:
            return soft
        one_hot = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        return one_hot - soft.detach() + soft

    def forward(self, patches: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """patches (B, N, C) to assign; context (B, S, C) the centres attend to (the patches
        plus prefix tokens). Returns (centre tokens (B, K, C), A (B, N, K))."""
        g = self.centres.expand(patches.shape[0], -1, -1).to(patches.dtype)  # (B, K, C)
        kv = self.norm_context(context)
        queries = g + self.attn(self.norm_centres(g), kv, kv, need_weights=False)[0]
        assign = self.assignment(patches, queries)                          # (B, N, K)
        weights = assign / (assign.sum(1, keepdim=True) + 1.0)               # (B, N, K)
        tokens = queries + self.out(weights.transpose(1, 2) @ patches)       # (B, K, C)
        return tokens + self.mlp(self.norm_mlp(tokens)), assign


class SegClip(DualEncoder):
    """The dual encoder with SegCLIP's grouped ViT: ``encode_image`` returns the centres'
    projected tokens (B, K, D) as its per-position features; ``segment`` the patch-to-centre
    assignment and the centres' embeddings; ``evaluate_heldout`` segmentation mIoU."""

    def __init__(self, vision: VisionTower, text: TextTower, *, group: SemanticGroup,
                 split: int, **kwargs: Any) -> None:
        super().__init__(vision, text, **kwargs)
        depth = len(vision.trunk.blocks)
        self.split = split if split >= 0 else depth + split
        if not 0 <= self.split <= depth:
            raise ValueError(f"segclip: split {split} is outside the trunk's {depth} blocks "
                             f"(valid: {-depth}..{depth}; negative counts from the end)")
        self.group = group

    def group_tokens(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """pixels (B, 3, S, S) -> (normed centre tokens (B, K, C), A (B, N, K))."""
        trunk = self.vision.trunk
        x = trunk.patch_embed(self.vision.normalise(pixels))                 # (B, N, C)
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(x)))           # (B, P + N, C)
        for block in trunk.blocks[:self.split]:
            x = block(x)
        tokens, assign = self.group(x[:, trunk.num_prefix_tokens:], x)      # (B, K, C)
        for block in trunk.blocks[self.split:]:
            tokens = block(tokens)
        return trunk.norm(tokens), assign

    def encode_image(self, pixels: Tensor, *, tokens: bool = False,
                     refs: object | None = None) -> tuple[Tensor, Tensor | None]:
        """(image_embeds (B, D), projected centre tokens (B, K, D) or None)."""
        if refs is not None:
            raise ValueError("segclip has no retrieval augmentation module; encode_image got "
                             "refs (RA-CLIP needs model.arch='dual_encoder')")
        centres, _ = self.group_tokens(pixels)                               # (B, K, C)
        emb = F.normalize(self.image_proj(centres.mean(1)), dim=-1)          # (B, D)
        return emb, (self.image_proj(centres) if tokens else None)

    def segment(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(A (B, grid_h * grid_w, K), normalised centre embeddings (B, K, D))."""
        centres, assign = self.group_tokens(pixels)
        return assign, F.normalize(self.image_proj(centres), dim=-1)

    @torch.no_grad()
    def evaluate_heldout(self, data: HeldOut, tokenizer: Tokenizer) -> dict[str, float]:
        """Open-vocabulary segmentation on the first <= 128 held-out images whose sidecars
        carry their objects: seg_miou, seg_miou_fg, seg_pixel_acc, and the mIoU of an
        all-background prediction (seg_miou_all_background) to compare with."""

        rows = [i for i, m in enumerate(data.metas[:SEG_MAX_IMAGES]) if m and has_objects(m)]
        if not rows or self.vision.patch_grid is None:
            return {}
        table = self.segmentation_classes(data, tokenizer)                  # (C + 1, D)
        size, (gh, gw, _) = data.pixels.shape[-1], self.vision.patch_grid
        device = table.device
        truth = torch.stack([torch.from_numpy(label_map(data.metas[i], size)) for i in rows])
        preds = []
        for chunk in torch.tensor(rows).split(64):
            assign, centres = self.segment(data.pixels[chunk].to(device))
            labels = patch_labels(assign.float(), centres.float(), table)   # (b, N)
            preds.append(upsample_labels(labels, (gh, gw), size).cpu())     # (b, S, S)
        n = table.shape[0]
        scores = segmentation_scores(confusion_matrix(torch.cat(preds), truth, n))
        nothing = confusion_matrix(torch.zeros_like(truth), truth, n)
        scores["seg_miou_all_background"] = segmentation_scores(nothing)["seg_miou"]
        return scores

    def segmentation_classes(self, data: HeldOut, tokenizer: Tokenizer) -> Tensor:
        """(C + 1, D) normalised text embeddings: row 0 the background prompt, row c + 1 class
        c's templates averaged (as zero-shot classification does)."""

        device = self.log_logit_scale.device
        ids, mask = tokenizer(class_prompts(data.classnames, data.templates) + [BACKGROUND_PROMPT])
        ids, mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
        emb = torch.cat([self.encode_text(ids[i:i + 256], mask[i:i + 256])[0].float()
                         for i in range(0, len(ids), 256)])                  # (C * T + 1, D)
        classes = class_embeddings(emb[:-1], len(data.classnames))         # (C, D)
        return torch.cat([emb[-1:], classes])


def check_segclip(cfg: ModelConfig) -> None:
    """``cfg.arch_kwargs`` of ``segclip``: known keys, sane values (see ``ARCH_KWARGS``)."""
    kw = cfg.arch_kwargs
    unknown = sorted(set(kw) - set(ARCH_KWARGS))
    if unknown:
        raise ValueError(f"segclip takes arch_kwargs {sorted(ARCH_KWARGS)}; unknown {unknown}")
    for key in ("centres", "heads", "split"):
        if key in kw and (not isinstance(kw[key], int) or isinstance(kw[key], bool)):
            raise ValueError(f"segclip: {key} must be an int, got {kw[key]!r}")
    for key in ("hard", "gumbel"):
        if key in kw and not isinstance(kw[key], bool):
            raise ValueError(f"segclip: {key} must be true or false, got {kw[key]!r}")
    opts = {**ARCH_KWARGS, **kw}
    for key in ("centres", "heads"):
        if opts[key] < 1:
            raise ValueError(f"segclip: {key} must be >= 1, got {opts[key]}")
    for key in ("tau", "mlp_ratio"):
        if not isinstance(opts[key], (int, float)) or opts[key] <= 0:
            raise ValueError(f"segclip: {key} must be a number > 0, got {opts[key]!r}")
    width, depth = cfg.vision_kwargs.get("embed_dim"), cfg.vision_kwargs.get("depth")
    if isinstance(width, int) and width % opts["heads"]:
        raise ValueError(f"segclip: heads {opts['heads']} must divide the ViT width {width}")
    if isinstance(depth, int) and not -depth <= opts["split"] <= depth:
        raise ValueError(f"segclip: split {opts['split']} is outside the ViT's {depth} blocks "
                         f"(valid: {-depth}..{depth}; negative counts from the end)")
    if cfg.ra_layers > 0:
        raise ValueError("segclip has no retrieval augmentation module: set model.ra_layers=0")


@MODEL_ARCHS.register("segclip")
def build_segclip(cfg: ModelConfig, *, image_size: int, vocab_size: int,
                  context_length: int) -> SegClip:
    """A timm ViT (``cfg.vision``) cut by a semantic group module, and ``cfg.text``."""
    check_segclip(cfg)
    opts = {**ARCH_KWARGS, **cfg.arch_kwargs}
    vision = VisionTower(cfg.vision, img_size=image_size, kwargs=cfg.vision_kwargs,
                         weights=cfg.vision_weights)
    if vision.patch_grid is None or not hasattr(vision.trunk, "blocks"):
        raise ValueError(f"segclip needs a ViT vision tower (patches and blocks); "
                         f"{cfg.vision!r} has none")
    if vision.width % opts["heads"]:
        raise ValueError(f"segclip: heads {opts['heads']} must divide the ViT width "
                         f"{vision.width}")
    text = TextTower(cfg.text, vocab_size=vocab_size, context_length=context_length,
                     weights=cfg.text_weights)
    group = SemanticGroup(vision.width, centres=opts["centres"], heads=opts["heads"],
                          tau=float(opts["tau"]), hard=opts["hard"], gumbel=opts["gumbel"],
                          mlp_ratio=float(opts["mlp_ratio"]))
    return SegClip(vision, text, group=group, split=opts["split"], embed_dim=cfg.embed_dim,
                   pooling=cfg.text_pooling, init_temperature=cfg.init_temperature,
                   max_logit_scale=cfg.max_logit_scale, init_logit_bias=cfg.init_logit_bias)


ARCH_CHECKS["segclip"] = check_segclip

__all__ = ["ARCH_KWARGS", "BACKGROUND_PROMPT", "SemanticGroup", "SegClip", "build_segclip",
           "check_segclip"]
