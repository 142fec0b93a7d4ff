"""Random per-epoch stages over the materialised training rows (lazy Ray Data maps, so each
epoch draws afresh): augmented views (``data.views``), then coin-flip mixup (``data.mixup``;
rows are paired within each Ray Data batch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ray.data

    from vlmray.config import DataConfig


def augment_train(cfg: DataConfig, ds: ray.data.Dataset) -> ray.data.Dataset:
    """``ds`` with the configured random stages appended (unchanged when none is on)."""
    if cfg.views.enabled:
        from vlmray.data.views import ViewStage

        ds = ds.map_batches(ViewStage(cfg), batch_format="numpy", batch_size=256)
    if cfg.mixup.prob > 0:
        from vlmray.data.mixup import MixupStage

        ds = ds.map_batches(MixupStage(cfg.mixup), batch_format="numpy", batch_size=256)
    return ds


__all__ = ["augment_train"]
