"""Building the Ray Train ``TorchTrainer`` for a Config: scaling from the cluster, storage,
failure handling, and the resume point."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from vlmray.config import Config, ConfigError, TrainConfig
from vlmray.train.lanes import ROW_LOG_ENV
from vlmray.train.loop import FAULT_AT_STEP_ENV, dataset_name, train_fn_per_worker


def scaling_for(cfg: TrainConfig,
                cluster: dict[str, float] | None = None) -> ray.train.ScalingConfig:
    """One worker per GPU when the cluster has GPUs (NCCL, bf16), else CPU workers (gloo) that
    reserve fractional CPUs so Ray Data keeps cores to read and decode with."""
    cluster = ray.cluster_resources() if cluster is None else cluster
    gpus = int(cluster.get("GPU", 0))
    if cfg.device == "gpu" and gpus == 0:
        raise ConfigError("train.device='gpu' but the Ray cluster has no GPUs")
    use_gpu = cfg.device == "gpu" or (cfg.device == "auto" and gpus > 0)
    workers = cfg.num_workers or (gpus if use_gpu else 1)
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker, **cfg.worker_resources}
    if use_gpu:
        resources["GPU"] = 1
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                   resources_per_worker=resources)


def build_trainer(cfg: Config, datasets: dict[str, Any], *, run_dir: str, eval_uri: str,
                  resume_from: str | None = None, launch: str = "",
                  eval_refs: str = "", source_sizes: list[int] | None = None,
                  feeds: list[Any] | None = None) -> TorchTrainer:
    """The run's ``TorchTrainer``: ``resume_from`` is a checkpoint directory (path or URI) to
    start from when Ray Train has none of its own; ``launch`` tags this driver run's events.
    ``source_sizes`` (rows per training source, datasets named by
    :func:`vlmray.train.loop.dataset_name`) turns on single-source sampling: each step's
    global batch comes from one source, drawn with probability proportional to its size.
    ``feeds`` (one :class:`vlmray.pipelines.lanes.LaneFeed` per source) replace ``datasets``:
    every worker then reads its own lane in the exact epoch order."""
    if source_sizes is not None and feeds is not None:
        if len(feeds) != len(source_sizes) or len(feeds) < 2:
            raise ConfigError(f"single-source sampling needs >= 2 sources and a feed for "
                              f"each; sizes {source_sizes}, {len(feeds)} feeds")
    elif source_sizes is not None:
        missing = [dataset_name(k) for k in range(len(source_sizes))
                   if dataset_name(k) not in datasets]
        if len(source_sizes) < 2 or missing:
            raise ConfigError(f"single-source sampling needs >= 2 sources and a dataset for "
                              f"each; sizes {source_sizes}, missing datasets {missing}")
    scaling = scaling_for(cfg.train)
    if not cfg.train.num_workers and cfg.train.batch_size % scaling.num_workers:
        # num_workers=0 is resolved here (one per GPU); an explicit count was checked by validate
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by "
                          f"{scaling.num_workers} workers")
    run_config = ray.train.RunConfig(
        name="train", storage_path=str(Path(run_dir).resolve() / "ray") if "://" not in run_dir
        else f"{run_dir}/ray",
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        # Ray Train's patched print writes each worker line twice (stdout and its logger).
        # Test and audit hooks set in the driver's environment reach the workers.
        worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **{
            k: os.environ[k] for k in (FAULT_AT_STEP_ENV, ROW_LOG_ENV) if k in os.environ}}},
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
    )
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": run_dir, "eval_uri": eval_uri,
                           "resume_from": resume_from, "launch": launch,
                           "eval_refs": eval_refs, "source_sizes": source_sizes,
                           "feeds": feeds},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=scaling, run_config=run_config, datasets=datasets,
    )


__all__ = ["build_trainer", "scaling_for"]
