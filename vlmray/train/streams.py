"""A worker's training data in Ray's order (``data.cache``, or several sources mixed in one
stream): Ray Train's dataset shards, read epoch after epoch; a restart skips the batches of
the epoch it already trained on (re-reading them; the exact, seeking path is
:mod:`vlmray.train.lanes`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from vlmray.config import Config
from vlmray.data.sources import choose_source
from vlmray.train.checkpoint import Progress, SourcePosition


def _batches(shard: Any, cfg: Config, local_bs: int, pos: Progress | SourcePosition,
             salt: int = 0) -> Iterator[dict]:
    """Endless epochs over this worker's shard, resuming at ``pos`` (its ``epoch`` and
    ``batch_in_epoch``; the caller counts each batch it trains on). ``salt`` (the source
    index) gives each source its own shuffle order."""
    while True:
        it = shard.iter_torch_batches(
            batch_size=local_bs, drop_last=True,
            prefetch_batches=cfg.data.placement.prefetch_batches,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.train.seed * 100_003 + pos.epoch + salt * 7_919)
        seen = 0
        for i, batch in enumerate(it):
            seen += 1
            if i < pos.batch_in_epoch:
                continue  # already trained on before the restart
            yield batch
        if seen == 0:
            raise RuntimeError(f"a worker's shard holds fewer rows than one batch ({local_bs})")
        pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0


def dataset_name(k: int) -> str:
    """The Ray Train dataset name of training source k (``train``, ``train_1``, ...)."""
    return "train" if k == 0 else f"train_{k}"


class Streams:
    """A worker's training data: one stream (``data.sampling="mixed"``), or one iterator per
    source with ZeroVL's per-step choice (``source_sizes`` given: ``"single_source"``).
    ``shards[k]`` is source k's data (anything with ``iter_torch_batches``: the worker's
    dataset shard); positions live in ``progress``, so a checkpoint resumes every stream."""

    def __init__(self, cfg: Config, local_bs: int, progress: Progress, shards: list[Any],
                 source_sizes: list[int] | None = None) -> None:
        self.seed, self.sizes = cfg.train.seed, source_sizes
        if source_sizes is None:
            self.positions: list[Progress | SourcePosition] = [progress]
        else:
            self.positions = list(progress.positions(len(source_sizes)))
        if len(shards) != len(self.positions):
            raise ValueError(f"{len(shards)} data shards for {len(self.positions)} sources")
        self.iters = [_batches(shard, cfg, local_bs, pos, salt=k)
                      for k, (shard, pos) in enumerate(zip(shards, self.positions))]

    def next(self, step: int) -> tuple[int, dict]:
        """(source index, local batch) for optimiser step ``step`` (0-based)."""
        k = 0 if self.sizes is None else choose_source(self.seed, step, self.sizes)
        return k, next(self.iters[k])

    def trained(self, k: int, progress: Progress) -> None:
        """Counts the batch of source k just trained on."""
        pos = self.positions[k]
        pos.batch_in_epoch += 1
        if pos is not progress:
            progress.epoch, progress.batch_in_epoch = pos.epoch, pos.batch_in_epoch


__all__ = ["Streams", "dataset_name"]
