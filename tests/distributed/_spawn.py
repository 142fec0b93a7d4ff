"""Run a function on W real processes joined by a gloo process group (no Ray, no mocks).

    results = run_gloo(worker_fn, 2, a, b)   # [worker_fn(0, 2, a, b), worker_fn(1, 2, a, b)]

``worker_fn(rank, world_size, *args)`` must be a module-level function (it is pickled by name);
its return value comes back pickled with ``torch.save``.

The processes of a 2-process and of a 3-process group are started once per test session
(spawned, ``torch`` and the process group set up once) and then run one call after another:
starting Python processes that import torch costs seconds, and the suite makes dozens of calls
at W=2 and a few at W=3 (the smallest ring where rank r+1 and rank r-1 differ). After every
call a worker restores torch's global settings (default dtype, grad mode, deterministic flag).
A call that raises or runs past its timeout kills its workers; the next call starts fresh ones.
Other world sizes get processes for one call.
"""

from __future__ import annotations

import atexit
import io
import os
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_gloo"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(rank: int, world_size: int, port: int, jobs: Any, results: Any) -> None:
    """Worker process: join the group once, then run ``(fn, args)`` jobs until ``None``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                  timeout=timedelta(seconds=30))
    while (job := jobs.get()) is not None:
        fn, args = job
        try:
            buf = io.BytesIO()
            torch.save(fn(rank, world_size, *args), buf)
            results.put((rank, True, buf.getvalue()))
        except BaseException:   # noqa: BLE001 - reported to the test, which raises it
            results.put((rank, False, traceback.format_exc()))
        finally:
            torch.set_default_dtype(torch.float32)
            torch.set_grad_enabled(True)
            torch.use_deterministic_algorithms(False)
    torch_dist.destroy_process_group()


class _Pool:
    """W spawned workers in one gloo group, each with its own job queue."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.jobs = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_serve, daemon=True,
                                  args=(r, world_size, port, self.jobs[r], self.results))
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable[..., Any], args: tuple, timeout_s: float) -> list[Any]:
        for q in self.jobs:
            q.put((fn, args))
        got: dict[int, Any] = {}
        while len(got) < self.world_size:
            try:
                rank, ok, payload = self.results.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"gloo workers still running after {timeout_s:.0f}s") from None
            if not ok:
                raise RuntimeError(f"rank {rank} of {self.world_size} raised:\n{payload}")
            got[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        return [got[r] for r in range(self.world_size)]

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


_POOLS: dict[int, _Pool] = {}
KEEP_WORLD_SIZES = (2, 3)
"""Only these world sizes' workers stay up between calls (the ones the tests use)."""


@atexit.register
def _close_all() -> None:
    for pool in _POOLS.values():
        for q in pool.jobs:
            q.put(None)
        for p in pool.procs:
            p.join(timeout=5)
        pool.close()
    _POOLS.clear()


def run_gloo(fn: Callable[..., Any], world_size: int, *args: Any,
             timeout_s: float = 60.0) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each rank in its own
    process. A rank's exception is re-raised here (``RuntimeError`` with its traceback); a call
    longer than ``timeout_s`` (worker start-up included) raises ``TimeoutError``."""
    pool = _POOLS.get(world_size)
    if pool is None or not all(p.is_alive() for p in pool.procs):
        if pool is not None:
            pool.close()
        pool = _POOLS[world_size] = _Pool(world_size)
    try:
        return pool.run(fn, args, timeout_s)
    except BaseException:
        pool.close()             # a rank may be stuck in a collective: start over next time
        del _POOLS[world_size]
        raise
    finally:
        if world_size not in KEEP_WORLD_SIZES and world_size in _POOLS:
            _POOLS.pop(world_size).close()
