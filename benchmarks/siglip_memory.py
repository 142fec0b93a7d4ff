"""Peak memory and time of one SigLIP loss step: ring exchange vs all-gather, CLIP as baseline.

    python benchmarks/siglip_memory.py --batches 256 1024 4096 --dim 256

Two gloo workers (``torch.multiprocessing`` spawn, no Ray, CPU, one thread each). Per local
batch B and method, each worker holds float32 leaves image, text (B, D), scale and bias and
runs forward + backward of the loss:

- ``ring``: ``siglip`` with ``exchange="ring"`` (B x B blocks, W-1 neighbour exchanges);
- ``ring_chunk``: the same with ``chunk=256`` (256 x B row chunks);
- ``gather``: ``siglip`` with ``exchange="gather"`` (B x N logits);
- ``clip``: ``clip`` with ``gather="local"`` (B x N logits both ways, plain autograd).

Memory is measured, not computed: one step runs under ``torch.profiler.profile(
profile_memory=True)``, whose ``[memory]`` events record every allocation (+bytes) and free
(-bytes) made by torch's CPU allocator with a timestamp; the peak is the maximum of their
running sum, i.e. the most bytes of tensors alive at once during the step beyond what existed
before it (the inputs). Reported as MiB on rank 0 (ranks are symmetric). Time is the median
wall time of ``--repeats`` unprofiled steps after one warm-up, in ms. Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

METHODS = {
    "ring": ("siglip", {"exchange": "ring"}),
    "ring_chunk": ("siglip", {"exchange": "ring", "chunk": 256}),
    "gather": ("siglip", {"exchange": "gather"}),
    "clip": ("clip", {"gather": "local"}),
}


def _step(loss_fn: Any, leaves: list[torch.Tensor], dist: Any) -> None:
    from vlmray.models.outputs import Outputs

    image, text, log_t, bias = leaves
    out = Outputs(image_embeds=image, text_embeds=text, logit_scale=log_t.exp(), logit_bias=bias)
    loss_fn({}, out, dist).loss.backward()
    for leaf in leaves:
        leaf.grad = None


def _peak_bytes(fn: Callable[[], None]) -> int:
    """Max over time of the running sum of allocator events while ``fn()`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def _measure(batch: int, dim: int, method: str, repeats: int, rank: int) -> tuple[float, float]:
    import vlmray.objectives.contrastive.siglip  # noqa: F401
    from vlmray.config.objectives import ObjectiveSpec
    from vlmray.distributed import Dist
    from vlmray.objectives import build_objective

    name, params = METHODS[method]
    loss_fn = build_objective(ObjectiveSpec(name=name, params=params))
    dist = Dist.from_env()
    dist = Dist(rank=dist.rank, world_size=dist.world_size, check_sizes=False)
    g = torch.Generator().manual_seed(rank)
    leaves = [F.normalize(torch.randn(batch, dim, generator=g), dim=-1) for _ in range(2)]
    leaves += [torch.tensor(2.3), torch.tensor(-10.0)]
    leaves = [v.requires_grad_() for v in leaves]
    _step(loss_fn, leaves, dist)  # warm-up
    times = []
    for _ in range(repeats):
        torch_dist.barrier()
        start = time.perf_counter()
        _step(loss_fn, leaves, dist)
        times.append(time.perf_counter() - start)
    torch_dist.barrier()
    peak = _peak_bytes(lambda: _step(loss_fn, leaves, dist))
    return peak / 2**20, statistics.median(times) * 1e3


def _worker(rank: int, world: int, port: int, out_dir: str, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world,
                                  timeout=timedelta(seconds=600))
    rows = []
    for batch in args.batches:
        row = {"local_batch": batch, "global_batch": batch * world}
        for method in METHODS:
            peak, ms = _measure(batch, args.dim, method, args.repeats, rank)
            row[f"{method}_peak_mb"], row[f"{method}_ms"] = round(peak, 1), round(ms, 1)
        row["logits_block_mb"] = round(batch * batch * 4 / 2**20, 1)  # one B x B fp32, for scale
        rows.append(row)
    torch.save(rows, os.path.join(out_dir, f"{rank}.pt"))
    torch_dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(args.world_size, port, out_dir, args),
                           nprocs=args.world_size, join=True, start_method="spawn")
        rows = torch.load(os.path.join(out_dir, "0.pt"))
    print(json.dumps({"bench": "siglip_memory", "world_size": args.world_size, "dim": args.dim,
                      "dtype": "float32", "device": "cpu", "results": rows}))


if __name__ == "__main__":
    main()
