"""Collectives that autograd can see: gather along the batch, and one step around the ring.

Together with ``dist.py`` this is the only place in vlmray that calls ``torch.distributed``.
Every function takes the process group explicitly (``None`` is the default group) and assumes
that every rank passes a tensor of the same shape and dtype; ``Dist`` checks that first.

Gradient convention (the one DDP needs). Let rank r compute a loss L_r and let the trainer
average parameter gradients over the W ranks, i.e. optimise (1/W) sum_r L_r. The backward of
``all_gather_with_grad`` all-reduces (sums) the incoming gradient and keeps this rank's rows:

    dS/dx_r = sum_s dL_s/dX[rows of r]        with S = sum_s L_s,  X = cat_s x_s  (W*B, ...)

which is exact both when each rank computes a local loss and when every rank computes the same
global loss (then S = W * L and the DDP average divides the W back out).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor

ProcessGroup = Any  # torch.distributed.ProcessGroup, or None for the default group


def _peer(group: ProcessGroup, group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``group`` (point-to-point ops take global ranks)."""
    return group_rank if group is None else torch_dist.get_global_rank(group, group_rank)


def gather_parts(x: Tensor, group: ProcessGroup = None) -> list[Tensor]:
    """All-gather without autograd: one (B, ...) tensor per rank, in rank order."""
    parts = [torch.empty_like(x) for _ in range(torch_dist.get_world_size(group))]
    torch_dist.all_gather(parts, x.detach().contiguous(), group=group)
    return parts


def send_recv(x: Tensor, send_to: int, recv_from: int, group: ProcessGroup = None) -> Tensor:
    """Send ``x`` to group rank ``send_to``; receive one shaped like ``x`` from ``recv_from``."""
    out = torch.empty_like(x)
    ops = [
        torch_dist.P2POp(torch_dist.isend, x.detach().contiguous(), _peer(group, send_to), group),
        torch_dist.P2POp(torch_dist.irecv, out, _peer(group, recv_from), group),
    ]
    for request in torch_dist.batch_isend_irecv(ops):
        request.wait()
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """(B, ...) -> (W*B, ...); backward: all-reduce SUM, then this rank's B rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        start = torch_dist.get_rank(group) * x.shape[0]
        ctx.group, ctx.rows = group, slice(start, start + x.shape[0])
        return torch.cat(gather_parts(x, group), dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rows], None


class _NeighbourExchange(torch.autograd.Function):
    """Receive rank r-1's tensor while sending ours to r+1; backward runs the ring the other way."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        rank, world = torch_dist.get_rank(group), torch_dist.get_world_size(group)
        ctx.group, ctx.rank, ctx.world = group, rank, world
        return send_recv(x, send_to=(rank + 1) % world, recv_from=(rank - 1) % world, group=group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        # The gradient of what we received belongs to r-1; ours comes back from r+1.
        rank, world = ctx.rank, ctx.world
        back = send_recv(grad, (rank - 1) % world, (rank + 1) % world, ctx.group)
        return back, None


def all_gather_with_grad(x: Tensor, group: ProcessGroup = None) -> Tensor:
    """Concatenate every rank's (B, ...) tensor into (W*B, ...), differentiably (see module doc)."""
    return _AllGatherWithGrad.apply(x, group)


def all_gather_no_grad(x: Tensor, group: ProcessGroup = None) -> Tensor:
    """(B, ...) -> (W*B, ...) where only this rank's own rows keep their graph.

    open_clip's ``gather_with_grad=False``: gradients from other ranks' losses never reach ``x``,
    so with a local loss the gradient is incomplete (see ``ClipLoss`` ``gather="local_nograd"``).
    """
    parts = gather_parts(x, group)
    parts[torch_dist.get_rank(group)] = x
    return torch.cat(parts, dim=0)


def neighbour_exchange_with_grad(x: Tensor, group: ProcessGroup = None) -> Tensor:
    """One ring step: returns rank (r-1)'s tensor; gradients flow back to the sender."""
    return _NeighbourExchange.apply(x, group)


__all__ = [
    "ProcessGroup",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "gather_parts",
    "neighbour_exchange_with_grad",
    "send_recv",
]
