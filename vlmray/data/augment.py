"""Random per-epoch stages over the materialised training rows (lazy Ray Data maps, so each
epoch draws afresh): augmented views (``data.views``)."""

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
    return ds


__all__ = ["augment_train"]
