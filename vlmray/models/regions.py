r"""Region features pooled from a ViT's patch tokens by box overlap (region-word matching).

A box b = (x0, y0, x1, y1) in normalised image coordinates covers patch cell (i, j) of a
g_h x g_w grid (cell rows [i/g_h, (i+1)/g_h), columns [j/g_w, (j+1)/g_w)) by the fraction

    a_ij(b) = o_y(i) * o_x(j),   o_x(j) = g_w * max(0, min(x1, (j+1)/g_w) - max(x0, j/g_w))

(o_y likewise), the exact share of the cell's area inside the box. The region feature is the
overlap-weighted mean of the patch tokens t_ij,

    r(b) = sum_ij a_ij(b) t_ij / sum_ij a_ij(b)

(a zero vector for an empty box). It is differentiable in the tokens (and, piecewise, in the box
corners). Prefix tokens (CLS, registers) are skipped. Models stay single-device: no collectives.
"""

from __future__ import annotations

import torch
from torch import Tensor


def axis_overlap(lo: Tensor, hi: Tensor, cells: int) -> Tensor:
    """Fraction of each of ``cells`` equal cells of [0, 1] inside [lo, hi]: lo, hi (...,) ->
    (..., cells), values in [0, 1]."""
    edges = torch.arange(cells + 1, dtype=lo.dtype, device=lo.device) / cells      # (cells+1,)
    left, right = edges[:-1], edges[1:]
    inside = torch.minimum(hi[..., None], right) - torch.maximum(lo[..., None], left)
    return inside.clamp(min=0) * cells


def overlap_weights(boxes: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(o_y (B, K, g_h), o_x (B, K, g_w)) for boxes (B, K, 4) = (x0, y0, x1, y1) in [0, 1];
    the cell (i, j) weight is o_y[..., i] * o_x[..., j]."""
    gh, gw = grid
    x0, y0, x1, y1 = boxes.unbind(-1)
    return axis_overlap(y0, y1, gh), axis_overlap(x0, x1, gw)


def pool_regions(tokens: Tensor, grid: tuple[int, int], boxes: Tensor,
                 n_prefix: int | None = None) -> Tensor:
    """Region features (B, K, D) from tokens (B, N, D) (``n_prefix`` prefix tokens, then the
    g_h * g_w patch tokens in row-major order) and boxes (B, K, 4); see the module docstring.
    ``n_prefix`` defaults to N - g_h * g_w."""
    b, n, d = tokens.shape
    gh, gw = grid
    n_prefix = n - gh * gw if n_prefix is None else n_prefix
    if n_prefix < 0 or n - n_prefix != gh * gw:
        raise ValueError(f"pool_regions: {n} tokens do not hold {n_prefix} prefix tokens and a "
                         f"{gh}x{gw} patch grid")
    if boxes.ndim != 3 or boxes.shape[0] != b or boxes.shape[-1] != 4:
        raise ValueError(f"pool_regions: boxes must be (B={b}, K, 4), got {tuple(boxes.shape)}")
    patches = tokens[:, n_prefix:].reshape(b, gh, gw, d)                            # (B, gh, gw, D)
    wy, wx = overlap_weights(boxes.to(tokens.dtype), grid)                           # (B, K, gh|gw)
    summed = torch.einsum("bki,bkj,bijd->bkd", wy, wx, patches)                     # (B, K, D)
    area = wy.sum(-1) * wx.sum(-1)                                                   # (B, K)
    return summed / torch.where(area > 0, area, torch.ones_like(area))[..., None]


__all__ = ["axis_overlap", "overlap_weights", "pool_regions"]
