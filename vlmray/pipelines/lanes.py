"""The training feed as per-worker lanes: the driver plans once (inputs listed and indexed, a URL
list downloaded, curation's whole-dataset decisions made), and every training worker builds the
lazy plan of its own lane (:mod:`vlmray.data.order`) for each epoch:

    read the lane's items (in order, from the cursor) -> [curation stages and decisions]
      -> [rewrite] -> [retrieval] -> decode -> split (count once, write rejects) -> [views, mixup]

Ray Data runs each plan with ``preserve_order``, so the rows a worker trains on at a step are
fixed by (seed, epoch, world size, inputs) and by where its lane stood, never by which task
finished first. Rows are counted once across restarts: the tally actor's record is saved in
every checkpoint and restored with it.

    feed = plan_feed(cfg.data, "s3://bucket/ds/train", rejects_uri="runs/x/rejects",
                     cache_root="runs/x/curation")                 # driver, once
    ds = feed.lane_plan(cursor.remaining(rank, feed.units), epoch=cursor.epoch, seed=seed)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from vlmray.config.data import DEFAULT_BLOCK_BYTES, PlacementConfig
from vlmray.config.inputs import ReadConfig
from vlmray.data import schema
from vlmray.data.augment import augment_train
from vlmray.data.curation.plan import apply_row_stages
from vlmray.data.curation.readers import list_inputs
from vlmray.data.curation.stage import Stage
from vlmray.data.ingest import DECODE_CPUS, SPLIT_CPUS, DecodeStage, train_columns
from vlmray.data.lanes import STAGED, index_inputs, read_lane
from vlmray.data.order import Item, Unit, inputs_digest, plan_units, unit_size
from vlmray.data.placement import remote_args
from vlmray.data.storage import filesystem, to_uri
from vlmray.data.stream import SplitStage, StreamTally
from vlmray.pipelines.feed import _default_cache, source_plan
from vlmray.rewrite.stage import rewrite_plan

if TYPE_CHECKING:
    import ray.data

    from vlmray.config import DataConfig

LANE_COLUMNS = [schema.ROW_ID, schema.LANE_POS]
"""Columns every lane row keeps besides the training columns: which input row it is and where
it stands in its lane (the loop pops both before the model sees the batch)."""


@dataclass
class LaneFeed:
    """What a worker needs to build its lane's plan (picklable; made once by the driver)."""

    cfg: DataConfig
    files: list[tuple[str, str]]
    units: list[Unit]
    digest: str
    stages: list[Stage]
    retrieval: list[Stage] | None
    tally: Any
    rejects_uri: str | None

    @property
    def rows(self) -> int:
        """Input rows of one epoch (accepted or not)."""
        return sum(u.rows for u in self.units)

    def lane_plan(self, items: list[tuple[int, Item]], *, epoch: int, seed: int,
                  lanes: int = 1) -> ray.data.Dataset:
        """The lazy, order-preserving plan of a lane's rows from its position: training
        columns plus ``ROW_ID`` and ``LANE_POS``. Each of the ``lanes`` workers runs its own
        plan, so each gets 1/lanes of ``data.placement``'s object-store and CPU budgets."""
        cfg, where = self.cfg, lane_share(self.cfg.placement, lanes)
        rows = read_lane(self.files, self.units, items, seed=seed, epoch=epoch, placement=where)
        rows = apply_row_stages(rows, self.stages, where)
        if cfg.rewrite.enabled:
            rows = rewrite_plan(rows, cfg.rewrite)
        if self.retrieval:
            rows = apply_row_stages(rows, self.retrieval, where)
        rows = rows.map_batches(DecodeStage(cfg), batch_format="numpy", batch_size=256,
                                **remote_args(where, DECODE_CPUS))
        split = SplitStage(self.tally, self.rejects_uri, train_columns(cfg) + LANE_COLUMNS)
        rows = rows.map_batches(split, batch_format="numpy", batch_size=256,
                                **remote_args(where, SPLIT_CPUS))
        rows = augment_train(cfg, rows, epoch=epoch)
        rows.context.execution_options.preserve_order = True
        return rows


def lane_share(placement: PlacementConfig, lanes: int) -> PlacementConfig:
    """``placement`` with the object-store and CPU budgets split over ``lanes`` plans (an
    object-store share never below two blocks, so a lane's stream can always flow)."""
    if lanes <= 1 or not (placement.object_store_bytes or placement.cpu_budget):
        return placement
    block = placement.target_block_bytes or DEFAULT_BLOCK_BYTES
    store = placement.object_store_bytes
    return replace(placement, object_store_bytes=max(store // lanes, 2 * block) if store else 0,
                   cpu_budget=placement.cpu_budget / lanes)


def _staged_files(staged: str) -> list[tuple[str, str]]:
    fs, path = filesystem(staged)
    found = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    if not found:
        raise FileNotFoundError(f"no staged rows under {staged}")
    return [(to_uri(fs, p), STAGED) for p in found]


def plan_feed(cfg: DataConfig, uri: str, *, rejects_uri: str | None = None,
              retrieval: list | None = None, cache_root: str | None = None) -> LaneFeed:
    """The driver's part: what must run once runs now (:func:`vlmray.pipelines.feed.source_plan`:
    a URL list's download, ``data.curate``'s pass 1, each cached in ``cache_root``), then the
    inputs are indexed into units (tars by their headers, parquet by its footer)."""
    import ray


    source = source_plan(cfg, uri, cache_root or _default_cache(rejects_uri))
    files = (_staged_files(source.staged) if source.staged else list_inputs(uri, ReadConfig()))
    index = index_inputs(files, cfg.unit_rows, cfg.placement)
    size = unit_size(sum(ix.rows for ix in index), cfg.unit_rows)
    units = plan_units(index, size, indexed_every=cfg.unit_rows)
    if not units:
        raise ValueError(f"no input rows at {uri}")
    tally = ray.remote(num_cpus=0)(StreamTally).remote()
    return LaneFeed(cfg, files, units, inputs_digest(files, index, size),
                    source.stages, retrieval, tally, rejects_uri)


__all__ = ["LANE_COLUMNS", "LaneFeed", "plan_feed"]
