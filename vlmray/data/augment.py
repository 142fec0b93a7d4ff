"""Random per-epoch stages over the materialised training rows (lazy Ray Data maps, so each
epoch draws afresh): augmented views (``data.views``), then coin-flip mixup (``data.mixup``;
rows are paired within each Ray Data batch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmray.data.placement import remote_args

if TYPE_CHECKING:
    import ray.data

    from vlmray.config import DataConfig


def augment_train(cfg: DataConfig, ds: ray.data.Dataset) -> ray.data.Dataset:
    """``ds`` with the configured random stages appended (unchanged when none is on), placed
    like the other data stages (``data.placement``)."""
    where = remote_args(cfg.placement, 1.0)
    if cfg.views.enabled:
        from vlmray.data.views import ViewStage

        ds = ds.map_batches(ViewStage(cfg), batch_format="numpy", batch_size=256, **where)
    if cfg.mixup.prob > 0:
        from vlmray.data.mixup import MixupStage

        ds = ds.map_batches(MixupStage(cfg.mixup), batch_format="numpy", batch_size=256,
                            **where)
    return ds


__all__ = ["augment_train"]
