"""Objectives' own parameters (DeCLIP's predictor and MLM head...) are not inside the DDP-wrapped
model, so ``train_step`` averages their gradients itself: 2 real gloo processes with different
local gradients end with the mean, and frozen parameters are left alone.

    pytest tests/train/test_objective_grads.py -q
"""

from __future__ import annotations

import torch
from torch import nn

from tests.distributed._spawn import run_gloo
from vlmray.distributed import Dist
from vlmray.train.loop import average_objective_grads


def _mix() -> nn.Module:
    mix = nn.Module()
    mix.head = nn.Linear(3, 2)
    mix.frozen = nn.Linear(2, 2).requires_grad_(False)
    mix.unused = nn.Linear(2, 1)          # no gradient on rank 1: counts as zero
    return mix


def _worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    mix = _mix()
    x = torch.full((4, 3), float(rank + 1))
    loss = mix.head(x).square().sum()
    if rank == 0:
        loss = loss + mix.unused(torch.ones(1, 2)).sum()
    loss.backward()
    average_objective_grads(mix, Dist.current())
    return {n: (p.grad.clone() if p.grad is not None else None)
            for n, p in mix.named_parameters()}


def test_objective_grads_are_averaged_over_workers() -> None:
    grads = run_gloo(_worker, 2)
    expected = {}
    for rank in range(2):
        torch.manual_seed(0)
        mix = _mix()
        loss = mix.head(torch.full((4, 3), float(rank + 1))).square().sum()
        if rank == 0:
            loss = loss + mix.unused(torch.ones(1, 2)).sum()
        loss.backward()
        for n, p in mix.named_parameters():
            if p.requires_grad:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                expected[n] = expected.get(n, 0) + g / 2
    for rank_grads in grads:
        for n, g in expected.items():
            torch.testing.assert_close(rank_grads[n], g)
        assert rank_grads["frozen.weight"] is None and rank_grads["frozen.bias"] is None
    assert not torch.equal(expected["head.weight"], torch.zeros(2, 3))


def test_single_process_is_untouched() -> None:
    mix = _mix()
    mix.head(torch.ones(2, 3)).sum().backward()
    before = mix.head.weight.grad.clone()
    average_objective_grads(mix, Dist.current())
    assert torch.equal(mix.head.weight.grad, before) and mix.unused.weight.grad is None
