r"""Masked image modelling with pixel targets: MAE (He et al., 2022, "Masked Autoencoders Are
Scalable Vision Learners"), also FLAVA's unimodal MIM loss (Singh et al., 2022) in its
normalised-pixel reading.

Each step a fraction r of every image's patches is masked (``schema.PATCH_MASK``, drawn in
``prepare``); the vision tower encodes only the visible ones (``masked_image_tokens``); an
MAE decoder (``vlmray.models.mae.MAEDecoder``) predicts all N patches' pixels x_hat. With
targets x (``patchify`` of the image, [0, 1]; with ``norm_pix`` each patch standardised by its
own mean and unbiased variance, x <- (x - mean) / sqrt(var + 1e-6), MAE's best setting), the
loss is the mean squared error over the masked patches only:

    L = 1 / (B K) sum_i sum_{n in M_i} 1/P ||x_hat_{i,n} - x_{i,n}||^2,   K = |M_i| = round(r N)

Every row masks exactly K patches and every worker holds B rows, so each worker's mean equals
the global mean's share: (1/W) sum_r L_r = L with no extra collective.

Masks. ``prepare`` draws the masks of all W * B global rows from a CPU generator seeded with
(``seed``, step) on every rank and keeps this rank's B rows, so they depend on neither W nor
the device; ``step`` is a buffer (saved in checkpoints) that advances once per forward.

Deviations. FLAVA's MIM predicts dVAE tokens of BEiT-style block-masked images and keeps mask
tokens in the encoder; here the encoder drops the masked patches (MAE) and the targets are
(normalised) pixels. The decoder does not see the encoder's CLS token (MAE's does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vlmray.data.schema import PATCH_MASK, PIXELS
from vlmray.distributed import Dist
from vlmray.models.mae import MAEDecoder, patchify, random_patch_mask
from vlmray.models.outputs import MASKED_IMAGE_TOKENS
from vlmray.objectives.base import LossResult, Objective, SetupContext, stack_metrics
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.data.tokenize import Tokenizer
    from vlmray.eval.heldout import HeldOut
    from vlmray.models.outputs import Outputs

_SEED_STRIDE = 1_000_003
EVAL_IMAGES = 256
"""Held-out images ``mim.evaluate`` reconstructs (a fixed mask per image)."""


def pixel_targets(pixels: Tensor, patch: int, norm_pix: bool,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, 3, H, W) -> targets (B, N, p*p*3) of ``dtype``: patches in [0, 1] (uint8 / 255;
    float pixels as they are), each standardised by its own mean and unbiased variance when
    ``norm_pix`` (MAE)."""
    x = pixels.to(dtype) / 255.0 if pixels.dtype == torch.uint8 else pixels.to(dtype)
    target = patchify(x, patch)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return target


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked patches of the per-patch mean squared error: (B, N, P), (B, N, P),
    bool (B, N) -> (); 0 (graph kept) when nothing is masked."""
    dtype = torch.promote_types(pred.dtype, torch.float32)                 # bf16 -> float32
    per_patch = (pred.to(dtype) - target.to(dtype)).pow(2).mean(dim=-1)    # (B, N)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp(min=1.0)


class PatchMasking(Objective):
    """Base of objectives that mask image patches: the ``step`` buffer, the (seed, step)
    generator and ``prepare`` (draws ``PATCH_MASK`` unless an earlier objective did). A
    subclass's ``Config`` has ``mask_ratio`` and ``seed``; its ``setup`` calls
    ``setup_grid``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.grid: tuple[int, int, int] | None = None

    def setup_grid(self, ctx: SetupContext) -> tuple[int, int, int]:
        """(grid_h, grid_w, patch) from ``ctx.patch_grid``; errors for CNNs or a ratio that
        leaves no patch masked or none visible."""
        if ctx.patch_grid is None:
            raise ValueError(f"{self.name} needs a ViT vision tower (patches); the model's "
                             "vision tower has no patch grid")
        self.grid = tuple(int(v) for v in ctx.patch_grid)                 # type: ignore[assignment]
        n = self.grid[0] * self.grid[1]
        k = round(self.cfg.mask_ratio * n)
        if not 1 <= k <= n - 1:
            raise ValueError(f"{self.name}: mask_ratio={self.cfg.mask_ratio} masks {k} of the "
                             f"{n} patches; it must mask at least one and leave one visible")
        return self.grid

    def generator(self, step: int) -> torch.Generator:
        """The CPU mask generator of ``step``: identical on every rank."""
        seed = (self.cfg.seed * _SEED_STRIDE + step) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def prepare(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{PATCH_MASK: bool (B, N)}`` for this rank's rows of the global (W*B, N) draw."""
        if PATCH_MASK in batch:
            return {}
        if self.grid is None:
            raise ValueError(f"objective {self.name!r} has no patch grid yet: call "
                             "setup(SetupContext) first (ObjectiveMix.setup does)")
        if PIXELS not in batch:
            raise ValueError(f"objective {self.name!r} needs the batch column {PIXELS!r}")
        pixels = batch[PIXELS]
        b, n = pixels.shape[0], self.grid[0] * self.grid[1]
        dist = Dist.current()
        masks = random_patch_mask(dist.world_size * b, n, self.cfg.mask_ratio,  # host sync:
                                  self.generator(int(self.step.item())))  # seeds the mask draw
        return {PATCH_MASK: masks[dist.rank * b:(dist.rank + 1) * b].to(pixels.device)}

    def advance(self) -> None:
        """Move the mask generator to the next step (once per forward)."""
        with torch.no_grad():
            self.step += 1

    def masked_inputs(self, batch: Mapping[str, Tensor], out: Outputs) -> tuple[Tensor, ...]:
        """(visible tokens (B, N_vis, D), patch mask (B, N) bool, pixels (B, 3, H, W))."""
        if MASKED_IMAGE_TOKENS not in out.extra:
            raise ValueError(f"objective {self.name!r} needs Outputs.extra"
                             f"[{MASKED_IMAGE_TOKENS!r}]: run the model with this objective's "
                             "needs")
        missing = [c for c in (PATCH_MASK, PIXELS) if c not in batch]
        if missing:
            raise ValueError(f"objective {self.name!r} needs the batch column(s) {missing} "
                             "(PATCH_MASK comes from ObjectiveMix.prepare)")
        return out.extra[MASKED_IMAGE_TOKENS], batch[PATCH_MASK].bool(), batch[PIXELS]


@register_objective("mim")
class MimLoss(PatchMasking):
    r"""MAE / FLAVA-MIM: reconstruct the masked patches' (normalised) pixels from the visible
    ones through an owned MAE decoder (see the module docstring for L and the deviations)."""

    needs = frozenset({MASKED_IMAGE_TOKENS, PIXELS, PATCH_MASK})

    @dataclass(kw_only=True)
    class Config:
        mask_ratio: float = 0.75
        """Fraction r of patches masked per image (MAE: 0.75; FLAVA: about 0.4)."""
        norm_pix: bool = True
        """Standardise each target patch by its own mean and variance (MAE's best)."""
        decoder_layers: int = 2
        """Depth of the MAE decoder (MAE: 8 blocks of width 512)."""
        decoder_heads: int = 4
        """Attention heads of the decoder (must divide D)."""
        seed: int = 0
        """Seed of the masks; with the step counter every run is reproducible."""

        def __post_init__(self) -> None:
            if not 0.0 < self.mask_ratio < 1.0:
                raise ValueError(f"mim: mask_ratio must be in (0, 1), got {self.mask_ratio}")
            if self.decoder_layers < 1 or self.decoder_heads < 1:
                raise ValueError(f"mim: decoder_layers and decoder_heads must be >= 1, got "
                                 f"{self.decoder_layers}, {self.decoder_heads}")
            if self.seed < 0:
                raise ValueError(f"mim: seed must be >= 0, got {self.seed}")

    def __init__(self, cfg: MimLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else MimLoss.Config()
        self.decoder: MAEDecoder | None = None

    def setup(self, ctx: SetupContext) -> None:
        """The MAE decoder at width D = ``ctx.embed_dim`` over ``ctx.patch_grid``."""
        gh, gw, patch = self.setup_grid(ctx)
        self.decoder = MAEDecoder(ctx.embed_dim, (gh, gw), patch, layers=self.cfg.decoder_layers,
                                  heads=self.cfg.decoder_heads)

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r: masked-patch MSE over this rank's rows."""
        if self.decoder is None or self.grid is None:
            raise ValueError(f"objective {self.name!r} has no decoder yet: call "
                             "setup(SetupContext) first (ObjectiveMix.setup does)")
        visible, mask, pixels = self.masked_inputs(batch, out)
        pred = self.decoder(visible, mask)                                  # (B, N, p*p*3)
        target = pixel_targets(pixels, self.grid[2], self.cfg.norm_pix,
                               torch.promote_types(pred.dtype, torch.float32))
        loss = masked_mse(pred, target, mask)
        self.advance()
        with torch.no_grad():
            visible_mse = masked_mse(pred, target, ~mask)
            ratio = mask.double().mean()
            metrics = stack_metrics(("visible_mse", "mask_ratio"), (visible_mse.double(), ratio))
        return LossResult(loss=loss, metrics=metrics)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, data: HeldOut,
                 tokenizer: Tokenizer) -> dict[str, float]:
        """``mim_mse``: masked-patch MSE on up to ``EVAL_IMAGES`` held-out images, with masks
        from a fixed generator (the same masks at every evaluation, unlike training's)."""
        if self.decoder is None or self.grid is None or not hasattr(model, "encode_masked_image"):
            return {}
        pixels = data.pixels[:EVAL_IMAGES]
        device = next(self.decoder.parameters()).device
        gen = torch.Generator().manual_seed(self.cfg.seed * _SEED_STRIDE + _SEED_STRIDE - 1)
        n = self.grid[0] * self.grid[1]
        mask = random_patch_mask(len(pixels), n, self.cfg.mask_ratio, gen).to(device)
        total, count = 0.0, 0
        for start in range(0, len(pixels), 64):
            px, m = pixels[start:start + 64].to(device), mask[start:start + 64]
            pred = self.decoder(model.encode_masked_image(px, m), m)
            target = pixel_targets(px, self.grid[2], self.cfg.norm_pix)
            total += float(masked_mse(pred, target, m)) * len(px)
            count += len(px)
        return {"mim_mse": total / max(count, 1)}


__all__ = ["EVAL_IMAGES", "MimLoss", "PatchMasking", "masked_mse", "pixel_targets"]
