"""A training worker's data in the exact epoch order (:mod:`vlmray.data.order`): one lane per
training source, read by a plan the worker builds itself (:class:`vlmray.pipelines.lanes.LaneFeed`),
and the cursor that a checkpoint records and a restart resumes from.

- Every worker holds the same :class:`~vlmray.data.order.Cursor` per source; it moves only its
  own lane's position, from the ``LANE_POS`` of the last row of each batch it trains on.
- An epoch ends for all workers together: before each step one all-reduced flag says whether
  every worker filled its batch; if one could not, every worker starts the next epoch's deal
  (the rows left in the other lanes are the epoch's tail).
- At a checkpoint the lanes' positions are all-gathered (one small collective), so rank 0
  writes the whole cursor; on restore with another world size the cursor is re-dealt
  (:meth:`~vlmray.data.order.Cursor.redeal`) and each row of the epoch is still read once.
- ``VLMRAY_ROW_LOG=1`` (tests, audits) makes each worker append the row ids of every step to
  ``<run>/rowlog/rank-<r>.jsonl``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from vlmray.data import schema
from vlmray.data.order import Cursor
from vlmray.data.sources import choose_source
from vlmray.distributed import Dist

ROW_LOG_ENV = "VLMRAY_ROW_LOG"


class Lane:
    """One source's lane on this worker: batches of ``local_bs`` rows in lane order; None
    once the lane cannot fill one more (the end of this worker's part of the epoch)."""

    def __init__(self, feed: Any, cursor: Cursor, rank: int, local_bs: int,
                 prefetch: int) -> None:
        self.feed, self.cursor, self.rank = feed, cursor, rank
        self.local_bs, self.prefetch = local_bs, prefetch
        self._it: Any = None

    def _open(self) -> Any:
        items = self.cursor.remaining(self.rank, self.feed.units)
        if not items:
            return iter(())
        ds = self.feed.lane_plan(items, epoch=self.cursor.epoch, seed=self.cursor.seed,
                                 lanes=self.cursor.world)
        return iter(ds.iter_torch_batches(batch_size=self.local_bs, drop_last=False,
                                          prefetch_batches=self.prefetch))

    def next(self) -> dict[str, torch.Tensor] | None:
        if self._it is None:
            self._it = self._open()
        batch = next(self._it, None)
        if batch is None or len(batch[schema.LANE_POS]) < self.local_bs:
            return None
        return batch

    def next_epoch(self) -> None:
        self.close()
        self.cursor = self.cursor.next_epoch()

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = None


class LaneStreams:
    """The worker's training data over lanes, with :class:`vlmray.train.loop.Streams`'s
    interface: ``next(step) -> (source, batch)`` and ``trained(source, progress)``.
    ``sizes`` (rows per source) turns on ZeroVL's per-step source choice."""

    def __init__(self, feeds: list[Any], cursors: list[Cursor], dist: Dist, *, local_bs: int,
                 prefetch: int, seed: int, sizes: list[int] | None = None,
                 row_log: str = "") -> None:
        self.dist, self.seed, self.sizes = dist, seed, sizes
        self.lanes = [Lane(f, c, dist.rank, local_bs, prefetch) for f, c in zip(feeds, cursors)]
        self.batches_in_epoch = [0] * len(feeds)
        self._last_pos = 0
        self._row_log = row_log

    def next(self, step: int) -> tuple[int, dict[str, torch.Tensor]]:
        """(source index, local batch) for optimiser step ``step`` (0-based)."""
        k = 0 if self.sizes is None else choose_source(self.seed, step, self.sizes)
        lane, fresh = self.lanes[k], False
        while True:
            batch = lane.next()
            missing = batch is None
            if self.dist.world_size > 1:
                missing = bool(self.dist.all_reduce_sum(float(missing)).item() > 0)
            if not missing:
                break
            if fresh:
                raise RuntimeError(f"a worker's lane of a whole epoch holds fewer rows than "
                                   f"one batch ({lane.local_bs}): lower train.batch_size or "
                                   f"data.unit_rows, or use fewer workers")
            lane.next_epoch()
            self.batches_in_epoch[k], fresh = 0, True
        assert batch is not None
        self._last_pos = int(batch.pop(schema.LANE_POS)[-1])
        row_ids = batch.pop(schema.ROW_ID)
        if self._row_log:
            self._log_rows(step, k, row_ids)
        return k, batch

    def trained(self, k: int, progress: Any) -> None:
        """Counts the batch of source k just trained on: its lane's position moves past it."""
        lane = self.lanes[k]
        lane.cursor.advance(self.dist.rank, self._last_pos)
        self.batches_in_epoch[k] += 1
        progress.epoch, progress.batch_in_epoch = lane.cursor.epoch, self.batches_in_epoch[k]

    def cursors(self) -> list[dict[str, Any]] | None:
        """Every source's whole cursor (all lanes' positions, gathered: a collective every
        worker calls), on rank 0; None elsewhere."""
        local = torch.tensor([list(lane.cursor.pos[self.dist.rank]) for lane in self.lanes],
                             dtype=torch.int64, device=self.dist.device)
        gathered = self.dist.all_gather(local, with_grad=False).view(
            self.dist.world_size, len(self.lanes), 2).cpu()
        if not self.dist.is_main:
            return None
        out = []
        for k, lane in enumerate(self.lanes):
            lane.cursor.pos = [(int(a), int(b)) for a, b in gathered[:, k].tolist()]
            out.append({**lane.cursor.to_dict(), "digest": lane.feed.digest,
                        "batches_in_epoch": self.batches_in_epoch[k]})
        return out

    def _log_rows(self, step: int, k: int, row_ids: torch.Tensor) -> None:
        os.makedirs(self._row_log, exist_ok=True)
        rec = {"step": step, "rank": self.dist.rank, "source": k,
               "epoch": self.lanes[k].cursor.epoch, "rows": row_ids.tolist()}
        with open(os.path.join(self._row_log, f"rank-{self.dist.rank}.jsonl"), "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()


def start_cursors(feeds: list[Any], saved: list[dict[str, Any]] | None, *, seed: int,
                  world: int, epoch: int = 0) -> tuple[list[Cursor], str]:
    """Each source's cursor: the checkpoint's (``saved``), re-dealt when the world size
    changed, or the start of ``epoch``. Returns (cursors, what happened: ``fresh``,
    ``resumed``, ``redealt W->W'``, ``inputs changed``). A cursor for other inputs (files,
    their row counts or ``data.unit_rows`` changed) cannot say which rows are left: that
    source restarts its epoch from the beginning, and the run says so."""
    if not saved:
        return [Cursor.start(seed=seed, epoch=epoch, world=world, n_units=len(f.units))
                for f in feeds], "fresh"
    if len(saved) != len(feeds):
        raise ValueError(f"the checkpoint records {len(saved)} data sources' cursors but this "
                         f"run has {len(feeds)}: resume with the same sources")
    cursors, how = [], "resumed"
    for f, d in zip(feeds, saved):
        if d.get("digest") != f.digest:
            print(f"[vlmray] the training inputs changed since the checkpoint (files, their row "
                  f"counts or data.unit_rows): epoch {d['epoch']} restarts from its beginning",
                  flush=True)
            cursors.append(Cursor.start(seed=seed, epoch=int(d["epoch"]), world=world,
                                        n_units=len(f.units)))
            how = "inputs changed"
            continue
        c = Cursor.from_dict(d)
        if c.world != world:
            how = f"redealt {c.world}->{world}"
            c = c.redeal(world, f.units)
        cursors.append(c)
    return cursors, how


__all__ = ["ROW_LOG_ENV", "Lane", "LaneStreams", "start_cursors"]
