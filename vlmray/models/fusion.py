"""A small multimodal fusion encoder (ALBEF / BLIP / FLAVA style): text tokens attend to each
other and cross-attend to image tokens; the first text position's state represents the pair.

Single-device code: no collectives. Objectives that need a fused pair representation (ITM)
own one of these and call it on (text tokens, image tokens, text mask).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class TransformerLayer(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention to the image, MLP.

        x <- x + SelfAttn(LN(x), padding);  [x <- x + CrossAttn(LN(x), LN(image))];
        x <- x + MLP(LN(x))

    ``cross=True`` is the fusion block (text attends to itself, then to the image tokens);
    ``cross=False`` the plain self-attention block (FLAVA's multimodal encoder, MAE's decoder).
    """

    _LEGACY_KEYS = (("norm_attn.", "norm_self."), ("attn.", "self_attn."))
    """(old, new) state-dict key prefixes: the self-attention-only block's earlier names."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, *,
                 cross: bool = False) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"{type(self).__name__}: dim={dim} is not divisible by heads={heads}")
        hidden = max(1, int(dim * mlp_ratio))
        self.cross = cross
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        if cross:
            self.norm_cross = nn.LayerNorm(dim)
            self.norm_image = nn.LayerNorm(dim)
            self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, padding: Tensor | None = None,
                image: Tensor | None = None) -> Tensor:
        """x (B, T, D), padding (B, T) bool, True = never attended to, image (B, N, D) (needed
        exactly when ``cross``) -> (B, T, D)."""
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        if self.cross:
            if image is None:
                raise ValueError("a cross-attention TransformerLayer needs image tokens (B, N, D)")
            h, kv = self.norm_cross(x), self.norm_image(image)
            x = x + self.cross_attn(h, kv, kv, need_weights=False)[0]
        elif image is not None:
            raise ValueError("a TransformerLayer without cross-attention takes no image tokens")
        return x + self.mlp(self.norm_mlp(x))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        """Loads checkpoints written before the two blocks were one (``norm_attn`` / ``attn``)."""
        for old, new in self._LEGACY_KEYS:
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FusionEncoder(nn.Module):
    """``layers`` fusion blocks of width ``dim`` with ``heads`` attention heads, then a LayerNorm.

    ``forward(text, image, text_mask)``: text tokens (B, L, D) attend to themselves (padded
    positions, ``text_mask == False``, are never attended to) and cross-attend to all image
    tokens (B, N, D); returns the fused text states (B, L, D). ``states[:, 0]`` (the first
    position, CLS / BOS) is the pair representation (``pooled``).
    """

    def __init__(self, dim: int, layers: int = 2, heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim < 1 or layers < 1 or heads < 1:
            raise ValueError(f"FusionEncoder needs dim, layers, heads >= 1; got {dim}, {layers}, "
                             f"{heads}")
        self.dim = dim
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, mlp_ratio, cross=True)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, text: Tensor, image: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """(B, L, D), (B, N, D), optional (B, L) (True / nonzero = real token) -> (B, L, D)."""
        if text.ndim != 3 or image.ndim != 3 or text.shape[0] != image.shape[0]:
            raise ValueError(f"FusionEncoder: need text (B, L, D) and image (B, N, D); got "
                             f"{tuple(text.shape)} and {tuple(image.shape)}")
        if text.shape[-1] != self.dim or image.shape[-1] != self.dim:
            raise ValueError(f"FusionEncoder: width {self.dim}, got text {text.shape[-1]} and "
                             f"image {image.shape[-1]}")
        padding = None
        if text_mask is not None:
            if text_mask.shape != text.shape[:2]:
                raise ValueError(f"FusionEncoder: text_mask {tuple(text_mask.shape)} does not "
                                 f"match text {tuple(text.shape[:2])}")
            padding = ~text_mask.bool()
        for layer in self.layers:
            text = layer(text, padding, image)
        return self.norm(text)

    def pooled(self, text: Tensor, image: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """The pair representation: the first position's fused state, (B, D)."""
        return self(text, image, text_mask)[:, 0]


class MultimodalEncoder(nn.Module):
    """FLAVA's joint multimodal encoder (Singh et al., 2022): the image and text states are
    linearly projected, concatenated behind a learned [CLS_M] token, and ``layers`` pre-norm
    self-attention blocks (then a LayerNorm) run over [CLS_M; image; text]; padded text
    positions are never attended to.

    ``forward(image (B, N, D), text (B, L, D), text_mask (B, L) or None)`` ->
    (cls (B, D), image states (B, N, D), text states (B, L, D)).
    """

    def __init__(self, dim: int, layers: int = 2, heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim < 1 or layers < 1 or heads < 1:
            raise ValueError(f"MultimodalEncoder needs dim, layers, heads >= 1; got {dim}, "
                             f"{layers}, {heads}")
        self.dim = dim
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls, std=0.02)
        self.image_in = nn.Linear(dim, dim)
        self.text_in = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, mlp_ratio)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: Tensor, text: Tensor,
                text_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """See the class docstring; ``text_mask`` True / nonzero = real token."""
        if (image.ndim != 3 or text.ndim != 3 or image.shape[0] != text.shape[0]
                or image.shape[-1] != self.dim or text.shape[-1] != self.dim):
            raise ValueError(f"MultimodalEncoder(dim={self.dim}): need image (B, N, D) and text "
                             f"(B, L, D); got {tuple(image.shape)} and {tuple(text.shape)}")
        b, n = image.shape[:2]
        keep = torch.ones(b, 1 + n, dtype=torch.bool, device=image.device)
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        if text_mask.shape != text.shape[:2]:
            raise ValueError(f"MultimodalEncoder: text_mask {tuple(text_mask.shape)} does not "
                             f"match text {tuple(text.shape[:2])}")
        padding = ~torch.cat((keep, text_mask.bool()), dim=1)                # (B, 1 + N + L)
        x = torch.cat((self.cls.expand(b, -1, -1).to(image.dtype), self.image_in(image),
                       self.text_in(text)), dim=1)
        for layer in self.layers:
            x = layer(x, padding)
        x = self.norm(x)
        return x[:, 0], x[:, 1:1 + n], x[:, 1 + n:]


__all__ = ["FusionEncoder", "MultimodalEncoder", "TransformerLayer"]
