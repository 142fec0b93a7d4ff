"""Device check: one short torchrun script for a GPU session (no Ray, no FAISS needed).

    torchrun --standalone --nproc_per_node 8 benchmarks/device_check.py      # GPUs: NCCL, bf16
    torchrun --standalone --nproc_per_node 2 benchmarks/device_check.py      # CPU: gloo, fp32

Three parts, rank 0 prints ONE JSON line:

- ``exact``: for each gathered objective (clip local, siglip ring and gather, filip, unicl,
  declip_nns index, declip_mv, pyramidclip, nlip after a GMM refit) the W-worker loss (mean of the local losses) and the worker-averaged
  input gradients (what DDP's average gives parameters) against one process computing the same
  objective on the whole global batch, in float32 with TF32 off: max absolute differences.
- ``step``: the recipe's real model wrapped in DDP, ``--steps`` optimiser steps on random
  batches (bf16 autocast on GPU), samples/s over all workers after one warm-up step, the last
  loss, and peak memory per worker (``torch.cuda.max_memory_allocated``, or the process's
  peak RSS on CPU).
- ``gather``: median time of ``Dist.all_gather`` (with grad, forward only) of a (B, D) tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmray.config.objectives import ObjectiveSpec
from vlmray.data import schema  # noqa: E402
from vlmray.distributed import Dist  # noqa: E402
from vlmray.models.outputs import (  # noqa: E402
    IMAGE_VIEW_EMBEDS,
    NN_TEXT_EMBEDS,
    TEXT_VIEW_EMBEDS,
    Outputs,
)
from vlmray.objectives import build_objective  # noqa: E402
from vlmray.recipes import recipe  # noqa: E402
from vlmray.train.loop import train_step  # noqa: E402
from vlmray.train.state import build_state  # noqa: E402

OBJECTIVES = [("clip", {}), ("siglip", {"exchange": "ring"}), ("siglip", {"exchange": "gather"}),
              ("filip", {}), ("unicl", {}), ("declip_nns", {"source": "index"}),
              ("declip_mv", {}), ("pyramidclip", {"attribute_view": 1}),
              ("nlip", {"start_step": 0, "refit_every": 1, "buffer_size": 64})]


def global_inputs(n: int, dim: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The same leaves on every rank (seeded): embeddings, tokens, scale, bias, labels."""
    g = torch.Generator().manual_seed(0)
    leaves = {"image": torch.randn(n, dim, generator=g), "text": torch.randn(n, dim, generator=g),
              "nn_text": torch.randn(n, dim, generator=g),
              "image_views": torch.randn(n, 1, dim, generator=g),
              "text_views": torch.randn(n, 2, dim, generator=g),
              "image_tokens": torch.randn(n, 5, dim, generator=g),
              "text_tokens": torch.randn(n, 4, dim, generator=g),
              "log_scale": torch.tensor(2.0), "bias": torch.tensor(-2.0)}
    leaves = {k: v.to(device).requires_grad_() for k, v in leaves.items()}
    leaves["text_mask"] = (torch.arange(4).expand(n, 4) < torch.randint(1, 5, (n, 1),
                                                                         generator=g)).long()
    leaves["labels"] = torch.randint(0, max(2, n // 3), (n,), generator=g)
    return {k: v.to(device) if not v.requires_grad else v for k, v in leaves.items()}


def loss_on(rows: slice, x: dict[str, torch.Tensor], name: str, params: dict,
            dist: Dist) -> torch.Tensor:
    """The objective's loss on ``rows`` of the global inputs (this rank's, or all of them)."""
    out = Outputs(image_embeds=F.normalize(x["image"][rows], dim=-1),
                  text_embeds=F.normalize(x["text"][rows], dim=-1),
                  image_tokens=x["image_tokens"][rows], text_tokens=x["text_tokens"][rows],
                  text_mask=x["text_mask"][rows], logit_scale=x["log_scale"].exp(),
                  logit_bias=x["bias"])
    out.extra[NN_TEXT_EMBEDS] = F.normalize(x["nn_text"][rows], dim=-1)
    out.extra[IMAGE_VIEW_EMBEDS] = F.normalize(x["image_views"][rows], dim=-1)
    out.extra[TEXT_VIEW_EMBEDS] = F.normalize(x["text_views"][rows], dim=-1)
    batch = {schema.LABEL: x["labels"][rows]}
    return build_objective(ObjectiveSpec(name=name, params=params)).to(x["image"].device)(
        batch, out, dist).loss


def check_exact(dist: Dist, local_batch: int, dim: int) -> list[dict]:
    results = []
    n = local_batch * dist.world_size
    mine = slice(dist.rank * local_batch, (dist.rank + 1) * local_batch)
    for name, params in OBJECTIVES:
        x = global_inputs(n, dim, dist.device)
        leaves = [v for v in x.values() if v.requires_grad]
        local = loss_on(mine, x, name, params, dist)
        grads = torch.autograd.grad(local, leaves, allow_unused=True)
        grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves)]
        mean_loss = local.detach().clone()
        torch_dist.all_reduce(mean_loss)
        for g in grads:
            torch_dist.all_reduce(g)
        y = global_inputs(n, dim, dist.device)
        one = loss_on(slice(None), y, name, params, Dist(device=dist.device))
        ref = torch.autograd.grad(one, [v for v in y.values() if v.requires_grad],
                                  allow_unused=True)
        diffs = [(g / dist.world_size - (r if r is not None else 0)).abs().max().item()
                 for g, r in zip(grads, ref)]
        results.append({"objective": name, **params,
                        "loss_diff": abs(mean_loss.item() / dist.world_size - one.item()),
                        "grad_max_diff": max(diffs)})
    return results


def random_batch(cfg, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    s, length = cfg.data.image_size, cfg.data.context_length
    mask = (torch.arange(length).expand(batch, length) < torch.randint(3, length, (batch, 1)))
    return {schema.PIXELS: torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8),
            schema.TOKENS: torch.randint(1, cfg.data.vocab_size, (batch, length)) * mask,
            schema.TOKEN_MASK: mask.long(), schema.LABEL: torch.randint(0, 20, (batch,))}


def check_step(dist: Dist, name: str, batch: int, steps: int) -> dict:
    cfg = recipe(name, **{"train.steps": str(steps + 10), "train.device": "auto"})

    def ddp(model: torch.nn.Module) -> torch.nn.Module:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    state = build_state(cfg, device=dist.device, wrap=ddp)
    batches = [{k: v.to(dist.device) for k, v in random_batch(cfg, batch, dist.device).items()}
               for _ in range(2)]
    train_step(state, batches[0], dist)                              # warm-up
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        metrics = train_step(state, batches[i % 2], dist)
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    elapsed = time.perf_counter() - t0
    return {"recipe": name, "bf16": state.bf16, "local_batch": batch, "steps": steps,
            "samples_per_s": round(steps * batch * dist.world_size / elapsed, 1),
            "last_loss": metrics["loss"], "finite": bool(torch.isfinite(
                torch.tensor(metrics["loss"]))), "peak_mb_rank0": round(peak, 1)}


def check_gather(dist: Dist, batch: int, dim: int, repeats: int = 10) -> dict:
    x = torch.randn(batch, dim, device=dist.device, requires_grad=True)
    times = []
    for _ in range(repeats):
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.all_gather(x)
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"local_batch": batch, "dim": dim, "median_ms": round(statistics.median(times) * 1e3, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="clip_tiny,siglip_tiny")
    p.add_argument("--batch", type=int, default=0, help="local batch; 0 = 256 on GPU, 16 on CPU")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch_dist.init_process_group("nccl" if cuda else "gloo")
    dist = Dist.from_env(device=device)
    batch = args.batch or (256 if cuda else 16)
    torch.manual_seed(dist.rank)
    report = {"bench": "device_check", "world_size": dist.world_size,
              "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "backend": torch_dist.get_backend(), "torch": torch.__version__,
              "exact": check_exact(dist, local_batch=8, dim=32),
              "step": [check_step(dist, r, batch, args.steps) for r in args.recipes.split(",")],
              "gather": check_gather(dist, batch, 512)}
    if dist.is_main:
        print(json.dumps(report), flush=True)
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
