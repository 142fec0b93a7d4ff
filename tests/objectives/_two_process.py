"""Shared steps of the "1 process vs 2 gloo processes" objective tests: a rank's loss and
gradients averaged over ranks the way DDP reports them, and the check that they equal one
process's on the full batch."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from torch import Tensor

from vlmray.distributed import Dist


def ddp_average(loss: float, grads: dict[str, Tensor],
                dist: Dist) -> tuple[float, dict[str, Tensor]]:
    """In a gloo worker, after backward: (the loss averaged over ranks, ``grads`` all-reduced
    and divided by the world size in place)."""
    for grad in grads.values():
        torch.distributed.all_reduce(grad)
        grad /= dist.world_size
    return dist.all_reduce_mean(loss).item(), grads


def assert_matches_one(ranks: Iterable[tuple[float, dict[str, Tensor]]], loss: float,
                       grads: dict[str, Tensor], *, atol: float = 1e-10) -> None:
    """Every rank's ``ddp_average`` equals one process's (loss, grads) within ``atol``."""
    for dist_loss, dist_grads in ranks:
        assert dist_loss == pytest.approx(loss, abs=atol), (dist_loss, loss)
        for name, grad in grads.items():
            torch.testing.assert_close(dist_grads[name], grad, atol=atol, rtol=0, msg=name)
