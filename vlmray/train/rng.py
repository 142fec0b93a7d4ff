"""The random number generators of a training process, saved in and restored from checkpoints,
so that a run resumed at step k draws what the uninterrupted run drew after step k.

Four generators are covered: torch's CPU generator, every CUDA device's (when CUDA is
available), NumPy's global legacy generator (``np.random``) and Python's ``random``.
:func:`capture` returns them as tensors and plain types only (a checkpoint's ``state.pt`` is
read with ``weights_only=True``); :func:`restore` sets them back exactly.

Every rank has its own states: :func:`gather` collects them on rank 0, which saves the list;
on resume :func:`restore_for_rank` gives each rank its own entry back, or, when the list does
not fit (a checkpoint without it, or another world size: an elastic resume), seeds every
generator from (seed, step, rank), so the run is still deterministic, though not the same as
the uninterrupted one.

    states = rng.gather(dist)                      # rank 0: list of W dicts; others: None
    ...
    how = rng.restore_for_rank(states, rank=dist.rank, world_size=dist.world_size,
                               seed=cfg.train.seed, step=progress.step)
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as torch_dist

if TYPE_CHECKING:
    from vlmray.distributed import Dist

VERSION = 1


def capture() -> dict[str, Any]:
    """This process's generator states, as tensors and plain types:
    ``{"version", "torch": uint8 tensor, "cuda": [uint8 tensor per device], "numpy": {...},
    "python": {...}}`` (``cuda`` is empty without CUDA)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    cuda = ([t.clone() for t in torch.cuda.get_rng_state_all()]
            if torch.cuda.is_available() else [])
    return {
        "version": VERSION,
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "internal": [int(x) for x in internal],
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
    }


def restore(state: dict[str, Any]) -> None:
    """Sets this process's generators to ``state`` (from :func:`capture`, possibly through a
    checkpoint). CUDA states are set for the devices both have (none without CUDA)."""
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).clone())
    if torch.cuda.is_available():
        for i, s in enumerate(state.get("cuda", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(s, dtype=torch.uint8).clone(), i)
    n = state["numpy"]
    keys = np.asarray(torch.as_tensor(n["keys"]).numpy(), dtype=np.uint32)
    np.random.set_state((n["kind"], keys, int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached"])))
    p = state["python"]
    gauss = p["gauss_next"]
    random.setstate((int(p["version"]), tuple(int(x) for x in p["internal"]),
                     None if gauss is None else float(gauss)))


def gather(dist: Dist) -> list[dict[str, Any]] | None:
    """Every rank's :func:`capture`, in rank order, on rank 0; None on the other ranks. A
    collective (``all_gather_object`` over ``dist.group``, the default group when None): every
    rank must call it. One process: ``[capture()]``."""
    if dist.world_size == 1:
        return [capture()]
    states: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(states, capture(), group=dist.group)
    return states if dist.is_main else None


def reseed(seed: int, step: int, rank: int) -> None:
    """Seeds torch (CPU and CUDA), NumPy's global generator and Python's ``random`` from
    ``np.random.SeedSequence([seed, step, rank])`` (negative numbers taken modulo 2**64)."""
    seq = np.random.SeedSequence([int(x) % 2**64 for x in (seed, step, rank)])
    words = seq.generate_state(8, dtype=np.uint32)
    torch_seed = int(words[0]) | int(words[1]) << 32
    torch.manual_seed(torch_seed)                       # every CUDA device too
    np.random.seed(words[2:6])
    random.seed(int(words[6]) | int(words[7]) << 32)


def restore_for_rank(states: list[dict[str, Any]] | None, *, rank: int, world_size: int,
                     seed: int, step: int) -> str:
    """Restores this rank's generators from a checkpoint's ``states`` (:func:`gather`'s list):
    ``states[rank]`` when there are exactly ``world_size`` of them -> ``"restored"``; otherwise
    (None or empty: a checkpoint without them; another length: the world size changed)
    :func:`reseed` from (seed, step, rank) -> ``"reseeded"``."""
    if states is not None and len(states) == world_size:
        restore(states[rank])
        return "restored"
    reseed(seed, step, rank)
    return "reseeded"


__all__ = ["capture", "gather", "reseed", "restore", "restore_for_rank"]
