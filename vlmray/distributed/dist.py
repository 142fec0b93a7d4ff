"""``Dist``: this worker's place in the job, and the collectives objectives and the trainer use.

Objectives and models never call ``torch.distributed``; they call ``Dist``. With one process
(``Dist()``, or ``Dist.current()`` when no process group is initialised) every method is an
identity or a cheap local op, so the same objective code runs on a laptop and on a cluster.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor

from vlmray.distributed.gather import (
    all_gather_no_grad,
    all_gather_with_grad,
    gather_parts,
    neighbour_exchange_with_grad,
)


def _initialised() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def _default_device(group: Any) -> torch.device:
    """CUDA's current device under NCCL, else CPU."""
    if "nccl" in str(torch_dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True, kw_only=True)
class Dist:
    """This worker's rank in a group of ``world_size`` workers, plus collectives.

    Attributes:
        rank: rank in ``group`` (0 .. world_size-1).
        world_size: number of workers W.
        local_rank: rank on this node (``LOCAL_RANK``), for picking a device.
        device: where small tensors this class creates live (labels, metric buffers).
        group: the torch process group; ``None`` means the default group.
        check_sizes: before a gather, check every rank passes the same shape (one tiny
            all-gather); turn off once a pipeline is known to deliver equal batches.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: Any = None
    check_sizes: bool = True

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}"
            )

    @classmethod
    def from_env(
        cls,
        *,
        group: Any = None,
        device: torch.device | str | None = None,
        local_rank: int | None = None,
    ) -> Dist:
        """Read rank and world size from the initialised process group (or a 1-worker Dist)."""
        if not _initialised():
            return cls(device=torch.device(device or "cpu"), local_rank=local_rank or 0)
        return cls(
            rank=torch_dist.get_rank(group),
            world_size=torch_dist.get_world_size(group),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank,
            device=torch.device(device) if device is not None else _default_device(group),
            group=group,
        )

    @classmethod
    def current(cls) -> Dist:
        """The Dist of the default process group; a single-process Dist when there is none."""
        return cls.from_env()

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one that writes files and logs."""
        return self.rank == 0

    # --- differentiable collectives ------------------------------------------------------

    def all_gather(self, x: Tensor, *, with_grad: bool = True) -> Tensor:
        """Concatenate every rank's (B, ...) along dim 0 -> (W*B, ...), rank order.

        ``with_grad=True``: exact gradients (backward all-reduces the incoming gradient and
        keeps this rank's rows). ``with_grad=False``: other ranks' rows are detached and only
        this rank's own slot keeps its graph (open_clip's no-grad gather; incomplete gradient).
        """
        if self.world_size == 1:
            return x
        self._check_same_shape(x, "all_gather")
        gather = all_gather_with_grad if with_grad else all_gather_no_grad
        return gather(x, self.group)

    def neighbour_exchange(self, x: Tensor) -> Tensor:
        """One ring step: send (B, ...) to rank r+1, return the (B, ...) of rank r-1.

        Differentiable: backward sends the gradient back to r-1 and receives ours from r+1.
        """
        if self.world_size == 1:
            return x
        self._check_same_shape(x, "neighbour_exchange")
        return neighbour_exchange_with_grad(x, self.group)

    def offsets(self, local_batch: int, device: torch.device | str | None = None) -> Tensor:
        """Labels of the positive pairs for a local loss: ``arange(B) + rank * B``, int64 (B,).

        Row i of this rank's (B, W*B) logits matches column ``rank * B + i`` of the gather.
        """
        labels = torch.arange(local_batch, dtype=torch.long, device=device or self.device)
        return labels + self.rank * local_batch

    # --- metric reductions (no grad) -------------------------------------------------------

    def all_reduce_sum(self, x: Tensor | float) -> Tensor:
        """Sum over ranks of a detached copy of ``x`` (any shape; a Python number -> float64)."""
        if isinstance(x, Tensor):
            y = x.detach().clone()
        else:
            y = torch.tensor(x, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch_dist.all_reduce(y, op=torch_dist.ReduceOp.SUM, group=self.group)
        return y

    def all_reduce_mean(self, x: Tensor | float) -> Tensor:
        """Mean over ranks of a detached copy of ``x`` (float result)."""
        return self.all_reduce_sum(x) / self.world_size

    def all_reduce_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Mean of each scalar metric over ranks in one collective (all ranks: same keys)."""
        if self.world_size == 1 or not metrics:
            return dict(metrics)
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        means = self.all_reduce_mean(values.to(self.device)).tolist()
        return dict(zip(keys, means))

    def barrier(self) -> None:
        """Wait for every rank (no-op for one worker)."""
        if self.world_size > 1:
            torch_dist.barrier(group=self.group)

    # --- helpers ---------------------------------------------------------------------------

    def _check_same_shape(self, x: Tensor, op: str) -> None:
        """Raise on every rank if ranks disagree on (ndim, batch size, row size)."""
        if x.ndim == 0:
            raise ValueError(f"{op} needs a tensor with a batch dimension, got a scalar")
        if not self.check_sizes:
            return
        shape = torch.tensor([x.ndim, x.shape[0], math.prod(x.shape[1:])])
        sizes = [tuple(p.tolist()) for p in gather_parts(shape.to(x.device), self.group)]
        if len(set(sizes)) > 1:
            batches = {r: s[1] for r, s in enumerate(sizes)}
            raise ValueError(
                f"{op} needs the same local batch shape on every rank; got (ndim, batch, "
                f"row numel) {dict(enumerate(sizes))} (local batches {batches}). "
                "Drop or pad uneven last batches."
            )


__all__ = ["Dist"]
