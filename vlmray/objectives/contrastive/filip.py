r"""FILIP's token-wise late-interaction contrastive loss (Yao et al., 2021, "FILIP: Fine-grained
Interactive Language-Image Pre-Training").

Image i has n_1 token features x_i1..x_in1, text j has n_2 unpadded token features
y_j1..y_jn2, all L2-normalised. The token-wise similarities are

    s^I_ij = 1/n_1      sum_k  max_{r <= n_2(j)} x_ik . y_jr      (each image token's best word)
    s^T_ij = 1/n_2(i)   sum_r  max_{k <= n_1}    y_ir . x_jk      (each word's best patch)

and, for a global batch of N pairs and the learned inverse temperature s,

    L^I = -1/N sum_i log( exp(s s^I_ii) / sum_j exp(s s^I_ij) )      image -> text
    L^T = -1/N sum_i log( exp(s s^T_ii) / sum_j exp(s s^T_ij) )      text -> image
    L   = (L^I + L^T) / 2

Padded text tokens never win a max and never count in a mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmray.objectives.base import LossResult, Objective, require
from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs

AUTO_CHUNK_ELEMENTS = 2**24
"""Element budget of one similarity block (rows x c x T_q x T_k) when ``chunk=0``: 16M
elements, 64 MiB in float32 (a block and its gradient are alive at once in backward)."""

TopkScore = Literal["similarity", "norm"]


@register_objective("filip")
class FilipLoss(Objective):
    r"""FILIP's loss over image-text pairs gathered from all W workers.

    ``gather="local"``: worker r scores its B images against all N texts (s^I, B x N) and its
    B texts against all N images (s^T, B x N), labels ``r*B + arange(B)``; token features are
    gathered with gradient, so as for CLIP's local loss the mean over workers of L_r is L and
    the DDP-averaged gradients equal the single-process ones. ``"global"``: N x N on every rank.

    Memory: s^I and s^T are computed ``chunk`` columns at a time; one chunk's similarity block
    is rows x c x T_img x T_txt elements, never rows x N x T_img x T_txt. Autograd keeps only
    the argmax indices (rows x N x T_q, int64) between forward and backward; backward rebuilds
    one chunk's block (and its masked copy) at a time.

    ``topk_image_tokens=k`` keeps, before gathering, k tokens per image (the paper keeps 25% to
    cut communication and compute). ``topk_score="similarity"`` (the paper's rule) ranks an
    image's tokens by their best similarity to any unpadded token of any text on this worker,
    so the choice depends on how the global batch is split over workers; ``"norm"`` ranks them
    by the norm of the feature before normalisation, which is per-image and split-independent.
    The selection is not differentiated (an index choice).
    """

    needs = frozenset({"image_tokens", "text_tokens", "text_mask", "logit_scale"})

    @dataclass(kw_only=True)
    class Config:
        gather: Literal["local", "global"] = "local"
        """local: this rank's B rows x all N columns, exact grads; global: N x N per rank."""
        drop_prefix: bool = True
        """Drop the first image token: a ViT's CLS token (timm puts prefix tokens first). Set
        False for towers without one (CNN feature maps, ViTs built with ``class_token=False``)."""
        topk_image_tokens: int = 0
        """Keep k image tokens per image (after dropping the prefix); 0 or k >= T keeps all."""
        topk_score: TopkScore = "similarity"
        """similarity: best match to any local text token (the paper); norm: feature norm."""
        chunk: int = 0
        """Columns per similarity block; 0 = the most that fit ``AUTO_CHUNK_ELEMENTS``."""

        def __post_init__(self) -> None:
            if self.topk_image_tokens < 0:
                k = self.topk_image_tokens
                raise ValueError(f"filip: topk_image_tokens must be >= 0 (0 = all), got {k}")
            if self.chunk < 0:
                raise ValueError(f"filip: chunk must be >= 0 (0 = auto), got {self.chunk}")

    def __init__(self, cfg: FilipLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else FilipLoss.Config()

    def tokens(self, out: Outputs) -> tuple[Tensor, Tensor, Tensor]:
        """(image (B, T_img, D), text (B, L, D)) L2-normalised, and text_mask (B, L) bool."""
        image = require(out, "image_tokens", self.name)
        text = require(out, "text_tokens", self.name)
        mask = require(out, "text_mask", self.name).bool()
        if image.ndim != 3 or text.ndim != 3 or mask.shape != text.shape[:2]:
            raise ValueError(f"filip: need image_tokens (B, T, D), text_tokens (B, L, D) and "
                             f"text_mask (B, L); got {tuple(image.shape)}, {tuple(text.shape)}, "
                             f"{tuple(mask.shape)}")
        if self.cfg.drop_prefix:
            image = image[:, 1:]
        # host sync (kept): a clear error for an image without tokens or an empty text
        if image.shape[1] == 0 or not bool(mask.any(dim=1).all()):
            raise ValueError("filip: every image needs >= 1 token and every text >= 1 unpadded "
                             f"token; got {image.shape[1]} image tokens, text lengths "
                             f"{mask.sum(dim=1).tolist()}")
        norms = image.detach().norm(dim=-1)  # (B, T_img), the "norm" top-k score
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        return self.select(image, norms, text, mask), text, mask

    @torch.no_grad()
    def scores(self, image: Tensor, norms: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        """Top-k score of each image token, (B, T_img): max_{j local, r unpadded} x_ik . y_jr
        (``"similarity"``) or |x_ik| before normalisation (``"norm"``)."""
        if self.cfg.topk_score == "norm":
            return norms
        words = text[mask]  # (M, D): every unpadded token of this worker's texts
        flat = image.reshape(-1, image.shape[-1])  # (B*T_img, D)
        step = max(1, AUTO_CHUNK_ELEMENTS // max(1, len(words)))
        best = [(part @ words.T).amax(dim=1) for part in flat.split(step)]
        return torch.cat(best).view(image.shape[:2])

    def select(self, image: Tensor, norms: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        """The k highest-scoring tokens of each image, in their original order (B, k, D)."""
        k = self.cfg.topk_image_tokens
        if k == 0 or k >= image.shape[1]:
            return image
        keep = self.scores(image, norms, text, mask).topk(k, dim=1).indices.sort(dim=1).values
        return image.gather(1, keep.unsqueeze(-1).expand(-1, -1, image.shape[-1]))

    def similarities(self, image: Tensor, text: Tensor, mask: Tensor,
                     dist: Dist) -> tuple[Tensor, Tensor]:
        """(s^I, s^T): this rank's images x all texts and texts x all images, each (B, N);
        (N, N) if global. image (B, T_img, D), text (B, L, D), mask (B, L) bool."""
        all_image = dist.all_gather(image, with_grad=True)  # (N, T_img, D)
        packed = torch.cat((text, mask.unsqueeze(-1).to(text.dtype)), dim=-1)  # one collective
        all_text, all_mask = dist.all_gather(packed, with_grad=True).split(text.shape[-1], dim=-1)
        all_mask = all_mask.squeeze(-1) > 0.5  # (N, L)
        if self.cfg.gather == "global":
            image, text, mask = all_image, all_text, all_mask
        per_image = late_interaction(image, None, all_text, all_mask, self.cfg.chunk)
        per_text = late_interaction(text, mask, all_image, None, self.cfg.chunk)
        return per_image, per_text

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r = (CE(s s^I, y) + CE(s s^T, y)) / 2, each CE a mean over this rank's rows."""
        image, text, mask = self.tokens(out)
        logit_scale = require(out, "logit_scale", self.name)
        per_image, per_text = self.similarities(image, text, mask, dist)
        per_image, per_text = logit_scale * per_image, logit_scale * per_text
        rows = per_image.shape[0]
        if self.cfg.gather == "global":
            labels = torch.arange(rows, dtype=torch.long, device=per_image.device)
        else:
            labels = dist.offsets(rows, device=per_image.device)
        loss = 0.5 * (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels))
        metrics = ClipLoss.metrics(per_image, per_text, labels, logit_scale)
        metrics["image_tokens"] = float(image.shape[1])
        return LossResult(loss=loss, metrics=metrics)


def late_interaction(query: Tensor, query_mask: Tensor | None, keys: Tensor,
                     key_mask: Tensor | None, chunk: int = 0) -> Tensor:
    r"""s_ij = masked-mean over query tokens a of masked-max over key tokens b of q_ia . k_jb.

    query (B, T_q, D), keys (N, T_k, D); masks (B, T_q) / (N, T_k) bool, True = real token,
    None = all real. Returns (B, N). Columns are processed ``chunk`` at a time (0: as many as
    keep B x c x T_q x T_k <= ``AUTO_CHUNK_ELEMENTS``), so the transient block is bounded by
    max(budget, B x T_q x T_k) elements instead of growing with N.
    """
    rows, t_q, t_k = query.shape[0], query.shape[1], keys.shape[1]
    step = chunk or max(1, AUTO_CHUNK_ELEMENTS // (rows * t_q * t_k))
    flat = query.reshape(rows * t_q, -1)  # (B*T_q, D): one view, shared by every chunk's mm
    parts = []
    for part, part_mask in _chunks(keys, key_mask, step):
        c = part.shape[0]
        block = (flat @ part.reshape(c * t_k, -1).T).view(rows, t_q, c, t_k)  # (B, T_q, c, T_k)
        if part_mask is not None:
            block = block.masked_fill_(~part_mask[None, None], float("-inf"))
        parts.append(block.max(dim=-1).values)  # (B, T_q, c): autograd keeps only the argmax
    best = torch.cat(parts, dim=-1)  # (B, T_q, N)
    if query_mask is None:
        return best.mean(dim=1)
    weight = query_mask.to(best.dtype).unsqueeze(-1)  # (B, T_q, 1)
    return (best * weight).sum(dim=1) / weight.sum(dim=1)


def _chunks(keys: Tensor, mask: Tensor | None, step: int) -> list[tuple[Tensor, Tensor | None]]:
    """``keys`` (N, T_k, D) and ``mask`` (N, T_k) split into blocks of ``step`` rows."""
    masks = mask.split(step) if mask is not None else [None] * len(keys.split(step))
    return list(zip(keys.split(step), masks))


__all__ = ["AUTO_CHUNK_ELEMENTS", "FilipLoss", "late_interaction"]
