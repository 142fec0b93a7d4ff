"""Composing curation stages into a Ray Data plan (used by the curation job and by training's
streaming prefix, so both run the same stages).

    stages = row_stages(cur)                         # text, image, [score]
    ds = apply_row_stages(rows, stages)              # lazy
    global_stages(cur)                               # dedup, [top fraction]: two passes over
                                                     # compact columns (curation.twopass)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vlmray.data.curation.dedup import Dedup
from vlmray.data.curation.download import DownloadStage
from vlmray.data.curation.images import ImageStage
from vlmray.data.curation.score import ScoreStage, TopFraction
from vlmray.data.curation.stage import GlobalStage, Stage, apply_stage
from vlmray.data.curation.text import TextStage

if TYPE_CHECKING:
    import ray.data

    from vlmray.config.curation import CurationConfig
    from vlmray.config.data import PlacementConfig
    from vlmray.config.inputs import DownloadConfig
    from vlmray.data.curation.score import EmbedderSource


def row_stages(cur: CurationConfig, *, download: DownloadConfig | None = None,
               scorer: EmbedderSource | None = None) -> list[Stage]:
    """Row-level stages in plan order; the downloader only for URL-list inputs. ``scorer`` is
    the resolved scoring model (``vlmray.embedders.scorer_for(cur.score)``), required when
    ``cur.score.model`` is set: the composing code resolves it, this layer never loads models."""
    stages: list[Stage] = [DownloadStage(download)] if download is not None else []
    stages += [TextStage(cur.text, caption_normaliser=cur.dedup.caption_normaliser),
               ImageStage(cur.image)]
    if cur.score.model:
        if scorer is None:
            raise ValueError(f"score.model={cur.score.model!r} is set but no scoring model was "
                             "handed to row_stages (scorer=vlmray.embedders.scorer_for(...))")
        stages.append(ScoreStage(cur.score, scorer))
    return stages


def global_stages(cur: CurationConfig) -> list[GlobalStage]:
    """Whole-dataset decisions in plan order (those that are switched on)."""

    return [g for g in (Dedup(cur.dedup), TopFraction(cur.score)) if g.enabled()]


def repair_stages(rows: Sequence[Stage]) -> dict[str, str]:
    """Repair kind -> the stage that applies it (for per-stage repair counts)."""
    return {kind: s.name for s in rows for kind in s.repair_kinds}


def apply_row_stages(ds: ray.data.Dataset, stages: Sequence[Stage],
                     placement: PlacementConfig | None = None) -> ray.data.Dataset:
    """``stages`` appended to the lazy plan ``ds``, each on the nodes ``placement`` names."""
    for stage in stages:
        ds = apply_stage(ds, stage, placement)
    return ds


__all__ = ["apply_row_stages", "global_stages", "repair_stages", "row_stages"]
