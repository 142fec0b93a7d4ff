r"""FIBER: fusion in the backbone (Dou et al., 2022, "Coarse-to-Fine Vision-Language Pre-training
with Fusion in the Backbone").

The dual encoder's two towers (timm vision trunk, transformers text encoder) are followed, in
each tower and at its own width, by K FIBER blocks. Block k of the image stream (width C_v)
and block k of the text stream (width C_t) run in lock-step; with x the stream's states, y the
other stream's states of the same layer (after its self-attention) and alpha a learnable
scalar that starts at 0:

    x <- x + SelfAttn(LN(x))                                  (text: padded keys masked)
    x <- x + tanh(alpha) * CrossAttn(LN(x), LN'(y))           (fused mode only; kdim = C_y)
    x <- x + MLP(LN(x))

and a final LayerNorm per stream. In **unimodal** mode the cross-attention is skipped, so
``encode_image`` / ``encode_text`` (ITC, zero-shot evaluation) are a plain dual encoder whose
pooled embedding comes after the K blocks. In **fused** mode (``fuse``) both streams run the K
blocks together with the cross-attention on: the same weights serve ITC, ITM and MLM.

Outputs beyond the dual encoder's (``forward(batch, needs)``):

* ``"fiber_inputs"`` in needs -> ``extra["fiber_image_in"]`` (B, N, C_v) and
  ``extra["fiber_text_in"]`` (B, L, C_t): the trunk states entering the K blocks (and
  ``text_mask``), so an objective can build (image, caption) pairs from any rows -- ITM's
  gathered hard negatives -- and call ``fuse`` on them.
* ``"mlm_states"`` in needs -> ``extra["mlm_states"]`` (B, L, C_t) are the FUSED text states of
  the masked caption ``schema.MLM_TOKENS`` attended with the row's image: the ``mlm`` objective
  (head width ``ctx.text_width`` = C_t) then is FIBER's image-conditioned MLM.

Deviations (our reading): FIBER inserts the cross-attention into the top layers of pre-trained
Swin / RoBERTa backbones; here the K blocks are added on top of the configured trunks (both
from scratch or from local weights). The gate is tanh(alpha) (Flamingo-style) where the paper
scales by alpha directly; both start the fused model equal to the unimodal one (alpha = 0,
``arch_kwargs["init_gate"]`` can open the gates at init; FIBER's is 0). The image
stream's keys are the text stream's states after self-attention of the same layer, and vice
versa (symmetric lock-step).

Under DDP (``find_unused_parameters=False``) every parameter must get a gradient each step:
train the arch with a fused objective that reads both streams (``itm`` with
``fusion="model"``, whose head reads the fused text CLS and the pooled fused image); with ITC
alone the cross-attention parameters are unused. Single-device code: no collectives.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmray.data import schema
from vlmray.models import ARCH_CHECKS, MODEL_ARCHS
from vlmray.models.dual_encoder import DualEncoder
from vlmray.models.extras import batch_columns, encode_view_extras
from vlmray.models.outputs import MLM_STATES, Outputs
from vlmray.models.towers import TextTower, VisionTower

if TYPE_CHECKING:
    from vlmray.config import ModelConfig

FIBER_INPUTS = "fiber_inputs"
"""``needs`` name: the model returns the trunk states entering the K fusion blocks."""
FIBER_IMAGE_IN = "fiber_image_in"
"""``Outputs.extra`` key: (B, N, C_v) vision trunk token states entering the K blocks."""
FIBER_TEXT_IN = "fiber_text_in"
"""``Outputs.extra`` key: (B, L, C_t) text encoder states entering the K blocks."""
ARCH_KWARGS = {"fusion_layers": 2, "heads": 4, "mlp_ratio": 4.0, "init_gate": 0.0}
"""The ``model.arch_kwargs`` FIBER takes, with their defaults (``init_gate``: alpha at init;
FIBER's is 0, the fused model starting equal to the unimodal one)."""


class FiberBlock(nn.Module):
    """One stream's block at width ``dim``, cross-attending to a stream of width ``other_dim``."""

    def __init__(self, dim: int, other_dim: int, heads: int, mlp_ratio: float,
                 init_gate: float = 0.0) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_other = nn.LayerNorm(other_dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, kdim=other_dim, vdim=other_dim,
                                                batch_first=True)
        self.alpha = nn.Parameter(torch.tensor(float(init_gate)))
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attend_self(self, x: Tensor, padding: Tensor | None) -> Tensor:
        """x (B, S, C), padding (B, S) True = ignore -> x + SelfAttn(LN(x))."""
        h = self.norm_self(x)
        return x + self.self_attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]

    def attend_other(self, x: Tensor, other: Tensor, other_padding: Tensor | None) -> Tensor:
        """x (B, S, C), other (B, S', C') -> x + tanh(alpha) * CrossAttn(LN(x), LN'(other))."""
        kv = self.norm_other(other)
        h = self.cross_attn(self.norm_cross(x), kv, kv, key_padding_mask=other_padding,
                            need_weights=False)[0]
        return x + torch.tanh(self.alpha) * h

    def feed_forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm_mlp(x))


class Fiber(DualEncoder):
    """A dual encoder whose towers end in K FIBER blocks (see the module docstring).

    ``fuse(image_in, text_in, text_mask) -> (image_states, text_states)`` runs both streams
    with the cross-attention on; ``pair_features`` turns fused states into the (B, C_t + C_v)
    pair representation ITM scores (``pair_width`` wide).
    """

    def __init__(self, vision: VisionTower, text: TextTower, *, embed_dim: int,
                 fusion_layers: int = 2, heads: int = 4, mlp_ratio: float = 4.0,
                 init_gate: float = 0.0, **kwargs: Any) -> None:
        super().__init__(vision, text, embed_dim=embed_dim, **kwargs)
        cv, ct = vision.width, text.width
        self.image_blocks = nn.ModuleList(
            FiberBlock(cv, ct, heads, mlp_ratio, init_gate) for _ in range(fusion_layers))
        self.text_blocks = nn.ModuleList(
            FiberBlock(ct, cv, heads, mlp_ratio, init_gate) for _ in range(fusion_layers))
        self.image_norm, self.text_norm = nn.LayerNorm(cv), nn.LayerNorm(ct)

    @property
    def pair_width(self) -> int:
        """C_t + C_v, the width of ``pair_features``."""
        return self.text.width + self.vision.width

    # --- the trunks and the K blocks ----------------------------------------------------------

    def image_inputs(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, H, W) -> trunk token states (B, N, C_v) entering the K blocks (CNN
        maps (B, C, h, w) are flattened to h*w tokens)."""
        feats = self.vision.trunk.forward_features(self.vision.normalise(pixels))
        return feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats

    def text_inputs(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask (B, L) -> text encoder states (B, L, C_t) entering the K blocks."""
        return self.text(ids, mask)

    def image_stream(self, x: Tensor) -> Tensor:
        """Unimodal image blocks: (B, N, C_v) -> (B, N, C_v), normed."""
        for block in self.image_blocks:
            x = block.feed_forward(block.attend_self(x, None))
        return self.image_norm(x)

    def text_stream(self, x: Tensor, mask: Tensor) -> Tensor:
        """Unimodal text blocks: (B, L, C_t), mask (B, L) 1 = real -> (B, L, C_t), normed."""
        padding = ~mask.bool()
        for block in self.text_blocks:
            x = block.feed_forward(block.attend_self(x, padding))
        return self.text_norm(x)

    def fuse(self, image_in: Tensor, text_in: Tensor,
             text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Fused mode: image_in (B, N, C_v), text_in (B, L, C_t), text_mask (B, L) 1 = real ->
        (image_states (B, N, C_v), text_states (B, L, C_t)), each after its final norm."""
        if image_in.shape[0] != text_in.shape[0] or text_mask.shape != text_in.shape[:2]:
            raise ValueError(f"fiber.fuse: need image (B, N, C_v), text (B, L, C_t), mask "
                             f"(B, L); got {tuple(image_in.shape)}, {tuple(text_in.shape)}, "
                             f"{tuple(text_mask.shape)}")
        padding = ~text_mask.bool()
        x, y = image_in, text_in
        for image_block, text_block in zip(self.image_blocks, self.text_blocks):
            x, y = image_block.attend_self(x, None), text_block.attend_self(y, padding)
            x, y = (image_block.attend_other(x, y, padding),
                    text_block.attend_other(y, x, None))
            x, y = image_block.feed_forward(x), text_block.feed_forward(y)
        return self.image_norm(x), self.text_norm(y)

    # --- pooling -------------------------------------------------------------------------------

    def pool_image(self, states: Tensor) -> Tensor:
        """(B, N, C_v) -> (B, C_v) with the trunk's own pooling (ViT: its CLS / avg pool and
        fc_norm); a CNN trunk's tokens are averaged (its global average pool)."""
        trunk = self.vision.trunk
        if hasattr(trunk, "patch_embed"):                                 # timm ViT-like
            return trunk.forward_head(states, pre_logits=True)
        return trunk.forward_head(states.mean(1)[..., None, None], pre_logits=True)

    def pool_text(self, states: Tensor, mask: Tensor) -> Tensor:
        """(B, L, C_t) -> (B, C_t): the first token, or the masked mean (``pooling``)."""
        if self.pooling == "first":
            return states[:, 0]
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1.0)

    def pair_features(self, image_states: Tensor, text_states: Tensor) -> Tensor:
        """Fused states -> [text CLS ; pooled image] (B, C_t + C_v), the pair ITM scores."""
        return torch.cat((text_states[:, 0], self.pool_image(image_states)), dim=-1)

    # --- the dual encoder's interface ---------------------------------------------------------

    def embed_image(self, image_in: Tensor, *, tokens: bool) -> tuple[Tensor, Tensor | None]:
        """Unimodal: trunk states (B, N, C_v) -> (embeds (B, D), projected states or None)."""
        states = self.image_stream(image_in)
        emb = F.normalize(self.image_proj(self.pool_image(states)), dim=-1)
        return emb, (self.image_proj(states) if tokens else None)

    def embed_text(self, text_in: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Unimodal: text states (B, L, C_t) -> (embeds (B, D), projected states (B, L, D))."""
        states = self.text_stream(text_in, mask)
        emb = F.normalize(self.text_proj(self.pool_text(states, mask)), dim=-1)
        return emb, self.text_proj(states)

    def encode_image(self, pixels: Tensor, *, tokens: bool = False,
                     refs: object = None) -> tuple[Tensor, Tensor | None]:
        """(image_embeds (B, D), projected states after the K blocks (B, N, D) or None)."""
        if refs is not None:
            raise ValueError("fiber has no retrieval augmentation module; encode_image got refs")
        return self.embed_image(self.image_inputs(pixels), tokens=tokens)

    def encode_text(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(text_embeds (B, D), projected token states after the K blocks (B, L, D))."""
        return self.embed_text(self.text_inputs(ids, mask), mask)

    def forward(self, batch: Mapping[str, Tensor], needs: Collection[str] = ()) -> Outputs:
        """The dual encoder's fields (unimodal mode), plus ``fiber_image_in`` /
        ``fiber_text_in`` (and ``text_mask``) for ``"fiber_inputs"`` and the fused
        ``mlm_states``. Batch columns read: PIXELS, TOKENS, TOKEN_MASK (+ MLM_TOKENS, views)."""
        mask = batch[schema.TOKEN_MASK]
        image_in = self.image_inputs(batch[schema.PIXELS])                # (B, N, C_v)
        text_in = self.text_inputs(batch[schema.TOKENS], mask)             # (B, L, C_t)
        img, img_tok = self.embed_image(image_in, tokens="image_tokens" in needs)
        txt, txt_tok = self.embed_text(text_in, mask)
        out = Outputs(image_embeds=img, text_embeds=txt, image_tokens=img_tok,
                      logit_scale=self.logit_scale, logit_bias=self.logit_bias)
        if "text_tokens" in needs:
            out.text_tokens, out.text_mask = txt_tok, mask
        if FIBER_INPUTS in needs:
            out.extra[FIBER_IMAGE_IN], out.extra[FIBER_TEXT_IN] = image_in, text_in
            out.text_mask = mask
        if MLM_STATES in needs:
            (ids,) = batch_columns(batch, (schema.MLM_TOKENS,),
                                   "mlm_states (data.views.mlm_prob)")
            out.extra[MLM_STATES] = self.fuse(image_in, self.text_inputs(ids, mask), mask)[1]
        out.extra.update(encode_view_extras(self, batch, needs))
        return out


def check_fiber(cfg: ModelConfig) -> None:
    """``model.arch_kwargs`` of FIBER: keys in ``ARCH_KWARGS``, K >= 1, heads >= 1,
    mlp_ratio > 0, a finite init_gate; the heads must divide both tower widths (checked again
    when built)."""
    kw = cfg.arch_kwargs
    unknown = sorted(set(kw) - set(ARCH_KWARGS))
    if unknown:
        raise ValueError(f"fiber takes {sorted(ARCH_KWARGS)}, got unknown {unknown}")
    layers, heads = kw.get("fusion_layers", 2), kw.get("heads", 4)
    ratio = kw.get("mlp_ratio", 4.0)
    for name, value in (("fusion_layers", layers), ("heads", heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"fiber {name} must be an int >= 1, got {value!r}")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or ratio <= 0:
        raise ValueError(f"fiber mlp_ratio must be a number > 0, got {ratio!r}")
    gate = kw.get("init_gate", 0.0)
    if not isinstance(gate, (int, float)) or isinstance(gate, bool) or not math.isfinite(gate):
        raise ValueError(f"fiber init_gate must be a finite number, got {gate!r}")
    text_width = cfg.text.get("hidden_size")
    if isinstance(text_width, int) and text_width % heads:
        raise ValueError(f"fiber heads={heads} must divide the text width {text_width}")
    if cfg.ra_layers:
        raise ValueError("fiber has no retrieval augmentation module: set model.ra_layers=0")


@MODEL_ARCHS.register("fiber")
def build_fiber(cfg: ModelConfig, *, image_size: int, vocab_size: int,
                context_length: int) -> Fiber:
    """FIBER from a ModelConfig: ``dual_encoder``'s towers plus ``arch_kwargs`` (K =
    ``fusion_layers``, ``heads``, ``mlp_ratio``, ``init_gate``)."""
    check_fiber(cfg)
    kw = {**ARCH_KWARGS, **cfg.arch_kwargs}
    vision = VisionTower(cfg.vision, img_size=image_size, kwargs=cfg.vision_kwargs,
                         weights=cfg.vision_weights)
    text = TextTower(cfg.text, vocab_size=vocab_size, context_length=context_length,
                     weights=cfg.text_weights)
    heads = int(kw["heads"])
    if vision.width % heads or text.width % heads:
        raise ValueError(f"fiber heads={heads} must divide both tower widths (vision "
                         f"{vision.width}, text {text.width})")
    return Fiber(vision, text, embed_dim=cfg.embed_dim, fusion_layers=int(kw["fusion_layers"]),
                 heads=heads, mlp_ratio=float(kw["mlp_ratio"]),
                 init_gate=float(kw["init_gate"]), pooling=cfg.text_pooling,
                 init_temperature=cfg.init_temperature, max_logit_scale=cfg.max_logit_scale,
                 init_logit_bias=cfg.init_logit_bias)


ARCH_CHECKS["fiber"] = check_fiber

__all__ = ["ARCH_KWARGS", "FIBER_IMAGE_IN", "FIBER_INPUTS", "FIBER_TEXT_IN", "Fiber",
           "FiberBlock", "build_fiber", "check_fiber"]
