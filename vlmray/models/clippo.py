"""CLIPPO: one vision tower encodes both images and captions rendered as images.

Tschannen, Mustafa & Houlsby, 2023, "CLIPPO: Image-and-Language Understanding from Pixels Only"
(CVPR). Every caption t_i is drawn onto a canvas the size of the images (``vlmray.data.render``;
the views stage writes it to ``schema.TEXT_PIXELS``), and one function f -- the same ViT *and*
the same projection head, in two separate forward passes (big_vision's ``one_tower`` model) --
embeds both sides:

    z^I_i = f(x_i) / ||f(x_i)||,      z^T_i = f(render(t_i)) / ||f(render(t_i))||

The loss is CLIP's, unchanged (the ``clip`` objective; ``siglip`` works too with
``init_logit_bias``): with s the learnable logit scale,

    L = -1/(2B) sum_i [ log softmax_j(s z^I_i . z^T_j)_i + log softmax_j(s z^T_i . z^I_j)_i ]

There is no tokenizer, no text embedding table and no text tower: the model has about half the
parameters of a dual encoder of the same width. It exposes the dual encoder's interface, with
``encode_text`` reading rendered text pixels (``text_input = "pixels"`` tells evaluation to render
captions and class prompts with :func:`vlmray.data.render.render_text`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.config import ConfigError
from vlmray.data import schema
from vlmray.models import MODEL_ARCHS
from vlmray.models.dual_encoder import LogitScale
from vlmray.models.outputs import EXTRA_OUTPUTS, IMAGE_VIEW_EMBEDS, Outputs
from vlmray.models.towers import VisionTower

if TYPE_CHECKING:
    from vlmray.config import ModelConfig


class Clippo(LogitScale):
    """pixels (B, 3, S, S) -> image_embeds (B, D); text pixels (B, 3, S, S) -> text_embeds (B, D),
    both through ``tower`` and ``proj`` (one set of parameters).

    ``init_logit_bias`` adds SigLIP's learnable scalar bias ``logit_bias`` (else None)."""

    text_input: ClassVar[str] = "pixels"
    """What ``encode_text`` reads: rendered text (``schema.TEXT_PIXELS``), not token ids."""

    def __init__(self, tower: VisionTower, *, embed_dim: int, init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0, init_logit_bias: float | None = None) -> None:
        super().__init__()
        self.tower = tower
        self.proj = nn.Linear(tower.width, embed_dim, bias=False)
        self.init_logit_scale(init_temperature, max_logit_scale, init_logit_bias)

    def embed(self, pixels: Tensor, *, tokens: bool = False) -> tuple[Tensor, Tensor | None]:
        """The shared f: (normalised embeds (B, D), projected trunk features (B, N, D) or None)."""
        pooled, feats = self.tower(pixels, tokens=tokens)                 # (B, C), (B, N, C)
        emb = F.normalize(self.proj(pooled), dim=-1)                      # (B, D)
        return emb, (self.proj(feats) if feats is not None else None)

    def encode_image(self, pixels: Tensor, *, tokens: bool = False,
                     refs: object | None = None) -> tuple[Tensor, Tensor | None]:
        """(image_embeds (B, D), projected patch features (B, N, D) or None)."""
        if refs is not None:
            raise ValueError("encode_image got refs, but CLIPPO has no retrieval augmentation "
                             "module (RA-CLIP needs model.arch='dual_encoder')")
        return self.embed(pixels, tokens=tokens)

    def encode_text(self, text_pixels: Tensor, mask: Tensor | None = None, *,
                    tokens: bool = False) -> tuple[Tensor, Tensor | None]:
        """Rendered captions uint8 (B, 3, S, S) -> (text_embeds (B, D), features or None).
        ``mask`` is ignored (kept for the dual encoder's call shape)."""
        if text_pixels.ndim != 4:
            raise ValueError(f"CLIPPO's encode_text reads captions rendered as images, (B, 3, S, "
                             f"S) (schema.TEXT_PIXELS, vlmray.data.render.render_texts); got a "
                             f"tensor of shape {tuple(text_pixels.shape)} (token ids?)")
        return self.embed(text_pixels, tokens=tokens)

    def forward(self, batch: Mapping[str, Tensor], needs: Collection[str] = ()) -> Outputs:
        """Computes the fields in ``needs`` (both embeddings and the scale always).

        Batch columns read: PIXELS, TEXT_PIXELS (``data.views.render_text``); PIXELS_VIEWS when
        ``image_view_embeds`` is needed. Text-token extras (MLM, text views, neighbour captions)
        have no meaning without a tokenizer and raise."""
        unsupported = sorted(set(needs) & (set(EXTRA_OUTPUTS) - {IMAGE_VIEW_EMBEDS}))
        if unsupported:
            raise ValueError(f"CLIPPO reads rendered text and cannot produce {unsupported} "
                             f"(they need token ids and a text tower: model.arch='dual_encoder')")
        (pixels, text_pixels) = _columns(batch, (schema.PIXELS, schema.TEXT_PIXELS))
        img, img_tok = self.encode_image(pixels, tokens="image_tokens" in needs)
        txt, txt_tok = self.encode_text(text_pixels, tokens="text_tokens" in needs)
        out = Outputs(image_embeds=img, text_embeds=txt, logit_scale=self.logit_scale,
                      logit_bias=self.logit_bias)
        if "image_tokens" in needs:
            out.image_tokens = img_tok                                    # (B, N, D)
        if txt_tok is not None:
            out.text_tokens = txt_tok                                     # (B, N, D)
            out.text_mask = txt_tok.new_ones(txt_tok.shape[:2])           # (B, N) all patches
        if IMAGE_VIEW_EMBEDS in needs:
            (views,) = _columns(batch, (schema.PIXELS_VIEWS,))
            b, v = views.shape[:2]
            emb = self.embed(views.flatten(0, 1))[0]                      # (B * V, D)
            out.extra[IMAGE_VIEW_EMBEDS] = emb.view(b, v, -1)             # (B, V, D)
        return out


def _columns(batch: Mapping[str, Tensor], names: tuple[str, ...]) -> list[Tensor]:
    """``[batch[n] for n in names]``, or an error naming the missing columns and their source."""
    missing = [n for n in names if n not in batch]
    if missing:
        raise ValueError(f"CLIPPO's batch has no column(s) {missing}; rendered captions "
                         f"({schema.TEXT_PIXELS!r}) come from data.views.render_text=True, image "
                         f"views from data.views.image; the batch has {sorted(batch)}")
    return [batch[n] for n in names]


@MODEL_ARCHS.register("clippo")
def build_clippo(cfg: ModelConfig, *, image_size: int, vocab_size: int,
                 context_length: int) -> Clippo:
    """One ``cfg.vision`` tower (``cfg.vision_kwargs``) and a projection to ``cfg.embed_dim``;
    ``vocab_size``, ``context_length`` and ``cfg.text`` are unused (no tokenizer)."""
    del vocab_size, context_length
    if cfg.ra_layers > 0:
        raise ConfigError("model.arch='clippo' has no retrieval augmentation module: set "
                          "model.ra_layers=0 (RA-CLIP needs model.arch='dual_encoder')")
    tower = VisionTower(cfg.vision, img_size=image_size, kwargs=cfg.vision_kwargs,
                        weights=cfg.vision_weights)
    return Clippo(tower, embed_dim=cfg.embed_dim, init_temperature=cfg.init_temperature,
                  max_logit_scale=cfg.max_logit_scale, init_logit_bias=cfg.init_logit_bias)


__all__ = ["Clippo", "build_clippo"]
