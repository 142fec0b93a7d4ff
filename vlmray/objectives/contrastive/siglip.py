r"""SigLIP's pairwise sigmoid loss (Zhai et al., 2023, "Sigmoid Loss for Language Image
Pre-Training").

Every image-text pair of a global batch of N is an independent binary classification: true
pairs (the diagonal) are positives, all others negatives. With L2-normalised embeddings x_i
(image), y_j (text), the learned inverse temperature t = exp(t') and the learned bias b:

    L = -1/N sum_i sum_j log sigmoid( z_ij (t x_i.y_j + b) ),   z_ij = +1 if i == j else -1

Since -log sigmoid(-l) = softplus(l) and -log sigmoid(l) = softplus(l) - l, each block of
logits contributes ``softplus(logits).sum() - (positive logits).sum()``; no label matrix is
built. SigLIP initialises t' = log 10 and b = -10 (``ModelConfig(init_temperature=0.1,
init_logit_bias=-10.0)``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmray.objectives.base import LossResult, Objective, require, stack_metrics
from vlmray.objectives.registry import register_objective

if TYPE_CHECKING:
    from vlmray.distributed import Dist
    from vlmray.models.outputs import Outputs

Exchange = Literal["ring", "gather"]
Block = tuple[Tensor, Tensor, Tensor]
"""(loss sum (), row max of the negative logits (b,), row sum of sigmoid(logits) (b,))."""


@register_objective("siglip")
class SigLipLoss(Objective):
    r"""SigLIP's sigmoid loss over the global batch of N = W*B pairs, with exact gradients.

    Local loss. Rank r holds images X_r and texts Y_r (B rows each) and computes

        L_r = -1/B sum_{i in r} sum_{j=1..N} log sigmoid( z_ij (t x_i.y_j + b) )

    i.e. its B rows of the full N x N sum, divided by the *local* B. Then
    (1/W) sum_r L_r = 1/(W*B) sum_{all i, j} = L, and because every text's gradient from the
    other ranks' terms is sent back to it (the exchange and the gather are differentiable), the
    DDP average of the W gradients equals the single-process gradient of L on the full batch.

    ``exchange="ring"`` (the paper's chunked implementation): score the own texts (the diagonal
    block holds the positives), then W-1 times pass the text block one step round the ring
    (``Dist.neighbour_exchange``: send to r+1, receive from r-1; backward returns the gradient
    the other way) and score it, all negatives. Logits are B x B and each block is recomputed
    in backward rather than stored, so memory is O(B^2 + W B D) per worker.
    ``exchange="gather"``: all-gather texts with grad and score B x N at once (reference).
    ``chunk > 0`` further splits every block into row chunks of that size (O(chunk x B)).
    """

    needs = frozenset({"image_embeds", "text_embeds", "logit_scale", "logit_bias"})

    @dataclass(kw_only=True)
    class Config:
        exchange: Exchange = "ring"
        """ring: W-1 neighbour exchanges of texts, B x B logits; gather: all-gather, B x N."""
        chunk: int = 0
        """Rows of logits computed at a time inside each block (0 = the whole block)."""

        def __post_init__(self) -> None:
            if self.chunk < 0:
                raise ValueError(f"siglip: chunk must be >= 0 (0 = off), got {self.chunk}")

    def __init__(self, cfg: SigLipLoss.Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else SigLipLoss.Config()

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        """L_r = (sum over this rank's B rows and all N columns of -log sigmoid(z l)) / B."""
        image = require(out, "image_embeds", self.name)                  # (B, D)
        text = require(out, "text_embeds", self.name)                    # (B, D)
        scale = require(out, "logit_scale", self.name)                   # () = t
        if out.logit_bias is None:
            raise ValueError("objective 'siglip' needs Outputs.logit_bias; the model returned "
                             "None: build it with ModelConfig(init_logit_bias=-10.0)")
        bias = out.logit_bias                                             # () = b
        if image.shape != text.shape:
            raise ValueError(f"siglip: image {tuple(image.shape)} and text {tuple(text.shape)} "
                             "differ")
        blocks = self.ring_blocks if self.cfg.exchange == "ring" else self.gather_blocks
        losses, stats = [], []
        for loss, max_neg, sig_sum in blocks(image, text, scale, bias, dist):
            losses.append(loss)
            stats.append((max_neg, sig_sum))
        total = torch.stack(losses).sum()
        rows = image.shape[0]
        metrics = self.metrics(image, text, scale, bias, stats, rows * rows * dist.world_size)
        return LossResult(loss=total / rows, metrics=metrics)

    def ring_blocks(self, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor,
                    dist: Dist) -> Iterator[Block]:
        """Yield (loss_sum, row max negative (B,), row sum of sigmoid (B,)) per B x B block."""
        yield _sigmoid_block(image, text, scale, bias, 0, self.cfg.chunk)
        for _ in range(dist.world_size - 1):
            text = dist.neighbour_exchange(text)                          # rank r-k's texts
            yield _sigmoid_block(image, text, scale, bias, None, self.cfg.chunk)

    def gather_blocks(self, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor,
                      dist: Dist) -> Iterator[Block]:
        """One B x N block against all texts; positives at columns r*B + arange(B)."""
        all_text = dist.all_gather(text, with_grad=True)                  # (N, D)
        yield _sigmoid_block(image, all_text, scale, bias, dist.rank * image.shape[0],
                             self.cfg.chunk)

    @staticmethod
    @torch.no_grad()
    def metrics(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor,
                stats: list[tuple[Tensor, Tensor]], pairs: int) -> dict[str, Tensor]:
        """Over this rank's rows: top-1 image->text accuracy (the positive is the row's largest
        logit), mean sigmoid of the positive and of the negative pairs, and t, b."""
        x, y, t, b = _upcast(image, text, scale, bias)                    # as in the blocks
        pos = t * (x * y).sum(-1) + b                                     # (B,)
        max_neg = torch.stack([m for m, _ in stats]).amax(0)              # (B,)
        sig_all = torch.stack([s for _, s in stats]).sum()
        rows = image.shape[0]
        sig_pos = torch.sigmoid(pos).sum()
        names = ("acc_i2t", "pos_prob", "neg_prob", "logit_scale", "logit_bias")
        return stack_metrics(names, (
            (pos > max_neg).double().mean(),
            sig_pos.double() / rows,
            (sig_all - sig_pos).double() / max(pairs - rows, 1),
            t.double().reshape(()),
            b.double().reshape(()),
        ))


def _sigmoid_block(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor,
                   pos_offset: int | None, chunk: int) -> Block:
    """sum_ij -log sigmoid(z_ij l_ij) for l = t X Y^T + b, X (b, D), Y (M, D); row i's positive
    is column ``pos_offset + i`` (None: all negatives). Also row max negative and sigmoid sums.
    """
    return _SigmoidBlock.apply(image, text, scale, bias, pos_offset, chunk)


class _SigmoidBlock(torch.autograd.Function):
    """The loss of one logits block, recomputed (not stored) in backward; fp32 or wider.

    With G = sigmoid(l) - [positive] (b, M), the gradients are dX = t G Y, dY = t G^T X,
    dt = sum(G * X Y^T) = sum((G Y) * X), db = sum(G).
    """

    @staticmethod
    def forward(ctx: Any, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor,
                pos_offset: int | None, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(image, text, scale, bias)
        ctx.pos_offset, ctx.chunk = pos_offset, chunk
        x, y, t, b = _upcast(image, text, scale, bias)
        loss, max_neg, sig_sum = x.new_zeros(()), [], []
        for rows, logits in _chunks(x, y, t, b, chunk):                  # (c, M)
            loss = loss + F.softplus(logits).sum()
            pos = _positive_cols(rows, pos_offset, logits.device)
            if pos is not None:
                here = torch.arange(len(pos), device=logits.device)
                loss = loss - logits[here, pos].sum()
            sig_sum.append(torch.sigmoid(logits).sum(1))
            if pos is not None:
                logits[here, pos] = -torch.inf
            max_neg.append(logits.amax(1))
        outs = (loss, torch.cat(max_neg), torch.cat(sig_sum))
        ctx.mark_non_differentiable(outs[1], outs[2])
        return outs

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        image, text, scale, bias = ctx.saved_tensors
        x, y, t, b = _upcast(image, text, scale, bias)
        dx, dy = torch.zeros_like(x), torch.zeros_like(y)
        dt, db = x.new_zeros(()), x.new_zeros(())
        for rows, logits in _chunks(x, y, t, b, ctx.chunk):
            g = logits.sigmoid_()                                          # (c, M), in place
            pos = _positive_cols(rows, ctx.pos_offset, g.device)
            if pos is not None:
                g[torch.arange(len(pos), device=g.device), pos] -= 1.0
            gy = g @ y                                                     # (c, D)
            dx[rows] = t * gy
            dy += t * (g.T @ x[rows])
            dt += (gy * x[rows]).sum()
            db += g.sum()
        gl = grad_loss.to(x.dtype)
        return ((gl * dx).to(image.dtype), (gl * dy).to(text.dtype),
                (gl * dt).to(scale.dtype).reshape(scale.shape),
                (gl * db).to(bias.dtype).reshape(bias.shape), None, None)


def _upcast(*tensors: Tensor) -> list[Tensor]:
    """Detached copies in one common dtype of at least float32 (bf16 inputs are widened)."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    for x in tensors[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.detach().to(dtype) for x in tensors]


def _chunks(x: Tensor, y: Tensor, t: Tensor, b: Tensor,
            chunk: int) -> Iterator[tuple[slice, Tensor]]:
    """Yield (row slice, logits (c, M) = t x[rows] y^T + b), autocast off."""
    size = chunk if chunk > 0 else max(x.shape[0], 1)
    with torch.autocast(device_type=x.device.type, enabled=False):
        for start in range(0, x.shape[0], size):
            rows = slice(start, min(start + size, x.shape[0]))
            yield rows, (x[rows] @ y.T).mul_(t).add_(b)


def _positive_cols(rows: slice, pos_offset: int | None, device: torch.device) -> Tensor | None:
    """Column of each row's positive in a chunk of rows, or None for an all-negative block."""
    if pos_offset is None:
        return None
    return torch.arange(rows.start, rows.stop, device=device) + pos_offset


__all__ = ["SigLipLoss"]
