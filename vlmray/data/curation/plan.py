"""Composing curation stages into a Ray Data plan (used by the curation job and by training's
streaming prefix, so both run the same stages).

    stages = row_stages(cur)                         # text, image, [score]
    ds = apply_row_stages(rows, stages)              # lazy
    ds = apply_global(ds.materialize(), global_stages(cur))   # dedup, [top fraction]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from vlmray.data import schema
from vlmray.data.curation.stage import ApplyDecisions, GlobalStage, Stage, apply_stage

if TYPE_CHECKING:
    import ray.data

    from vlmray.data.curation.config import CurationConfig
    from vlmray.data.curation.download import DownloadConfig


def row_stages(cur: CurationConfig, *, download: DownloadConfig | None = None) -> list[Stage]:
    """Row-level stages in plan order; the downloader only for URL-list inputs."""
    from vlmray.data.curation.download import DownloadStage
    from vlmray.data.curation.images import ImageStage
    from vlmray.data.curation.score import ScoreStage
    from vlmray.data.curation.text import TextStage

    stages: list[Stage] = [DownloadStage(download)] if download is not None else []
    stages += [TextStage(cur.text), ImageStage(cur.image)]
    if cur.score.model:
        stages.append(ScoreStage(cur.score))
    return stages


def global_stages(cur: CurationConfig) -> list[GlobalStage]:
    """Whole-dataset decisions in plan order (those that are switched on)."""
    from vlmray.data.curation.dedup import Dedup
    from vlmray.data.curation.score import TopFraction

    return [g for g in (Dedup(cur.dedup), TopFraction(cur.score)) if g.enabled()]


def repair_stages(rows: Sequence[Stage]) -> dict[str, str]:
    """Repair kind -> the stage that applies it (for per-stage repair counts)."""
    return {kind: s.name for s in rows for kind in s.repair_kinds}


def apply_row_stages(ds: ray.data.Dataset, stages: Sequence[Stage]) -> ray.data.Dataset:
    for stage in stages:
        ds = apply_stage(ds, stage)
    return ds


def _live(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = batch[schema.REJECT_REASON] == ""
    return {k: v[keep] for k, v in batch.items() if k != schema.REJECT_REASON}


def live_table(ds: ray.data.Dataset, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """The given columns of all live rows, sorted by ``ROW_ID`` (only these reach the driver)."""
    import ray

    cols = list(dict.fromkeys([schema.ROW_ID, schema.KEY, *columns]))
    small = ds.select_columns([*cols, schema.REJECT_REASON]).map_batches(
        _live, batch_format="numpy", batch_size=4096)
    tables = [t for t in ray.get(small.to_arrow_refs()) if t.num_rows]
    if not tables:
        return {c: np.zeros(0, dtype=np.int64 if c == schema.ROW_ID else object) for c in cols}
    table = pa.concat_tables(tables, promote_options="permissive")
    table = table.sort_by(schema.ROW_ID)
    return {c: table[c].to_numpy(zero_copy_only=False) for c in cols}


def _drop(table: dict[str, np.ndarray], row_ids: np.ndarray) -> dict[str, np.ndarray]:
    keep = ~np.isin(table[schema.ROW_ID], row_ids)
    return {k: v[keep] for k, v in table.items()}


def apply_global(ds: ray.data.Dataset, stages: Sequence[GlobalStage]) -> ray.data.Dataset:
    """Runs each decision over the live rows of a materialised ``ds``; marks the rejected."""
    if not stages:
        return ds
    table = live_table(ds, [c for g in stages for c in g.columns])
    for g in stages:
        decisions = g.decide(table)
        ds = apply_stage(ds, ApplyDecisions(g.name, decisions))
        table = _drop(table, decisions.row_ids)
    return ds


__all__ = ["apply_global", "apply_row_stages", "global_stages", "live_table", "repair_stages",
           "row_stages"]
