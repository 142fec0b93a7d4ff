"""The per-worker training loop that Ray Train runs on every worker.

    batch -> model(batch) -> Outputs -> sum_i w_i * objective_i -> backward -> clip
          -> [finite on every worker?] -> step -> ray.train.report(metrics, checkpoint)

The model is written for one device; ``ray.train.torch.prepare_model`` applies DDP from outside.

A step whose loss or gradient norm is not finite on any worker applies no update (one
all-reduced flag, read once per step) and is counted in ``skipped_steps``;
``train.max_bad_steps`` of them in a row stop the run with :class:`NonFiniteError`, and a
checkpoint is never written from weights that are not finite.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from vlmray.config import Config
from vlmray.distributed import Dist
from vlmray.objectives.base import Metric, host_metrics
from vlmray.train import rng
from vlmray.train.checkpoint import save_checkpoint
from vlmray.train.history import History, log_event, read_events
from vlmray.train.lanes import ROW_LOG_ENV, LaneStreams, start_cursors
from vlmray.train.restore import restore
from vlmray.train.state import TrainState, build_state
from vlmray.train.streams import Streams, dataset_name

FAULT_AT_STEP_ENV = "VLMRAY_FAULT_AT_STEP"
"""Test-only: the step after which rank 0 kills its own process once (see _maybe_inject_fault)."""


class NonFiniteError(RuntimeError):
    """Training cannot go on: too many steps in a row had a non-finite loss or gradient, or
    the weights themselves are not finite (no checkpoint is written from them)."""


def _set_threads(cfg: Config) -> None:
    if torch.cuda.is_available():
        return
    n = cfg.train.torch_threads
    if n <= 0:
        local = max(1, ray.train.get_context().get_local_world_size())
        n = max(1, len(os.sched_getaffinity(0)) // local)  # cores this process may use
    torch.set_num_threads(n)


def average_objective_grads(mix: nn.Module, dist: Dist) -> None:
    """Averages the gradients of the objectives' own parameters (heads, predictors) over the
    workers, as DDP does for the model's: one all-reduce of their flattened gradients. Frozen
    parameters (an EMA teacher) are skipped; a parameter without a gradient counts as zero."""
    params = [p for p in mix.parameters() if p.requires_grad]
    if dist.world_size == 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    flat = dist.all_reduce_sum(flat) / dist.world_size
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).to(p.dtype)


def grad_norm(params: Iterable[nn.Parameter], clip: float) -> torch.Tensor:
    """The global gradient norm of ``params`` (a detached 0-d tensor on their device), after
    clipping the gradients to ``clip`` when it is > 0."""
    params = [p for p in params if p.grad is not None]
    if clip > 0:
        return nn.utils.clip_grad_norm_(params, clip).detach()
    if not params:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) for p in params]))


def all_finite(loss: torch.Tensor, norm: torch.Tensor, dist: Dist) -> bool:
    """Whether the step's loss and gradient norm are finite on every worker: one 0-d flag,
    summed over the workers (a gradient all-reduced by DDP is the same everywhere, but each
    worker's loss is its own)."""
    bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(norm.to(loss.device))).float()
    # The step's one host read: applying the update or not is a Python branch around
    # optimizer.step(), so the flag must be on the host before it (a skipped update must not
    # touch AdamW's moments or apply weight decay, which an on-device mask of the gradient
    # would do).
    return dist.all_reduce_sum(bad).item() == 0


def train_step(state: TrainState, batch: dict[str, torch.Tensor], dist: Dist, *,
               host: bool = True) -> dict[str, Metric]:
    """One optimiser step; returns its scalar metrics: Python numbers (one host sync for all of
    them), or with ``host=False`` detached 0-d tensors still on the device (no host sync; the
    training loop reads them with ``host_metrics`` on logging steps only). ``skipped`` (an int,
    1 or 0) says whether the update was skipped because the loss or gradient was not finite on
    some worker (:func:`all_finite`); the learning-rate schedule advances either way."""
    model, mix = state.model, state.mix
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if state.bf16 else nullcontext())
    batch = mix.prepare(batch)
    with autocast:
        out = model(batch, mix.needs)
        result = mix(batch, out, dist)
    state.optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    average_objective_grads(mix, dist)
    metrics = dict(result.metrics)
    metrics["grad_norm"] = grad_norm(itertools.chain(model.parameters(), mix.parameters()),
                                     state.grad_clip)
    finite = all_finite(result.loss, metrics["grad_norm"], dist)
    if finite:
        state.optimizer.step()
        state.scheduler.step()
    else:
        with warnings.catch_warnings():  # torch warns of a scheduler step with no optimizer step
            warnings.simplefilter("ignore", UserWarning)
            state.scheduler.step()
    metrics.update(lr=state.scheduler.get_last_lr()[0], skipped=int(not finite),
                   logit_scale=state.core.logit_scale.detach())  # a new tensor (exp of the log)
    return host_metrics(metrics) if host else metrics


@dataclass
class BadSteps:
    """Counts skipped steps (``train_step``'s ``skipped``): ``skipped`` in all, ``streak`` in a
    row. Every worker counts the same (the flag is all-reduced), so all raise together."""

    limit: int
    skipped: int = 0
    streak: int = 0

    def count(self, skipped: bool, step: int, *, verbose: bool) -> None:
        """Counts step ``step``; raises :class:`NonFiniteError` at ``limit`` in a row."""
        if not skipped:
            self.streak = 0
            return
        self.skipped, self.streak = self.skipped + 1, self.streak + 1
        if verbose:
            print(f"[vlmray] step {step}: non-finite loss or gradient, update skipped "
                  f"({self.streak} in a row, {self.skipped} in all)", flush=True)
        if self.streak >= self.limit:
            raise NonFiniteError(
                f"{self.streak} steps in a row (up to step {step}) had a non-finite loss or "
                f"gradient on some worker, and their updates were skipped "
                f"(train.max_bad_steps={self.limit}): the run diverged. Lower train.lr, "
                f"lengthen train.warmup_steps or set train.grad_clip, and resume from the "
                f"last checkpoint")


def check_finite_weights(state: TrainState, step: int) -> None:
    """Raises :class:`NonFiniteError` when a weight or buffer of the model or the objectives
    is not finite, so no checkpoint is ever written from them (one host read)."""
    tensors = [t for t in itertools.chain(state.core.state_dict().values(),
                                          state.mix.state_dict().values())
               if t.is_floating_point()]
    if not tensors or torch.stack([torch.isfinite(t).all() for t in tensors]).all().item():
        return
    raise NonFiniteError(f"step {step}: the weights are not finite; no checkpoint is written "
                         f"from them (the last good checkpoint stays the latest)")


def _checkpoint_and_report(state: TrainState, metrics: dict, cfg_dict: dict, dist: Dist,
                           extra: Callable[[], dict[str, Any] | None] | None = None) -> None:
    """Checks the weights, then rank 0 writes the checkpoint and every worker reports.
    ``extra`` (every worker calls it: it may hold collectives) gives rank 0 what the
    checkpoint holds beside the weights: the data cursor, RNG states, ingest tallies."""
    check_finite_weights(state, state.progress.step)   # every worker: they stop together
    more = extra() if extra is not None else None
    if not dist.is_main:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model=state.core, optimizer=state.optimizer,
                        scheduler=state.scheduler, progress=state.progress, config=cfg_dict,
                        objectives=state.mix, extra=more)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _maybe_inject_fault(step: int, run_dir: str, dist: Dist) -> None:
    """Test-only fault injection. With ``VLMRAY_FAULT_AT_STEP=N`` in the workers' environment,
    rank 0 dies abruptly (``os._exit(1)``, like a crashed or OOM-killed worker) right after
    logging and reporting step N (a logged step), once per run directory: it first logs a
    ``"fault"`` event to ``events.jsonl``, and a later attempt that finds one trains on.
    Unset: does nothing."""
    at = os.environ.get(FAULT_AT_STEP_ENV, "")
    if not at or step != int(at) or not dist.is_main:
        return
    if any(e["event"] == "fault" for e in read_events(run_dir)):
        return
    log_event(run_dir, "fault", step=step)
    os._exit(1)


def train_fn_per_worker(config: dict) -> None:
    """Entry point given to ``TorchTrainer``: ``config = {"cfg": Config dict, "run_dir": str,
    "eval_uri": str, "resume_from": str | None, "launch": str, "eval_refs": str,
    "source_sizes": list[int] | None, "feeds": list[LaneFeed] | None}`` (``launch`` tags this
    driver run's ``"start"`` events; ``eval_refs`` is RA-CLIP's held-out references;
    ``source_sizes``, the rows of each training source, turns on single-source sampling;
    ``feeds``, one per source, make each worker read its lane in the exact epoch order
    (:mod:`vlmray.train.lanes`), else it reads Ray Train's dataset shards ``train``,
    ``train_1``, ...). A restored run also restores every worker's RNG state, and with lanes
    the data cursor and the ingest tallies."""
    cfg = Config.from_dict(config["cfg"])
    _set_threads(cfg)
    device = ray.train.torch.get_device()
    dist = Dist.from_env(device=device)
    state = build_state(cfg, device=device, wrap=ray.train.torch.prepare_model)
    saved: dict[str, Any] = {}
    source = restore(state, config.get("resume_from"), config["run_dir"], extra=saved)
    rng_how = "seeded" if source == "fresh" else rng.restore_for_rank(
        saved.get("rng"), rank=dist.rank, world_size=dist.world_size, seed=cfg.train.seed,
        step=state.progress.step)
    streams, data_how = _streams(cfg, config, state, dist, saved)
    if dist.is_main:
        log_event(config["run_dir"], "start", step=state.progress.step, source=source,
                  launch=config.get("launch", ""), rng=rng_how, data=data_how)
    history = History(config["run_dir"], enabled=dist.is_main, resume_step=state.progress.step)
    if state.progress.step >= cfg.train.steps:
        return  # restored from a checkpoint that already reached train.steps
    evaluator = (state.evaluator(config["eval_uri"], config.get("eval_refs", ""))
                 if dist.is_main else None)
    try:
        run_steps(state, streams, config, evaluator, history, dist)
    finally:
        if isinstance(streams, LaneStreams):
            streams.close()


def _streams(cfg: Config, config: dict, state: TrainState, dist: Dist,
             saved: dict[str, Any]) -> tuple[Streams | LaneStreams, str]:
    """The worker's training data, and how it starts: lanes from the checkpoint's cursor
    (``resumed``, ``redealt W->W'``) or from the start (``fresh``); or Ray Train's shards
    (``ray order``: a restart skips the epoch's batches so far)."""
    local_bs = cfg.train.batch_size // dist.world_size
    sizes = config.get("source_sizes")
    feeds = config.get("feeds")
    if not feeds:
        shards = [ray.train.get_dataset_shard(dataset_name(k)) for k in range(len(sizes or [0]))]
        return Streams(cfg, local_bs, state.progress, shards, sizes), "ray order"
    cursors, how = start_cursors(feeds, saved.get("data"), seed=cfg.train.seed,
                                 world=dist.world_size, epoch=state.progress.epoch)
    if dist.is_main and saved.get("tally"):   # rows counted before the checkpoint stay counted
        ray.get([f.tally.restore.remote(t) for f, t in zip(feeds, saved["tally"])])
    dist.barrier()                            # no lane reads before the tally is restored
    row_log = os.path.join(config["run_dir"], "rowlog") if os.environ.get(ROW_LOG_ENV) else ""
    streams = LaneStreams(feeds, cursors, dist, local_bs=local_bs,
                          prefetch=cfg.data.placement.prefetch_batches, seed=cfg.train.seed,
                          sizes=sizes, row_log=row_log)
    for k, d in enumerate(saved.get("data") or []):
        if how == "resumed":
            streams.batches_in_epoch[k] = int(d.get("batches_in_epoch", 0))
    return streams, how


def _extra(streams: Streams | LaneStreams, dist: Dist) -> dict[str, Any] | None:
    """What a checkpoint holds beside the weights (collectives: every worker calls it):
    every worker's RNG state and, with lanes, the data cursors and the ingest tallies (taken
    after the cursors, so every row before a cursor is in its tally)."""
    cursors = streams.cursors() if isinstance(streams, LaneStreams) else None
    states = rng.gather(dist)
    if not dist.is_main:
        return None
    out: dict[str, Any] = {"rng": states}
    if cursors is not None:
        out["data"] = cursors
        out["tally"] = ray.get([lane.feed.tally.snapshot.remote()
                                for lane in streams.lanes])
    return out


def run_steps(state: TrainState, streams: Streams | LaneStreams, config: dict, evaluator: Any,
              history: History, dist: Dist) -> None:
    """Trains from ``state.progress.step`` to ``train.steps``: fetch, step, count a skipped
    update (:class:`BadSteps`, which raises after ``train.max_bad_steps`` in a row, logging
    that step first), then log / evaluate / checkpoint / report when due (``_log_step``)."""
    cfg, p = state.cfg, state.progress
    window = {"t_last": time.perf_counter(), "wait": 0.0, "steps": 0}
    bad = BadSteps(cfg.train.max_bad_steps, skipped=history.last("skipped_steps", 0))
    while True:
        t_fetch = time.perf_counter()
        k, batch = streams.next(p.step)
        window["wait"] += time.perf_counter() - t_fetch
        metrics = train_step(state, batch, dist, host=False)  # device tensors: no host sync
        streams.trained(k, p)
        p.step, p.samples_seen = p.step + 1, p.samples_seen + cfg.train.batch_size
        if streams.sizes is not None:
            metrics["source_index"] = k
        window["steps"] += 1
        try:
            bad.count(bool(metrics.pop("skipped")), p.step, verbose=dist.is_main)
        except NonFiniteError:
            history.log({**host_metrics(metrics), "step": p.step, "epoch": p.epoch,
                         "samples_seen": p.samples_seen, "skipped_steps": bad.skipped})
            raise
        metrics["skipped_steps"] = bad.skipped
        done = p.step >= cfg.train.steps
        _log_step(state, metrics, window, config, evaluator, history, dist, done=done,
                  extra=lambda: _extra(streams, dist))
        if done:
            break


def _log_step(state: TrainState, metrics: dict, window: dict, config: dict, evaluator: Any,
              history: History, dist: Dist, *, done: bool,
              extra: Callable[[], dict[str, Any] | None] | None = None) -> None:
    """Logs, evaluates, checkpoints and reports the step just taken when one of them is due;
    ``window`` holds the time, data wait and steps since the last logged step; ``extra``
    gives what a checkpoint holds beside the weights (:func:`_extra`)."""
    cfg, p = state.cfg, state.progress
    ckpt_due = done or (cfg.train.checkpoint_every and p.step % cfg.train.checkpoint_every == 0)
    eval_due = done or (cfg.eval.every and p.step % cfg.eval.every == 0)
    if not (p.step % cfg.train.log_every == 0 or ckpt_due or eval_due):
        return
    metrics = host_metrics(metrics)  # the step's one host sync, for all its scalars
    elapsed = time.perf_counter() - window["t_last"]
    metrics.update(step=p.step, epoch=p.epoch, samples_seen=p.samples_seen,
                   samples_per_s=window["steps"] * cfg.train.batch_size / elapsed,
                   data_wait_frac=window["wait"] / elapsed,
                   temperature=1.0 / metrics["logit_scale"] if metrics["logit_scale"] else math.inf)
    if evaluator is not None and eval_due:
        metrics.update(evaluator(state.core))
    history.log(metrics)
    if ckpt_due:
        _checkpoint_and_report(state, metrics, config["cfg"], dist, extra)
    else:
        ray.train.report(metrics)
    _maybe_inject_fault(p.step, config["run_dir"], dist)
    window.update(t_last=time.perf_counter(), wait=0.0, steps=0)


__all__ = ["FAULT_AT_STEP_ENV", "BadSteps", "NonFiniteError", "Streams", "all_finite",
           "check_finite_weights", "dataset_name", "grad_norm", "run_steps",
           "train_fn_per_worker", "train_step"]
