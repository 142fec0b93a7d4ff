r"""RA-CLIP's retrieval augmented module (Xie et al., CVPR 2023, "RA-CLIP: Retrieval Augmented
Contrastive Language-Image Pre-training").

The idea is an open-book exam: instead of memorising every visual concept, the image tower may
look things up in a hold-out reference set of image-text pairs. For each input image, a frozen
embedder and a FAISS index (built offline, ``vlmray.retrieval``) find k reference pairs; the
online image embedding u (the query) cross-attends over them with the reference *image*
embeddings as keys and the reference *text* embeddings as values, i.e. "images that look like
mine were described like this". Per block (pre-norm, residual)::

    x <- x + MHA(LN(x), K = W_k r^img, V = W_v r^txt, mask = REF_MASK)      x_0 = u
    x <- x + MLP(LN(x))

and the knowledge vector ``k = normalize(W_o LN(x_L))`` is fused with the original embedding by
a learnable scalar gate (tanh-gated residual, as Flamingo's gated cross-attention)::

    u_aug = normalize(u + tanh(g) k)          g initialised small, so training starts near CLIP

A row without any reference (all ``REF_MASK`` 0) returns u exactly; padding slots never affect
the result. The augmented u_aug replaces u in the contrastive losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _CrossBlock(nn.Module):
    """Pre-norm cross-attention + MLP with residuals; queries (B, 1, D), keys/values (B, k, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, keys: Tensor, values: Tensor, pad: Tensor) -> Tensor:
        """x (B, 1, D); keys, values (B, k, D); pad (B, k) bool, True = ignore that slot."""
        attended, _ = self.attn(self.norm_q(x), keys, values, key_padding_mask=pad,
                                need_weights=False)
        x = x + attended
        return x + self.mlp(self.norm_mlp(x))


class RetrievalAugmentation(nn.Module):
    """u (B, D) + k retrieved reference pairs (B, k, D_ref) -> u_aug (B, D), L2-normalised.

    Args:
        dim: D, width of the online image embedding (``ModelConfig.embed_dim``).
        ref_dim: D_ref, width of the frozen embedder's reference embeddings.
        layers: number of (cross-attention + MLP) blocks, >= 1.
        heads: attention heads; ``dim % heads == 0``.
        mlp_ratio: MLP hidden width over D.
        gate_init: initial g of the fusion gate tanh(g); small so u_aug starts close to u,
            non-zero so every parameter of the module gets a gradient from the first step.
    """

    def __init__(self, dim: int, ref_dim: int, *, layers: int = 1, heads: int = 4,
                 mlp_ratio: float = 2.0, gate_init: float = 0.1) -> None:
        super().__init__()
        if layers < 1 or ref_dim < 1 or dim % heads:
            raise ValueError(f"RetrievalAugmentation: need layers >= 1, ref_dim >= 1 and dim "
                             f"divisible by heads; got {layers=}, {ref_dim=}, {dim=}, {heads=}")
        self.key_proj = nn.Sequential(nn.Linear(ref_dim, dim), nn.LayerNorm(dim))
        self.value_proj = nn.Sequential(nn.Linear(ref_dim, dim), nn.LayerNorm(dim))
        self.blocks = nn.ModuleList(_CrossBlock(dim, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, image: Tensor, ref_image: Tensor, ref_text: Tensor,
                ref_mask: Tensor) -> Tensor:
        """image (B, D) normalised; ref_image, ref_text (B, k, D_ref); ref_mask (B, k), 1 = real.

        Returns (B, D) normalised; rows with no real reference are returned unchanged.
        """
        b, k = ref_mask.shape
        if ref_image.shape[:2] != (b, k) or ref_text.shape[:2] != (b, k) or b != image.shape[0]:
            raise ValueError(f"retrieval augmentation: image {tuple(image.shape)}, ref_image "
                             f"{tuple(ref_image.shape)}, ref_text {tuple(ref_text.shape)} and "
                             f"ref_mask {tuple(ref_mask.shape)} disagree on (B, k)")
        real = ref_mask > 0                                                  # (B, k)
        has_ref = real.any(dim=1)                                            # (B,)
        # Rows without references attend to (zeroed) padding instead of nothing: no NaN from an
        # all -inf softmax; their result is discarded below.
        pad = ~real & has_ref[:, None]                                       # (B, k)
        zero = torch.zeros((), dtype=ref_image.dtype, device=ref_image.device)
        keys = self.key_proj(torch.where(real[..., None], ref_image, zero).to(image.dtype))
        values = self.value_proj(torch.where(real[..., None], ref_text, zero).to(image.dtype))
        x = image.unsqueeze(1)                                               # (B, 1, D)
        for block in self.blocks:
            x = block(x, keys, values, pad)
        knowledge = F.normalize(self.out_proj(self.norm(x.squeeze(1))), dim=-1)  # (B, D)
        fused = F.normalize(image + torch.tanh(self.gate) * knowledge, dim=-1)
        return torch.where(has_ref[:, None], fused, image)


__all__ = ["RetrievalAugmentation"]
