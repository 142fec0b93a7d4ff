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
from vlmray.models.extras import batch_columns, encode_masked_extras, encode_view_extras
from vlmray.models.outputs import MASKED_TEXT_TOKENS, MLM_STATES, Outputs
from vlmray.models.retrieval_aug import RetrievalAugmentation
from vlmray.models.towers import TextTower, VisionTower

References = tuple[Tensor, Tensor, Tensor]
"""(ref_image (B, k, D_ref), ref_text (B, k, D_ref), ref_mask (B, k)) for RA-CLIP."""


class LogitScale(nn.Module):
    """What every model arch shares for its losses: CLIP's learnable inverse temperature
    ``logit_scale`` = exp(min(``log_logit_scale``, log ``max_logit_scale``)), and SigLIP's
    learnable scalar bias ``logit_bias`` (None, registering nothing, without
    ``init_logit_bias``: the state-dict keys then stay the plain model's)."""

    def init_logit_scale(self, init_temperature: float, max_logit_scale: float,
                         init_logit_bias: float | None) -> None:
        """Registers ``log_logit_scale`` (= log 1/``init_temperature``) and ``logit_bias``."""
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)
        bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(init_logit_bias))
        self.register_parameter("logit_bias", bias)

    @property
    def logit_scale(self) -> Tensor:
        return self.log_logit_scale.clamp(max=self.max_log_scale).exp()


class DualEncoder(LogitScale):
    """image (B, 3, H, W) -> image_embeds (B, D); tokens (B, L) -> text_embeds (B, D).

    ``init_logit_bias`` adds SigLIP's learnable scalar bias ``logit_bias`` (else None).
    With ``retrieval`` (RA-CLIP), image embeddings are enriched with retrieved reference pairs
    (``vlmray.models.retrieval_aug``); without it the state dict is the plain dual encoder's.
    """

    def __init__(self, vision: VisionTower, text: TextTower, *, embed_dim: int,
                 pooling: str = "mean", init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0, init_logit_bias: float | None = None,
                 retrieval: RetrievalAugmentation | None = None) -> None:
        super().__init__()
        self.vision, self.text = vision, text
        self.image_proj = nn.Linear(vision.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.width, embed_dim, bias=False)
        self.init_logit_scale(init_temperature, max_logit_scale, init_logit_bias)
        self.pooling = pooling
        self.retrieval = retrieval  # None registers nothing: state-dict keys stay as before

    def encode_image(self, pixels: Tensor, *, tokens: bool = False,
                     refs: References | None = None) -> tuple[Tensor, Tensor | None]:
        """(image_embeds (B, D), projected trunk features (B, N, D) or None).

        ``refs`` = (ref_image, ref_text, ref_mask) augments the embedding with RA-CLIP's module;
        without ``refs`` the embedding is the plain one (e.g. evaluation without an index).
        Passing ``refs`` to a model built without the module (``ra_layers == 0``) is an error.
        """
        pooled, feats = self.vision(pixels, tokens=tokens)                 # (B, C), (B, N, C)
        emb = F.normalize(self.image_proj(pooled), dim=-1)                  # (B, D)
        if refs is not None:
            if self.retrieval is None:
                raise ValueError("encode_image got refs but the model has no retrieval "
                                 "augmentation module (set model.ra_layers > 0)")
            emb = self.retrieval(emb, *refs)                                # (B, D)
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
        """Computes the fields in ``needs`` (both embeddings and the scale always).

        Batch columns read: PIXELS, TOKENS, TOKEN_MASK; REF_IMAGE_EMBEDS, REF_TEXT_EMBEDS and
        REF_MASK when the model has the retrieval module; NN_TOKENS and NN_TOKEN_MASK when
        ``"nn_text_embeds"`` is needed (-> ``out.extra["nn_text_embeds"]``).
        """
        want_img_tokens = "image_tokens" in needs
        img, img_tok = self.encode_image(batch[schema.PIXELS], tokens=want_img_tokens,
                                         refs=self._references(batch))
        txt, txt_tok = self.encode_text(batch[schema.TOKENS], batch[schema.TOKEN_MASK])
        out = Outputs(image_embeds=img, text_embeds=txt, logit_scale=self.logit_scale,
                      logit_bias=self.logit_bias)
        if want_img_tokens:
            out.image_tokens = img_tok
        if "text_tokens" in needs:
            out.text_tokens, out.text_mask = txt_tok, batch[schema.TOKEN_MASK]
        out.extra.update(self.encode_extras(batch, needs))
        return out

    def encode_extras(self, batch: Mapping[str, Tensor],
                      needs: Collection[str]) -> dict[str, Tensor]:
        """The ``Outputs.extra`` entries in ``needs`` that re-use the two towers on extra
        columns: neighbour captions, augmented image and text views, masked captions, and the
        MAE-style encodings of masked images and captions (``masked_image_tokens``,
        ``masked_text_tokens``; only when needed)."""
        extra = encode_view_extras(self, batch, needs,
                                   view_refs=lambda v: self._references(batch, v))
        if MLM_STATES in needs:
            (ids,) = batch_columns(batch, (schema.MLM_TOKENS,),
                                   "mlm_states (data.views.mlm_prob)")
            extra[MLM_STATES] = self.text(ids, batch[schema.TOKEN_MASK])        # (B, L, C)
            if MASKED_TEXT_TOKENS in needs:                                     # one text pass
                extra[MASKED_TEXT_TOKENS] = self.text_proj(extra[MLM_STATES])   # (B, L, D)
        extra.update(encode_masked_extras(self, batch, [n for n in needs if n not in extra]))
        return extra

    def encode_masked_image(self, pixels: Tensor, patch_mask: Tensor) -> Tensor:
        """MAE-style: projected states (B, N_vis, D) of the visible patches only (patch_mask
        (B, N) bool, True = masked; ``VisionTower.forward_masked``)."""
        return self.image_proj(self.vision.forward_masked(pixels, patch_mask))

    def encode_masked_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Projected text-tower states (B, L, D) of masked captions ids (B, L), mask (B, L)."""
        return self.text_proj(self.text(ids, mask))

    def _references(self, batch: Mapping[str, Tensor], repeat: int = 1) -> References | None:
        """The batch's RA-CLIP references when the model has the module, else None; each row's
        repeated ``repeat`` times (for that many views of every image)."""
        if self.retrieval is None:
            return None
        cols = (schema.REF_IMAGE_EMBEDS, schema.REF_TEXT_EMBEDS, schema.REF_MASK)
        refs = batch_columns(batch, cols,
                             "the retrieval augmentation module (model.ra_layers > 0)")
        if repeat > 1:
            refs = [r.repeat_interleave(repeat, dim=0) for r in refs]
        ref_image, ref_text, ref_mask = refs
        return ref_image, ref_text, ref_mask


__all__ = ["DualEncoder"]
