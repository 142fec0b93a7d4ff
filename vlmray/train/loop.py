"""The per-worker training loop that Ray Train runs on every worker.

    batch -> model(batch) -> Outputs -> sum_i w_i * objective_i -> backward -> clip -> step
          -> ray.train.report(metrics, checkpoint)

The model is written for one device; ``ray.train.torch.prepare_model`` applies DDP from outside.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from vlmray.config import Config
from vlmray.distributed import Dist
from vlmray.train.checkpoint import Progress, load_checkpoint, save_checkpoint
from vlmray.train.history import History
from vlmray.train.state import TrainState, build_state


def _set_threads(cfg: Config) -> None:
    if torch.cuda.is_available():
        return
    n = cfg.train.torch_threads
    if n <= 0:
        local = max(1, ray.train.get_context().get_local_world_size())
        n = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(n)


def _batches(shard: Any, cfg: Config, local_bs: int, progress: Progress) -> Iterator[dict]:
    """Endless epochs over this worker's shard, resuming at ``progress``'s data position."""
    while True:
        it = shard.iter_torch_batches(
            batch_size=local_bs, drop_last=True, prefetch_batches=2,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.train.seed * 100_003 + progress.epoch)
        seen = 0
        for i, batch in enumerate(it):
            seen += 1
            if i < progress.batch_in_epoch:
                continue  # already trained on before the restart
            yield batch
        if seen == 0:
            raise RuntimeError(f"a worker's shard holds fewer rows than one batch ({local_bs})")
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0


def train_step(state: TrainState, batch: dict[str, torch.Tensor], dist: Dist) -> dict[str, float]:
    """One optimiser step; returns detached scalar metrics."""
    model, mix = state.model, state.mix
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if state.bf16 else nullcontext())
    with autocast:
        out = model(batch, mix.needs)
        result = mix(batch, out, dist)
    state.optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    metrics = dict(result.metrics)
    if state.grad_clip > 0:
        metrics["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), state.grad_clip).item()
    state.optimizer.step()
    state.scheduler.step()
    metrics.update(lr=state.scheduler.get_last_lr()[0],
                   logit_scale=state.core.logit_scale.item())
    return metrics


def _checkpoint_and_report(state: TrainState, metrics: dict, cfg_dict: dict, dist: Dist) -> None:
    if not dist.is_main:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model=state.core, optimizer=state.optimizer,
                        scheduler=state.scheduler, progress=state.progress, config=cfg_dict)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(state: TrainState, resume_from: str | None) -> None:
    """Restores from this run's last reported checkpoint (after a worker failure), else from the
    checkpoint directory a ``--resume`` named, else starts fresh."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and resume_from:
        ckpt = ray.train.Checkpoint.from_directory(resume_from)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state.progress = load_checkpoint(d, model=state.core, optimizer=state.optimizer,
                                             scheduler=state.scheduler)


def train_fn_per_worker(config: dict) -> None:
    """Entry point given to ``TorchTrainer``: ``config = {"cfg": Config dict, "run_dir": str}``."""
    cfg = Config.from_dict(config["cfg"])
    _set_threads(cfg)
    device = ray.train.torch.get_device()
    dist = Dist.from_env(device=device)
    state = build_state(cfg, device=device, wrap=ray.train.torch.prepare_model)
    _restore(state, config.get("resume_from"))
    history = History(config["run_dir"], enabled=dist.is_main, resume_step=state.progress.step)
    evaluator = state.evaluator(config["eval_uri"]) if dist.is_main else None
    shard = ray.train.get_dataset_shard("train")
    local_bs = cfg.train.batch_size // dist.world_size
    t_last, wait, steps_in_window = time.perf_counter(), 0.0, 0
    t_fetch = time.perf_counter()
    for batch in _batches(shard, cfg, local_bs, state.progress):
        wait += time.perf_counter() - t_fetch
        metrics = train_step(state, batch, dist)
        p = state.progress
        p.step, p.batch_in_epoch, p.samples_seen = p.step + 1, p.batch_in_epoch + 1, p.samples_seen + cfg.train.batch_size
        steps_in_window += 1
        done = p.step >= cfg.train.steps
        ckpt_due = done or (cfg.train.checkpoint_every and p.step % cfg.train.checkpoint_every == 0)
        eval_due = done or (cfg.eval.every and p.step % cfg.eval.every == 0)
        if p.step % cfg.train.log_every == 0 or ckpt_due or eval_due:
            elapsed = time.perf_counter() - t_last
            metrics.update(step=p.step, epoch=p.epoch, samples_seen=p.samples_seen,
                           samples_per_s=steps_in_window * cfg.train.batch_size / elapsed,
                           data_wait_frac=wait / elapsed, temperature=1.0 / metrics["logit_scale"])
            if evaluator is not None and eval_due:
                metrics.update(evaluator(state.core))
            history.log(metrics)
            if ckpt_due:
                _checkpoint_and_report(state, metrics, config["cfg"], dist)
            else:
                ray.train.report(metrics)
            t_last, wait, steps_in_window = time.perf_counter(), 0.0, 0
        if done:
            break
        t_fetch = time.perf_counter()


__all__ = ["train_fn_per_worker", "train_step"]
