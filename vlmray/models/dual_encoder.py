"""CLIP's dual encoder: two towers, linear projections into one space, a learnable temperature.

Written for one device; data parallelism is applied from outside (``vlmray.train``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.data import schema
from vlmray.models.outputs import Outputs
from vlmray.models.towers import TextTower, VisionTower


class DualEncoder(nn.Module):
    """image (B, 3, H, W) -> image_embeds (B, D); tokens (B, L) -> text_embeds (B, D)."""

    def __init__(self, vision: VisionTower, text: TextTower, *, embed_dim: int,
                 pooling: str = "mean", init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.vision, self.text = vision, text
        self.image_proj = nn.Linear(vision.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.width, embed_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)
        self.pooling = pooling

    @property
    def logit_scale(self) -> Tensor:
        return self.log_logit_scale.clamp(max=self.max_log_scale).exp()

    def encode_image(self, pixels: Tensor, *, tokens: bool = False) -> tuple[Tensor, Tensor | None]:
        pooled, feats = self.vision(pixels, tokens=tokens)                 # (B, C), (B, N, C)
        emb = F.normalize(self.image_proj(pooled), dim=-1)                  # (B, D)
        return emb, (self.image_proj(feats) if feats is not None else None)

    def encode_text(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        states = self.text(ids, mask)                                       # (B, L, C)
        if self.pooling == "first":
            pooled = states[:, 0]
        else:
            m = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * m).sum(1) / m.sum(1).clamp(min=1.0)           # (B, C)
        return F.normalize(self.text_proj(pooled), dim=-1), self.text_proj(states)

    def forward(self, batch: Mapping[str, Tensor], needs: Collection[str] = ()) -> Outputs:
        """Computes the fields in ``needs`` (both embeddings and the scale always)."""
        want_img_tokens = "image_tokens" in needs
        img, img_tok = self.encode_image(batch[schema.PIXELS], tokens=want_img_tokens)
        txt, txt_tok = self.encode_text(batch[schema.TOKENS], batch[schema.TOKEN_MASK])
        out = Outputs(image_embeds=img, text_embeds=txt, logit_scale=self.logit_scale)
        if want_img_tokens:
            out.image_tokens = img_tok
        if "text_tokens" in needs:
            out.text_tokens, out.text_mask = txt_tok, batch[schema.TOKEN_MASK]
        return out


__all__ = ["DualEncoder"]
