r"""MAE's lightweight image decoder and its helpers (He et al., 2022, "Masked Autoencoders Are
Scalable Vision Learners").

The encoder sees only the visible patches (``VisionTower.forward_masked``); the decoder puts
them back on the full grid, fills the masked slots with one learned mask token, adds fixed 2-D
sine-cosine positions, runs a few pre-norm transformer blocks and predicts every patch's pixels
with a linear layer:

    z = scatter(W_in h_vis, m; [MASK]) + P_sincos,   z <- Block_k(z),   x_hat = W_out LN(z)

Differences from MAE: the decoder gets the visible patch tokens only, not the encoder's CLS
token; pixels are predicted as ``patchify`` lays them out (row-major patches, each (p, p, 3)).
Single-device code: no collectives.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmray.models.fusion import TransformerLayer
from vlmray.models.towers import visible_index


def patchify(pixels: Tensor, patch: int) -> Tensor:
    """(B, 3, H, W) -> (B, N, p*p*3), N = (H/p)(W/p) patches in row-major order, each patch
    laid out (row, column, channel). uint8 pixels become floats in [0, 1] (x / 255); float
    pixels pass through unchanged (whatever scale they carry)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"patchify: need pixels (B, 3, H, W), got {tuple(pixels.shape)}")
    b, c, h, w = pixels.shape
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"patchify: patch={patch} must divide the image side(s) {h} x {w}")
    x = pixels.float().div(255.0) if pixels.dtype == torch.uint8 else pixels
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: Tensor, grid_h: int, grid_w: int, patch: int) -> Tensor:
    """The inverse of ``patchify``: (B, grid_h * grid_w, p*p*3) -> (B, 3, grid_h p, grid_w p)."""
    b = patches.shape[0]
    if patches.shape[1:] != (grid_h * grid_w, patch * patch * 3):
        raise ValueError(f"unpatchify: need (B, {grid_h * grid_w}, {patch * patch * 3}), got "
                         f"{tuple(patches.shape)}")
    x = patches.reshape(b, grid_h, grid_w, patch, patch, 3).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, 3, grid_h * patch, grid_w * patch)


def random_patch_mask(batch: int, n_patches: int, ratio: float,
                      generator: torch.Generator | None = None) -> Tensor:
    """bool (batch, n_patches), True = masked: each row masks exactly round(ratio * N) patches
    chosen uniformly (a random permutation per row), on the generator's device."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"random_patch_mask: ratio must be in [0, 1], got {ratio}")
    device = generator.device if generator is not None else torch.device("cpu")
    n_mask = round(ratio * n_patches)
    noise = torch.rand(batch, n_patches, generator=generator, device=device)
    order = noise.argsort(dim=1)                                            # random permutation
    mask = torch.zeros(batch, n_patches, dtype=torch.bool, device=device)
    return mask.scatter(1, order[:, :n_mask], True)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine positions (grid_h * grid_w, dim), row-major: the first dim/2
    channels encode the row, the rest the column, each as [sin(pos w_k), cos(pos w_k)] with
    w_k = 10000^(-k / (dim/4)), k < dim/4 (the Transformer's 1-D code, MAE's 2-D split)."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim={dim} must be divisible by 4")
    omega = torch.pow(10000.0, -torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def code(pos: Tensor) -> Tensor:                                        # (n,) -> (n, dim/2)
        angle = pos.double()[:, None] * omega[None]
        return torch.cat((angle.sin(), angle.cos()), dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.cat((code(rows.flatten()), code(cols.flatten())), dim=1).float()


class MAEDecoder(nn.Module):
    """Visible tokens (B, N_vis, in_dim) + patch mask (B, N) -> pixel predictions (B, N, p*p*3)
    for every patch (see the module docstring). ``dim``, the decoder width (0: ``in_dim``), must
    be divisible by 4 (the 2-D sin-cos code) and by ``heads``."""

    def __init__(self, in_dim: int, grid: tuple[int, int], patch: int, *, dim: int = 0,
                 layers: int = 2, heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        dim = dim or in_dim
        if layers < 1 or heads < 1 or dim % heads or dim % 4:
            raise ValueError(f"MAEDecoder: need layers, heads >= 1 and a width divisible by 4 "
                             f"and by heads; got layers={layers}, heads={heads}, dim={dim}")
        self.grid, self.patch = (int(grid[0]), int(grid[1])), int(patch)
        self.n_patches = self.grid[0] * self.grid[1]
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", sincos_2d(*self.grid, dim), persistent=False)  # (N, dim)
        self.blocks = nn.ModuleList(TransformerLayer(dim, heads, mlp_ratio)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.patch * self.patch * 3)

    def forward(self, visible: Tensor, patch_mask: Tensor) -> Tensor:
        """(B, N_vis, in_dim) in ascending patch order, bool (B, N) True = masked ->
        (B, N, p*p*3); the visible count must equal each row's unmasked count."""
        b = visible.shape[0]
        keep = visible_index(patch_mask, b, self.n_patches)                  # (B, N_vis)
        if visible.ndim != 3 or keep.shape != visible.shape[:2]:
            raise ValueError(f"MAEDecoder: {tuple(visible.shape)} visible tokens do not match "
                             f"the mask's {tuple(keep.shape)} visible patches")
        x = self.embed(visible)                                             # (B, N_vis, dim)
        dim = x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(b, self.n_patches, dim)
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, dim), x)  # (B, N, dim)
        z = full + self.pos.to(x.dtype)
        for block in self.blocks:
            z = block(z)
        return self.head(self.norm(z))                                      # (B, N, p*p*3)


__all__ = ["MAEDecoder", "patchify", "random_patch_mask", "sincos_2d", "unpatchify"]
